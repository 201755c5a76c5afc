"""The plain PyTorch LoRA op: one custom autograd Function, with no saved copies, for n ≥ 1 projections
that read the same input x. A single projection is a group of one; q/k/v and gate/up are groups of
three and two (lora/core/group.py finds them).

    y_i = x W_iᵀ + b_i + s_i · (dropout(x) A_iᵀ) B_iᵀ
          x: (M, in)   W_i: (out_i, in)   A_i: (r_i, in)   B_i: (out_i, r_i)   s_i: scaling

Forward: one shrink S = dropout(x) [A_1; …; A_n]ᵀ (M, Σr) reads x once; each member's columns S_i
(M, r_i) are scaled by s_i once; the small term b_i + s_i · S_i B_iᵀ is written first, then the base
GEMM accumulates x W_iᵀ onto it with `addmm_` (BLAS's beta=1 epilogue). y_i is written by the expand
and read once by the base GEMM: no extra pass, no temporary of y_i's size.
Backward with W_i frozen (no dW, no db), in the same order (small term first, base GEMM accumulates):

    dS_i = s_i · dY_i B_i          (M, r_i)       dB_i = s_i · (S_iᵀ dY_i)ᵀ    (out_i, r_i)
    dA   = dSᵀ dropout(x)          (Σr, in), split into the A_i's rows
    dX   = (dS [A_1; …; A_n]) ⊙ mask + Σ_i dY_i W_i      one buffer, every base GEMM accumulated in place

The adapter's products (the shrink, the expand, dS_i, dB_i, dA and dS A) go through lora/core/thin.py
(oneDNN's fp32 matmul on the CPU, where PyTorch has it); the base GEMMs are torch's own.

With dropout, mask = 0 at the dropped elements and 1/(1 − p) elsewhere (lora/core/dropout.py); the
1/(1 − p) is applied to S and dS (M × Σr) instead of to x, so dropping is only zeroing the dropped
elements of a copy. The members share one mask (PEFT draws one per projection; each branch still sees
dropout(p)). Against one op per projection, a group reads x once instead of n times (the shrink and
dA), draws one mask instead of n, and sums every member's input gradient in one buffer with BLAS's
beta=1 instead of n buffers added by autograd. One member does exactly a single op's work: its A is
not concatenated, S and dS are neither sliced nor concatenated.

Saved for backward: dA needs x, and a frozen base alone would keep none. When x is a product whose
factors the base's backward keeps anyway (RMSNorm's output, the gated MLP's act(g) ⊙ u: a `recipe`,
lora/core/recompute.py), nothing of x's size is saved: backward multiplies x again and drops the same
elements, or, for RMSNorm's output (rsqrt_m · h[m, k] · w_k), never builds x:
dA = ((dS ⊙ rsqrt)ᵀ h) ⊙ w, the scales on the small sides (`factored_grad_A`). Otherwise the one
activation-sized tensor: x itself at p = 0; with dropout, the forward's copy of x with the dropped
elements zeroed, which the shrink made anyway, so x can be freed and backward drops nothing again.
Besides: s_i · S_i (M × Σr, tiny), [A_1; …; A_n] (A itself for one member) and the flat indices of the
dropped elements (≈ p · M · in int32s: a twentieth of x's size at p = 0.05), for the mask on dX and
the recomputed x.

A 4-bit base (W_i an NF4Weight, lora/quant/): each W_i is dequantized for its base GEMM and dropped
after it; backward keeps the packed weight and dequantizes it again for dY_i W_i. A dense W_i takes
exactly the ops above (`dense` returns it untouched).
"""
from __future__ import annotations

import itertools

import torch

from ..quant.linear import dense
from ..runtime.seed import new_seed
from .dropout import compact, drop, drop_, dropped_positions
from .recompute import product_recipe, recompute, split_product
from .thin import addmm, mm


def shrink(x2: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int):
    """(S, dropped, xd): S = dropout(x2) Aᵀ (M, r); the flat indices of the dropped elements (None when
    p = 0); xd = x2 with them zeroed, not rescaled (x2 itself when p = 0), which is what dA needs."""
    if p == 0:
        return mm(x2, lora_A.t()), None, x2
    dropped = dropped_positions(x2.numel(), p, seed, x2.device)
    xd = drop(x2, dropped)
    return mm(xd, lora_A.t()).mul_(1 / (1 - p)), dropped, xd


def expand(S: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """b + S Bᵀ (M, out), a fresh tensor for the base GEMM to accumulate onto (S already scaled)."""
    return addmm(bias, S, lora_B.t())


def member_columns(t: torch.Tensor, ranks) -> list[torch.Tensor]:
    """The members' column blocks of t (M, Σr), in order, as (M, r_i) views; t itself for one member."""
    if len(ranks) == 1:
        return [t]
    offsets = itertools.accumulate(ranks, initial=0)
    return [t[:, off:off + r] for off, r in zip(offsets, ranks)]


class LoRAFunction(torch.autograd.Function):
    """(y_1, …, y_n) for `apply(x, dropout_p, seed, scalings, recipe, *W_i, *b_i, *A_i, *B_i)`;
    gradients to x and every A_i, B_i (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, dropout_p: float, seed: int, scalings: tuple, recipe, *params):
        n = len(scalings)
        Ws, bs, As, Bs = params[0:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:4 * n]
        ranks = [A.shape[0] for A in As]
        A_cat = As[0] if n == 1 else torch.cat(As)                       # (Σr, in)
        x2 = x.reshape(-1, x.shape[-1])                                  # (M, in)
        S, dropped, xd = shrink(x2, A_cat, dropout_p, seed)              # (M, Σr), (≈ p·M·in,) or None, (M, in)
        outs = []
        for W, b, B, s, S_i in zip(Ws, bs, Bs, scalings, member_columns(S, ranks)):
            S_i.mul_(s)                                                  # s_i · S_i: the scale on the small side, once
            y = expand(S_i, B, b)                                        # b_i + s_i · S_i B_iᵀ  (M, out_i)
            y.addmm_(x2, dense(W, x2.dtype).t())                         # y += x W_iᵀ: the base GEMM accumulates
            outs.append(y.view(*x.shape[:-1], W.shape[0]))
        dense_Ws = [W if isinstance(W, torch.Tensor) else None for W in Ws]
        ctx.save_for_backward(None if recipe else xd, S, A_cat, None if dropped is None else compact(dropped, x2.numel()),
                              *dense_Ws, *Bs)
        ctx.packed_Ws = [None if isinstance(W, torch.Tensor) else W for W in Ws]   # NF4 bases: packed only
        ctx.ranks, ctx.scalings, ctx.dropout_p = ranks, scalings, dropout_p
        ctx.x_shape, ctx.x_dtype, ctx.recipe = x.shape, x.dtype, recipe       # recipe: x rebuilt in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        ranks, scalings, p = ctx.ranks, ctx.scalings, ctx.dropout_p
        n = len(ranks)
        xd, S, A_cat, dropped, *rest = ctx.saved_tensors
        Ws = [W if W is not None else q for W, q in zip(rest[:n], ctx.packed_Ws)]
        Bs = rest[n:]
        dY2 = [dY.reshape(-1, W.shape[0]) for dY, W in zip(dYs, Ws)]     # (M, out_i)
        dSs = [mm(d, B).mul_(s) for d, B, s in zip(dY2, Bs, scalings)]  # (M, r_i)
        dS = dSs[0] if n == 1 else torch.cat(dSs, dim=1)                 # (M, Σr)
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_A = any(needs[5 + 2 * n: 5 + 3 * n])
        need_B = needs[5 + 3 * n: 5 + 4 * n]
        dBs = [mm(S_i.t(), d).t() if need else None                      # (S_iᵀ dY_i)ᵀ (out_i, r_i): S_i saved as
               for d, S_i, need in zip(dY2, member_columns(S, ranks), need_B)]   # s_i · S_i; BLAS runs dY_iᵀ S_i slower
        if dropped is not None:
            dropped = dropped.long()
            dS.mul_(1 / (1 - p))                                         # the kept elements' scale, on the small side
        dAs = [None] * n
        if need_A:
            split = ctx.recipe and split_product(ctx.recipe, ctx.x_shape, ctx.x_dtype)
            if split:                                                    # x = row ⊙ full ⊙ col, never built
                dA = factored_grad_A(dS, *split, dropped)
            else:
                if ctx.recipe:                                           # x multiplied again, dropped again
                    xd = recomputed_input(ctx.recipe, ctx.x_shape, ctx.x_dtype, dropped)
                dA = mm(dS.t(), xd)                                      # (Σr, in)
            dAs = [dA] if n == 1 else list(dA.split(ranks))              # (r_i, in)
        dX = None
        if need_x:
            dX = mm(dS, A_cat)                                           # dS A  (M, in)
            if dropped is not None:
                drop_(dX, dropped)                                       # (dS A) ⊙ mask
            for d, W in zip(dY2, Ws):
                dX.addmm_(d, dense(W, d.dtype))                          # += Σ_i dY_i W_i in the same buffer
            dX = dX.view(ctx.x_shape)
        return (dX, None, None, None, None, *([None] * (2 * n)), *dAs, *dBs)


def input_recipe(x: torch.Tensor, need_A: bool, allowed: bool = True):
    """How backward can rebuild x instead of keeping it (lora/core/recompute.py), or None: only when dA
    will be needed and x is such a product. `allowed=False` (graph capture) never looks."""
    if not (allowed and need_A and torch.is_grad_enabled()):
        return None
    return product_recipe(x)


def factored_grad_A(dS, row, full, col, dropped) -> torch.Tensor:
    """dA = dSᵀ dropout(x) (Σr, in) for x = row ⊙ full ⊙ col (lora/core/recompute.py's split_product):
    ((dS ⊙ row)ᵀ full') ⊙ col, full' = full with the dropped elements zeroed; row (M, 1), col (in,)."""
    if row is not None:
        dS = dS * row                                                    # (M, Σr)
    if dropped is not None:
        full = drop(full, dropped)                                       # a copy: full is autograd's
    dA = mm(dS.t(), full)                                                # (Σr, in)
    return dA if col is None else dA.mul_(col)


def recomputed_input(recipe, x_shape, x_dtype, dropped) -> torch.Tensor:
    """dropout(x) as the shrink saw it, not rescaled (M, in): x from its recipe, the same elements zeroed."""
    xd = recompute(recipe, x_shape, x_dtype).reshape(-1, x_shape[-1]).contiguous()
    return xd if dropped is None else drop_(xd, dropped)


def lora_group_torch(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float = 0.0,
                     seed: int | None = None, recompute_input: bool = True) -> tuple[torch.Tensor, ...]:
    """(y_1, …, y_n), y_i = x W_iᵀ + b_i + s_i · (dropout(x) A_iᵀ) B_iᵀ for x of shape (..., in), one
    dropout mask for all; grads to x and the A_i, B_i only. `seed` fixes the mask (drawn on the host
    when None and dropout_p > 0). `recompute_input`: rebuild x in backward when autograd keeps its
    factors anyway (see above)."""
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    recipe = input_recipe(x, any(A.requires_grad for A in lora_As), recompute_input)
    return LoRAFunction.apply(x, float(dropout_p), seed or 0, tuple(map(float, scalings)), recipe,
                              *weights, *biases, *lora_As, *lora_Bs)


def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                      seed: int | None = None, recompute_input: bool = True) -> torch.Tensor:
    """`y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ` for x of shape (..., in): a group of one."""
    (y,) = lora_group_torch(x, (weight,), (bias,), (lora_A,), (lora_B,), (scaling,), dropout_p, seed,
                            recompute_input)
    return y
