"""`--verify`: the merged checkpoint's logits against base + adapter(s) unmerged, both in fp32.

Tolerance on max |logit difference|, relative to the logits' scale max(1, max|logit|): the merged
weights are rounded once to their dtype (unit roundoff u: 2^-11 fp16, 2^-8 bf16) and that error
passes through every layer: 16·u. For fp32 the difference comes from activation roundoff
(x Wᵀ + s·(x Aᵀ) Bᵀ vs x (W + s·B A)ᵀ), not weight rounding: a floor of 2^-16 (1.5e-5) covers it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..core.inject import disable_adapter
from ..core.layer import LoRALinear
from ..errors import LoRAError, LoRAFailure
from ..storage.adapter import load_adapter
from ..storage.model_dir import load_model
from ..storage.safetensors_stream import Entry, read_checkpoint
from .plan import plan_updates

_UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}
VERIFY_ULPS, VERIFY_FLOOR = 16, 2.0 ** -16


class VerifyError(LoRAFailure):
    """--verify found the merged model's logits too far from base+adapter's."""


def reference_model(base_dir: Path, adapter_dirs: list[Path], weights: list[float]) -> nn.Module:
    """Base model in fp32 carrying the adapter(s) unmerged, as our LoRALinear.

    One adapter: exactly lora.load_adapter. Several: per module one LoRALinear whose rank is the sum
    of the adapters' ranks, A = [A_1; A_2; …] and B = [w_1 s_1 B_1, w_2 s_2 B_2, …] with scaling 1,
    so its forward is x Wᵀ + Σ_i w_i s_i (x A_iᵀ) B_iᵀ — the unmerged sum.
    """
    model = load_model(base_dir, torch.float32).eval()
    if len(adapter_dirs) == 1 and weights[0] == 1.0:
        return load_adapter(model, adapter_dirs[0])
    modules = dict(model.named_modules())
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, ups in plan_updates(adapter_dirs, weights, _module_weights(model)).items():
        module = name.removesuffix(".weight")
        parts[module] = []
        for u in ups:
            fd = os.open(u.path, os.O_RDONLY)
            try:
                t = u.load(fd)
            finally:
                os.close(fd)
            parts[module].append((t.lora_A.float(), t.lora_B.float() * (t.scaling * t.weight)))
    with torch.no_grad():
        for module, ab in parts.items():
            linear = modules[module]
            if not isinstance(linear, nn.Linear):
                raise LoRAError(f"verify: {module} is a {type(linear).__name__}, not an nn.Linear")
            r = sum(a.shape[0] for a, _ in ab)
            layer = LoRALinear(linear, r=r, alpha=r)                       # scaling = 1
            layer.lora_A.copy_(torch.cat([a for a, _ in ab], dim=0))       # (Σr, in)
            layer.lora_B.copy_(torch.cat([b for _, b in ab], dim=1))       # (out, Σr)
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def _module_weights(model: nn.Module) -> dict[str, Entry]:
    """The fp32 model's parameters as header entries, so plan_updates can check shapes against them."""
    return {n: Entry(n, "F32", tuple(p.shape), 0, 0) for n, p in model.named_parameters()}


@torch.no_grad()
def verify_merged(base_dir: Path, adapter_dirs: list[Path], weights: list[float],
                  merged_dir: Path, n_seq: int = 3, seq_len: int = 16) -> tuple[float, float, float]:
    """(max |logit difference|, tolerance, adapter effect) between base+adapter (unmerged, our layer)
    and the merged checkpoint, both run in fp32 on the same random token sequences; VerifyError when
    the difference exceeds the tolerance. The adapter's effect, max |logits(base+adapter) -
    logits(base)|, says how much a wrong merge could show."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()            # our own bar has already run; theirs would repeat
    try:
        ref_model = reference_model(base_dir, adapter_dirs, weights)
        vocab = ref_model.config.vocab_size
        ids = torch.randint(0, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
        ref = ref_model(input_ids=ids).logits.float()
        with disable_adapter(ref_model):
            effect = (ref_model(input_ids=ids).logits.float() - ref).abs().max().item()
        del ref_model
        got = load_model(merged_dir, torch.float32).eval()(input_ids=ids).logits.float()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    shards, _ = read_checkpoint(merged_dir)
    worst = max((_UNIT_ROUNDOFF[t.dtype] for s in shards for t in s.entries if t.dtype in _UNIT_ROUNDOFF),
                default=2.0 ** -24)
    tol = max(VERIFY_ULPS * worst, VERIFY_FLOOR) * max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    if not diff <= tol:
        raise VerifyError(f"verify: max |logit difference| {diff:.3g} exceeds the tolerance {tol:.3g}; "
                          f"nothing written")
    return diff, tol, effect
