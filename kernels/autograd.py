"""`lora_linear`: the fused LoRA linear as an autograd Function over the Triton kernels.

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ       x: (..., K)  W: (N, K)  A: (r, K)  B: (N, r)

Forward, two launches:  S = dropout(x) Aᵀ (shrink.py), then y = x Wᵀ + s · S Bᵀ + b (gemm.py: one
accumulator, one write of y). At decode sizes the shrink splits K and sums its fp32 partials (M × r).
Backward, W and b frozen, three launches:
    dS = s · dY B, dB = s · dYᵀ S        one pass over dY (dy_pass.py)
    dX = dY W + (dS A) ⊙ mask            one concatenated-K GEMM (gemm.py)
    dA = dSᵀ dropout(x)                  (grad_a.py)
Saved for backward: x, S (M × r) and the dropout seed; W, A, B are parameters, saved by reference.
The mask is regenerated, never stored. When x is a product whose factors the base's backward keeps
anyway (RMSNorm's output, act(g) ⊙ u: lora/core/recompute.py), x is not saved but multiplied again in
backward, as on the plain path.
"""
from __future__ import annotations

import torch

from lora.core.op import input_recipe    # absolute: this package may be imported as `kernels`
from lora.core.recompute import recompute
from lora.runtime.seed import new_seed
from . import launch
from .dy_pass import dy_pass
from .gemm import lora_gemm
from .grad_a import grad_a
from .shrink import shrink


class LoRALinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, recipe=None):
        N, K = weight.shape
        x2 = x.reshape(-1, K)                                     # (M, K): a view unless x's layout forbids
        S = shrink(x2, lora_A, dropout_p, seed)                   # (M, r)
        y = lora_gemm(x2, weight.t(), S, lora_B.t(), scaling, bias, 0.0, 0)   # (M, N)
        ctx.save_for_backward(None if recipe else x2, weight, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape, ctx.x_dtype = scaling, dropout_p, seed, x.shape, x.dtype
        ctx.recipe = recipe
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, S = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy2 = dy.reshape(-1, weight.shape[0])                     # (M, N)
        dX = dA = dB = None
        if need_x or need_A or need_B:
            dS, dB32 = dy_pass(dy2, lora_B, S, s)                 # (M, r) dy's dtype, (N, r) fp32
            if need_B:
                dB = dB32.to(lora_B.dtype)
            if need_x:                                            # dY W + (dS A) ⊙ mask, scaling already in dS
                dX = lora_gemm(dy2, weight, dS, lora_A, 1.0, None, p, seed).view(ctx.x_shape)
            if need_A:
                if ctx.recipe:                                    # x multiplied again; grad_a drops it
                    x2 = recompute(ctx.recipe, ctx.x_shape, ctx.x_dtype).reshape(-1, weight.shape[1])
                dA = grad_a(dS, x2, p, seed)                      # (r, K)
        return dX, None, None, dA, dB, None, None, None, None


def _check(x, weight, bias, lora_A, lora_B, dropout_p) -> None:
    err = launch.InputError
    if x.dtype not in launch.SUPPORTED_DTYPES:
        raise err(f"lora.kernels supports float32, bfloat16 and float16 inputs, got {x.dtype}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise err(f"lora.kernels needs {name} in x's dtype {x.dtype}, got {t.dtype} (cast it first)")
    N, K = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K or lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise err(f"lora.kernels: shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                  f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise err(f"lora.kernels: bias must have shape ({N},), got {tuple(bias.shape)}")
    if not 1 <= r <= launch.MAX_RANK:
        raise err(f"lora.kernels supports ranks 1..{launch.MAX_RANK}, got r={r}")
    if not 0.0 <= dropout_p < 1.0:
        raise err(f"lora.kernels: dropout_p must be in [0, 1), got {dropout_p}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise err("lora.kernels computes no gradient for the frozen weight and bias: "
                  "set requires_grad=False on them (LoRALinear does)")
    launch.check_device(*(t for t in (x, weight, bias, lora_A, lora_B) if t is not None))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: int | None = None,
                recompute_input: bool = True) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ for x (..., in); gradients to x, lora_A, lora_B.

    All of x, weight, lora_A, lora_B in one dtype (fp32, bf16 or fp16); accumulation in fp32.
    `seed` fixes the dropout mask (drawn from torch's generator when None and dropout_p > 0).
    `recompute_input`: multiply x again in backward instead of saving it, when autograd keeps its
    factors anyway (lora/core/recompute.py)."""
    _check(x, weight, bias, lora_A, lora_B, dropout_p)
    if x.numel() == 0:       # no rows: nothing to launch; keep autograd's graph through x and A, B
        return x @ weight.t() + (x @ lora_A.t()) @ lora_B.t() + (bias if bias is not None else 0)
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    recipe = input_recipe(x, lora_A.requires_grad, recompute_input)
    return LoRALinearTriton.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                  int(seed or 0), recipe)
