"""Several PEFT-format adapters onto one base, for mixed batches (lora/serving/layer.py).

    load_adapters(model, {"sql": dir1, "chat": dir2})   every adapter checked first, then stacked
    adapter_names(model)                                  ["sql", "chat"]: index k is the k-th name

Each adapter is read and checked against the base before the model is touched (its config, its
targets matched as apply_lora matches them, every key present and expected, every shape exact, every
value finite), so a bad one is one `LoRAError` line and nothing changes. Adapters may differ in rank,
alpha, targets and rank/alpha patterns.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..core.inject import lora_layers, select_targets
from ..errors import LoRAError
from ..storage.adapter import check_finite, peft_key, read_adapter_config, read_adapter_tensors
from .layer import MultiLoRALinear
from .rows import ServingState


def _read_checked(model: nn.Module, modules: dict, adapter_dir) -> dict[str, tuple]:
    """{module name: (A (r, in), B (out, r), scaling)} of one adapter, checked against the base."""
    source = str(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.use_dora:
        raise LoRAError(f"{source}: a DoRA adapter cannot share a mixed batch (plain LoRA only)")
    tensors = read_adapter_tensors(adapter_dir)
    try:
        targets = select_targets(model, config)
    except LoRAError as e:
        raise LoRAError(f"{source}: {e}") from None
    expected = {peft_key(n, w) for n in targets for w in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise LoRAError(f"{source}: {len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        raise LoRAError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    out = {}
    for name in targets:
        base, r = modules[name], config.rank_for(name)
        for which, shape in (("A", (r, base.in_features)), ("B", (base.out_features, r))):
            key, t = peft_key(name, which), tensors[peft_key(name, which)]
            if tuple(t.shape) != shape:
                raise LoRAError(f"{source}: {key} has shape {tuple(t.shape)} but the model needs {shape}")
            if not t.is_floating_point():
                raise LoRAError(f"{source}: {key} has dtype {t.dtype}, expected a float tensor")
            check_finite(t, key, source)
        out[name] = (tensors[peft_key(name, "A")], tensors[peft_key(name, "B")], config.scaling_for(name))
    return out


def _stack(base: nn.Linear, per_adapter: list) -> tuple[torch.Tensor, torch.Tensor, list, list, list]:
    """Zero-padded stacks A (n, r_max, in) and Bᵀ (n, r_max, out) in the base's dtype; ranks, scalings, present."""
    w = base.weight
    dtype = w.dtype if w.is_floating_point() else torch.float32
    r_max = max(ad[0].shape[0] for ad in per_adapter if ad is not None)
    n = len(per_adapter)
    A = torch.zeros(n, r_max, base.in_features, dtype=dtype, device=w.device)
    Bt = torch.zeros(n, r_max, base.out_features, dtype=dtype, device=w.device)
    ranks, scalings, present = [], [], []
    for k, ad in enumerate(per_adapter):
        if ad is None:
            ranks.append(0); scalings.append(0.0); present.append(False)
            continue
        a, b, s = ad
        r = a.shape[0]
        A[k, :r] = a
        Bt[k, :r] = b.t()
        ranks.append(r); scalings.append(s); present.append(True)
    return A, Bt, ranks, scalings, present


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
        A, B, ranks, scalings, present = _stack(base, [r.get(name) for r in read])
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child,
                MultiLoRALinear(base, A, B, ranks, scalings, present, state))
    for p in model.parameters():
        p.requires_grad_(False)
    model.serving_state = state
    return model


def adapter_names(model: nn.Module) -> list[str]:
    state = getattr(model, "serving_state", None)
    return list(state.names) if state is not None else []
