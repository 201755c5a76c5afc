"""The plain PyTorch LoRA op: a custom autograd Function with no saved copies.

    y  = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ          x: (M, in)  W: (out, in)  A: (r, in)  B: (out, r)

Forward: the shrink S = dropout(x) Aᵀ (M, r), scaled by s once; the small term b + s · S Bᵀ written
first; then the base GEMM accumulates x Wᵀ onto it with `addmm_` (BLAS's beta=1 epilogue). y is
written by the expand and read once by the base GEMM: no extra pass, no temporary of y's size.
Backward with W frozen (no dW, no db), in the same order (small term first, base GEMM accumulates):

    dS = s · dY B          (M, r)        dB = s · dYᵀ S        (out, r)
    dA = dSᵀ dropout(x)    (r, in)       dX = (dS A) ⊙ mask + dY W

With dropout, mask = 0 at the dropped elements and 1/(1 − p) elsewhere; the 1/(1 − p) is applied to
S and dS (M × r) instead of to x, so dropping is only zeroing the dropped elements of a copy.

Saved for backward: dA needs x, and a frozen base alone would keep none. When x is a product whose
factors the base's backward keeps anyway (RMSNorm's output, the gated MLP's act(g) ⊙ u: a `recipe`,
lora/core/recompute.py), nothing of x's size is saved: backward multiplies x again and drops the same
elements. Otherwise the one activation-sized tensor: x itself at p = 0; with dropout, the forward's
copy of x with the dropped elements zeroed, which the shrink made anyway, so x can be freed and
backward drops nothing again. Besides: s · S (M × r, tiny) and the flat indices of the dropped
elements (≈ p · M · in int32s: a twentieth of x's size at p = 0.05), for the mask on dX and the
recomputed x.
"""
from __future__ import annotations

import math

import torch

from ..runtime.seed import new_seed
from .recompute import product_recipe, recompute


def dropped_positions(numel: int, p: float, seed: int, device=None) -> torch.Tensor:
    """The flat indices (sorted, int64) of the elements that dropout(p) zeroes among `numel`,
    regenerated bit-identically from `seed`.

    Every element is dropped independently with probability p, as in `nn.Dropout`. Instead of one
    draw per element, the gaps between dropped elements are drawn: a gap is geometric,
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


def shrink(x2: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int):
    """(S, dropped, xd): S = dropout(x2) Aᵀ (M, r); the flat indices of the dropped elements (None when
    p = 0); xd = x2 with them zeroed, not rescaled (x2 itself when p = 0), which is what dA needs."""
    if p == 0:
        return torch.mm(x2, lora_A.t()), None, x2
    dropped = dropped_positions(x2.numel(), p, seed, x2.device)
    xd = drop(x2, dropped)
    return torch.mm(xd, lora_A.t()).mul_(1 / (1 - p)), dropped, xd


def expand(S: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """b + S Bᵀ (M, out), a fresh tensor for the base GEMM to accumulate onto (S already scaled)."""
    return torch.mm(S, lora_B.t()) if bias is None else torch.addmm(bias, S, lora_B.t())


def dropout_scale(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dense dropout multiplier (0 where dropped, 1/(1 − p) elsewhere) that the op applies to an
    input shaped like `like` for this `seed`. The op never builds it; it is here to state the mask."""
    mask = torch.full(like.shape, 1 / (1 - p), dtype=like.dtype, device=like.device)
    return drop(mask, dropped_positions(like.numel(), p, seed, like.device))


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, recipe=None):
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_features)                           # (M, in)
        S, dropped, xd = shrink(x2, lora_A, dropout_p, seed)      # (M, r), (≈ p·M·in,) or None, (M, in)
        S.mul_(scaling)                                           # s · S: the scale on the small side, once
        y = expand(S, lora_B, bias)                               # b + s · S Bᵀ  (M, out)
        y.addmm_(x2, weight.t())                                  # y += x Wᵀ: the base GEMM accumulates
        ctx.save_for_backward(None if recipe else xd, weight, lora_A, lora_B, S,
                              None if dropped is None else compact(dropped, x2.numel()))
        ctx.scaling, ctx.dropout_p, ctx.x_shape, ctx.x_dtype, ctx.recipe = scaling, dropout_p, x.shape, x.dtype, recipe
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dY):
        xd, weight, lora_A, lora_B, S, dropped = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        out_features = weight.shape[0]
        dY2 = dY.reshape(-1, out_features)                       # (M, out)
        dS = torch.mm(dY2, lora_B).mul_(s)                        # (M, r)
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dX = dA = dB = None
        if need_B:
            dB = torch.mm(dY2.t(), S)                             # (out, r): S was saved as s · S
        if dropped is not None:
            dropped = dropped.long()
            dS.mul_(1 / (1 - p))                                  # the kept elements' scale, on the small side
        if need_A:
            if ctx.recipe:                                        # x multiplied again, dropped again
                xd = recomputed_input(ctx.recipe, ctx.x_shape, ctx.x_dtype, dropped)
            dA = torch.mm(dS.t(), xd)                             # (r, in)
        if need_x:
            dX = torch.mm(dS, lora_A)                             # dS A  (M, in)
            if dropped is not None:
                drop_(dX, dropped)                                # (dS A) ⊙ mask
            dX.addmm_(dY2, weight)                                # dX += dY W: the base GEMM accumulates
            dX = dX.view(ctx.x_shape)
        return dX, None, None, dA, dB, None, None, None, None


def input_recipe(x: torch.Tensor, need_A: bool, allowed: bool = True):
    """How backward can rebuild x instead of keeping it (lora/core/recompute.py), or None: only when dA
    will be needed and x is such a product. `allowed=False` (graph capture) never looks."""
    if not (allowed and need_A and torch.is_grad_enabled()):
        return None
    return product_recipe(x)


def recomputed_input(recipe, x_shape, x_dtype, dropped) -> torch.Tensor:
    """dropout(x) as the shrink saw it, not rescaled (M, in): x from its recipe, the same elements zeroed."""
    xd = recompute(recipe, x_shape, x_dtype).reshape(-1, x_shape[-1]).contiguous()
    return xd if dropped is None else drop_(xd, dropped)


def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                      seed: int | None = None, recompute_input: bool = True) -> torch.Tensor:
    """`y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ` for x of shape (..., in); grads to x, A, B only.
    `recompute_input`: rebuild x in backward when autograd keeps its factors anyway (see above)."""
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed or 0,
                                    input_recipe(x, lora_A.requires_grad, recompute_input))
