"""`dora_linear`: PEFT's DoRA forward as an autograd Function over the Triton LoRA kernels.

    n  = ‖W + s·B A‖_row         (N,)  computed by the caller, detached: a constant in backward
    g  = m / n                   (N,)  fp32; m = lora_magnitude_vector, trainable
    xd = dropout(x)              (M, K) (x itself when p = 0)
    u  = xd Wᵀ + s · (xd Aᵀ) Bᵀ                              (M, N)   what g multiplies
    y  = g ⊙ u + (x − xd) Wᵀ + b                            (M, N)
       = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b                          without dropout
       = x Wᵀ + b + (g − 1) ⊙ (xd Wᵀ) + g ⊙ s·(xd Aᵀ) Bᵀ      with dropout (PEFT's exact form: the base
                                                              term of the clean input, the magnitude
                                                              correction of the dropped one)
    x: (..., K)   W: (N, K) frozen   b: (N,) frozen or None   A: (r, K)   B: (N, r)   s = scaling

Forward, two launches: S = xd Aᵀ (shrink.py), then one concatenated-K GEMM (gemm.py) whose epilogue
applies the row scale g (and, with dropout, adds the second accumulator (x − xd) Wᵀ, summed in the
same K loop from the same loaded tiles of x and W) and writes y, plus u when m needs a gradient.
Backward, W, b frozen and n constant; dYg = dY ⊙ g (per column) is what flows into the base and LoRA
products, formed in-register as each kernel loads its dY tile:

    dS = s · dYg B,  dB = s · dYgᵀ S,  Σ_rows dY ⊙ u      one pass over dY (dy_pass.py)
    dm = Σ_rows dY ⊙ u / n                               (N,)
    dX = dYg W + dS A                                    (gemm.py, dY scaled by g along its reduction)
       = (dYg W + dS A) ⊙ mask + (dY W) ⊙ (1 − mask)      with dropout: two accumulators, one pass
    dA = dSᵀ xd                                          (grad_a.py, mask regenerated from the seed)

u is kept from the forward, not recomputed, and not derived from y. Recomputing it costs a whole
base GEMM (M·N·K: as much again as the forward's base GEMM, +50% of a frozen-base step's FLOPs), and
so does the other exact route, dm_j = (dYᵀ x)_j · W_j + s (dYᵀ S)_j · B_j, which needs dYᵀ x (N, K).
y cannot give u back: with dropout y also holds (x − xd) Wᵀ, and without it u = (y − b) / g fails
where g = 0 and adds y's rounding relative to b. Keeping u costs one (M, N) tensor in x's dtype,
written by the GEMM's epilogue and read once by the dY pass; it is kept only when m needs a
gradient. (PEFT keeps two tensors of that size for the same gradient: the base and LoRA outputs.)
Also saved: x (or the recipe that rebuilds it, lora/core/recompute.py), S (M × r), g (N,), n (N,)
and the dropout seed; W, A, B by reference.
"""
from __future__ import annotations

import torch

from lora.core.op import input_recipe    # absolute: this package may be imported as `kernels`
from lora.core.recompute import recompute
from lora.runtime.seed import new_seed
from . import launch
from .autograd import _check
from .dy_pass import dora_dy_pass
from .gemm import dora_gemm
from .grad_a import grad_a
from .shrink import shrink


class DoRALinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling: float,
                dropout_p: float, seed: int, recipe=None):
        N, K = weight.shape
        x2 = x.reshape(-1, K)                                     # (M, K): a view unless x's layout forbids
        g = magnitude.detach().float() / weight_norm.detach().float()              # (N,)
        S = shrink(x2, lora_A, dropout_p, seed)                   # (M, r) = xd Aᵀ
        need_m = ctx.needs_input_grad[5]
        u = launch.empty_output((x2.shape[0], N), x.dtype, x.device) if need_m else None
        y = dora_gemm(x2, weight.t(), S, lora_B.t(), scaling, bias, g, dropout_p, seed, False, u)  # (M, N)
        ctx.save_for_backward(None if recipe else x2, weight, lora_A, lora_B, S, g, weight_norm, u)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape, ctx.x_dtype = scaling, dropout_p, seed, x.shape, x.dtype
        ctx.recipe, ctx.m_dtype = recipe, magnitude.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, S, g, weight_norm, u = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        need_x, need_A, need_B, need_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        dy2 = dy.reshape(-1, weight.shape[0])                     # (M, N)
        dX = dA = dB = dm = None
        if need_x or need_A or need_B or need_m:
            dS, dB32, dyu = dora_dy_pass(dy2, lora_B, S, s, g, u if need_m else None)   # (M, r), (N, r), (N,)
            if need_B:
                dB = dB32.to(lora_B.dtype)
            if need_m:
                dm = (dyu / weight_norm.float()).to(ctx.m_dtype)
            if need_x:                                            # dS carries s and g
                dX = dora_gemm(dy2, weight, dS, lora_A, 1.0, None, g, p, seed, True).view(ctx.x_shape)
            if need_A:
                if ctx.recipe:                                    # x multiplied again; grad_a drops it
                    x2 = recompute(ctx.recipe, ctx.x_shape, ctx.x_dtype).reshape(-1, weight.shape[1])
                dA = grad_a(dS, x2, p, seed)                      # (r, K)
        return dX, None, None, dA, dB, dm, None, None, None, None, None


def _check_magnitude(weight, magnitude, weight_norm) -> None:
    err = launch.InputError
    N = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("weight_norm", weight_norm)):
        if t.shape != (N,):
            raise err(f"lora.kernels: {name} must have shape ({N},) (one value per output feature), "
                      f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise err(f"lora.kernels: {name} must be a floating-point tensor, got {t.dtype}")
    if torch.is_grad_enabled() and weight_norm.requires_grad:
        raise err("lora.kernels treats the DoRA weight norm as a constant (DoRA §4.3): pass it detached")
    launch.check_device(magnitude, weight_norm)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, weight_norm: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, recompute_input: bool = True, seed: int | None = None) -> torch.Tensor:
    """PEFT's DoRA layer output for x (..., in); gradients to x, lora_A, lora_B and magnitude.

    y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b without dropout, x Wᵀ + b + (g − 1) ⊙ (xd Wᵀ) + g ⊙ s·(xd Aᵀ) Bᵀ
    with it (xd = dropout(x)), g = magnitude / weight_norm (N,), weight_norm = ‖W + s·B A‖_row
    detached. x, weight, lora_A, lora_B in one dtype (fp32, bf16 or fp16), fp32 accumulation;
    magnitude and weight_norm of any float dtype (g is formed in fp32; dm comes back in magnitude's).
    `seed` fixes the dropout mask (drawn from torch's generator when None and dropout_p > 0).
    `recompute_input`: multiply x again in backward instead of saving it, when autograd keeps its
    factors anyway (lora/core/recompute.py)."""
    _check(x, weight, bias, lora_A, lora_B, dropout_p)
    _check_magnitude(weight, magnitude, weight_norm)
    if x.numel() == 0:       # no rows: nothing to launch; keep autograd's graph through x, A, B, m
        g = (magnitude / weight_norm.detach()).to(x.dtype)
        y = g * (x @ weight.t() + scaling * (x @ lora_A.t()) @ lora_B.t())
        return y + bias if bias is not None else y
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    recipe = input_recipe(x, lora_A.requires_grad, recompute_input)
    return DoRALinearTriton.apply(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, float(scaling),
                                  float(dropout_p), int(seed or 0), recipe)
