"""Dropout on the LoRA branch's input, kept as the indices of the dropped elements, not as a mask.

    dropout(x) = x ⊙ mask,   mask = 0 at the dropped elements, 1/(1 − p) elsewhere (E[mask] = 1)

Each element is dropped independently with probability p, as in `nn.Dropout`. The op (lora/core/op.py)
never builds the mask: it zeroes the dropped elements of a copy of x (M × in) and puts the 1/(1 − p)
on the small side (M × r), so all it keeps for backward is the sorted flat indices of the dropped
elements, ≈ p · numel of them, regenerated bit-identically from a seed.
"""
from __future__ import annotations

import math

import torch


def dropped_positions(numel: int, p: float, seed: int, device=None) -> torch.Tensor:
    """The flat indices (sorted, int64) of the elements that dropout(p) zeroes among `numel`,
    regenerated bit-identically from `seed`.

    Instead of one draw per element, the gaps between dropped elements are drawn: a gap is geometric,
    P(gap = j) = (1 − p)^(j−1) · p, sampled by inversion as 1 + ⌊log(1 − u) / log(1 − p)⌋ with u
    uniform in [0, 1). That is p · numel draws instead of numel (a twentieth at p = 0.05), and the
    result is small enough to keep for backward instead of regenerating it.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    log_q = math.log1p(-p)
    chunk = int(numel * p + 6 * math.sqrt(numel * p * (1 - p))) + 16    # one chunk covers numel but once in ~10⁹
    parts, start = [], 0
    while start < numel:
        u = torch.rand(chunk, dtype=torch.float64, device=device, generator=g)
        gaps = u.neg_().add_(1).log_().div_(log_q).floor_().add_(1)      # (chunk,) geometric, ≥ 1
        pos = gaps.cumsum_(0).add_(start - 1).to(torch.int64)             # positions of the drops
        parts.append(pos)
        start = int(pos[-1]) + 1
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[:torch.searchsorted(pos, numel)]


def compact(dropped: torch.Tensor, numel: int) -> torch.Tensor:
    """`dropped` as int32 when every index fits: half the bytes kept for backward (`.long()` restores it)."""
    return dropped.to(torch.int32) if numel < 2**31 else dropped


def drop_(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of the contiguous tensor `t` at the flat indices `dropped`."""
    t.view(-1).index_fill_(0, dropped, 0)
    return t


def drop(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `x` with the elements at the flat indices `dropped` zeroed (not rescaled)."""
    return drop_(x.clone(memory_format=torch.contiguous_format), dropped)


def dropout_scale(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dense mask (0 where dropped, 1/(1 − p) elsewhere) that the op applies to an input shaped
    like `like` for this `seed`. The op never builds it; it is here to state the mask (tests)."""
    mask = torch.full(like.shape, 1 / (1 - p), dtype=like.dtype, device=like.device)
    return drop(mask, dropped_positions(like.numel(), p, seed, like.device))
