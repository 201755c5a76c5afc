"""Several PEFT-format adapters onto one base, for mixed batches (lora/serving/layer.py).

    load_adapters(model, {"sql": dir1, "chat": dir2})   every adapter checked first, then stacked
    adapter_names(model)                                  ["sql", "chat"]: index k is the k-th name

Each adapter is read and checked against the base before the model is touched (its config, its
targets matched as apply_lora matches them, every key present and expected, every shape exact, every
value finite), so a bad one is one `LoRAError` line and nothing changes. Adapters may differ in rank,
alpha, targets and rank/alpha patterns, and may be DoRA adapters: a DoRA adapter's row scale
g = m / ‖W + s·B A‖_row is computed here, once, by the factored norm the DoRA layer uses
(lora/core/dora.py), since nothing changes at inference.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..core.dora import weight_norm, weight_sq_norms
from ..core.inject import lora_layers, select_targets
from ..errors import LoRAError
from ..storage.adapter import check_finite, peft_key, read_adapter_config, read_adapter_tensors
from .layer import MultiLoRALinear
from .rows import ServingState


def _read_checked(model: nn.Module, modules: dict, adapter_dir) -> dict[str, tuple]:
    """{module name: (A (r, in), B (out, r), scaling, DoRA's m (out,) or None)} of one adapter, checked
    against the base."""
    source = str(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    try:
        targets = select_targets(model, config)
    except LoRAError as e:
        raise LoRAError(f"{source}: {e}") from None
    kinds = ("A", "B", "magnitude") if config.use_dora else ("A", "B")
    expected = {peft_key(n, w) for n in targets for w in kinds}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise LoRAError(f"{source}: {len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        raise LoRAError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    out = {}
    for name in targets:
        base, r = modules[name], config.rank_for(name)
        shapes = {"A": (r, base.in_features), "B": (base.out_features, r), "magnitude": (base.out_features,)}
        for which in kinds:
            shape, key = shapes[which], peft_key(name, which)
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise LoRAError(f"{source}: {key} has shape {tuple(t.shape)} but the model needs {shape}")
            if not t.is_floating_point():
                raise LoRAError(f"{source}: {key} has dtype {t.dtype}, expected a float tensor")
            check_finite(t, key, source)
        m = tensors[peft_key(name, "magnitude")] if config.use_dora else None
        out[name] = (tensors[peft_key(name, "A")], tensors[peft_key(name, "B")], config.scaling_for(name), m)
    return out


def _stack(base: nn.Linear, per_adapter: list) -> tuple:
    """Zero-padded stacks A (n, r_max, in) and Bᵀ (n, r_max, out) in the base's dtype; ranks, scalings,
    present; DoRA's row scales g (n, out) in the base's dtype (1 for a plain LoRA adapter) and which
    adapters are DoRA here."""
    w = base.weight
    dtype = w.dtype if w.is_floating_point() else torch.float32
    r_max = max(ad[0].shape[0] for ad in per_adapter if ad is not None)
    n = len(per_adapter)
    A = torch.zeros(n, r_max, base.in_features, dtype=dtype, device=w.device)
    Bt = torch.zeros(n, r_max, base.out_features, dtype=dtype, device=w.device)
    g = torch.ones(n, base.out_features, dtype=dtype, device=w.device)
    ranks, scalings, present, dora = [], [], [], []
    w_sq = None
    for k, ad in enumerate(per_adapter):
        if ad is None:
            ranks.append(0); scalings.append(0.0); present.append(False); dora.append(False)
            continue
        a, b, s, m = ad
        r = a.shape[0]
        A[k, :r] = a
        Bt[k, :r] = b.t()
        if m is not None:                                # g = m / ‖W + s·B A‖_row, as the DoRA layer computes it
            w_sq = weight_sq_norms(w) if w_sq is None else w_sq
            a_, b_ = a.to(w.device), b.to(w.device)
            g[k] = m.to(w.device, torch.float32) / weight_norm(w, a_, b_, s, w_sq)
        ranks.append(r); scalings.append(s); present.append(True); dora.append(m is not None)
    return A, Bt, ranks, scalings, present, g, dora


@torch.no_grad()
def load_adapters(model: nn.Module, adapters) -> nn.Module:
    """Stack the adapters {name: dir} (or [(name, dir), …]; names unique) onto `model`'s Linears, in
    place; everything is frozen. Index k of `adapter_rows` is the k-th adapter given."""
    pairs = list(adapters.items()) if isinstance(adapters, dict) else list(adapters)
    if not pairs:
        raise LoRAError("no adapters to load")
    names = [n for n, _ in pairs]
    for n in names:
        if not isinstance(n, str) or not n or n.strip() != n:
            raise LoRAError(f"adapter name {n!r}: a non-empty name without surrounding spaces is needed")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LoRAError(f"adapter name {dup[0]!r} given twice")
    if getattr(model, "serving_state", None) is not None or lora_layers(model):
        raise LoRAError("the model already holds adapters; load_adapters once, on a plain base")
    modules = dict(model.named_modules())
    read = [_read_checked(model, modules, d) for _, d in pairs]          # everything checked first
    targets = [n for n in modules if any(n in r for r in read)]          # model order
    state = ServingState(names)
    for name in targets:
        base = modules[name]
        A, B, ranks, scalings, present, g, dora = _stack(base, [r.get(name) for r in read])
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child,
                MultiLoRALinear(base, A, B, ranks, scalings, present, state, dora_scale=g, dora=dora))
    for p in model.parameters():
        p.requires_grad_(False)
    model.serving_state = state
    return model


def adapter_names(model: nn.Module) -> list[str]:
    state = getattr(model, "serving_state", None)
    return list(state.names) if state is not None else []
