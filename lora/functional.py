"""The plain PyTorch LoRA op: a custom autograd Function with no saved copies.

    y  = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ          x: (M, in)  W: (out, in)  A: (r, in)  B: (out, r)

Forward: one base GEMM, one shrink S = dropout(x) Aᵀ (M, r), and the expand folded into the base
output with `addmm_` (BLAS's beta=1 epilogue: no extra pass over y, no temporary of y's size).
Backward with W frozen (no dW, no db):

    dS = s · dY B          (M, r)        dB = s · dYᵀ S        (out, r)
    dA = dSᵀ dropout(x)    (r, in)       dX = dY W + (dS A) ⊙ mask

Saved for backward: x (which autograd keeps anyway for the previous layer), S (M × r, tiny) and the
dropout seed. The mask is regenerated from the seed instead of storing dropout(x), which would cost one
activation-sized tensor per adapted projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_scale(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout multiplier (0 or 1/keep) for `like`, regenerated bit-identically from `seed`.

    Each element draws 16 random bits, four per 64-bit word of the generator (a quarter of the RNG
    calls of `bernoulli_`, which draws one per element and dominated the LoRA cost on CPU). So p is
    applied in steps of 1/65536: an element is dropped with probability k/65536, k = round(p·65536),
    and kept ones are scaled by 65536/(65536 − k), which keeps E[dropout(x)] = x exactly.
    """
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    n, k = like.numel(), round(p * 65536)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device, generator=g)
    bits = words.view(torch.int16)[:n].view(like.shape)      # uniform over [-32768, 32767]
    keep = bits >= k - 32768                                  # P(drop) = k / 65536
    return keep.to(like.dtype).mul_(65536 / (65536 - k))


def new_seed() -> int:
    """A dropout seed drawn from torch's global CPU generator (so `torch.manual_seed` governs it and a
    checkpointed RNG state reproduces it). CPU only: no device synchronisation."""
    return int(torch.randint(0, 2**62, (1,)).item())


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
        in_features, out_features = weight.shape[1], weight.shape[0]
        y = F.linear(x, weight, bias)                             # (..., out): the base, bit for bit
        x2 = x.reshape(-1, in_features)                           # (M, in)
        xd = x2 * dropout_scale(x2, dropout_p, seed) if dropout_p > 0 else x2
        S = xd @ lora_A.t()                                       # (M, r)
        y.view(-1, out_features).addmm_(S, lora_B.t(), alpha=scaling)   # y += s · S Bᵀ in place
        ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dY):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        out_features, in_features = weight.shape
        dY2 = dY.reshape(-1, out_features)                       # (M, out)
        dS = torch.mm(dY2, lora_B).mul_(s)                        # (M, r)
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dX = dA = dB = None
        if need_B:
            dB = torch.mm(dY2.t(), S).mul_(s)                     # (out, r)
        mask = None
        if p > 0 and (need_A or need_x):
            mask = dropout_scale(x.reshape(-1, in_features), p, ctx.seed)
        if need_A:
            x2 = x.reshape(-1, in_features)
            dA = torch.mm(dS.t(), x2 * mask if mask is not None else x2)   # (r, in)
        if need_x:
            dX = torch.mm(dY2, weight)                            # (M, in)
            if mask is None:
                dX.addmm_(dS, lora_A)                             # dX += dS A, in the same pass
            else:
                dX.addcmul_(torch.mm(dS, lora_A), mask)
            dX = dX.view(x.shape)
        return dX, None, None, dA, dB, None, None, None


def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                      seed: int | None = None) -> torch.Tensor:
    """`y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ` for x of shape (..., in); grads to x, A, B only."""
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed or 0)
