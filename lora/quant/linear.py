"""The frozen layer over an NF4 weight, and the model walk that puts it in place of every nn.Linear
but the output head (what bitsandbytes' 4-bit loading does; embeddings and norms stay as they are).

    y = x Wᵀ + b,   W = dequantize(NF4)   x: (..., in)   W: (out, in)   b: (out,)

The dequantized W lives only for its use: the forward's GEMM, and again in backward for dX = dY W.
Autograd keeps the packed weight, never a dense copy (saving x Wᵀ's W would undo the 4-bit saving).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4 import NF4Weight, quantize_nf4


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as a dense tensor in `dtype` for one use: itself when it is one (no copy, no cast),
    an NF4 weight dequantized."""
    return weight.dequantize(dtype) if isinstance(weight, NF4Weight) else weight


class NF4LinearFunction(torch.autograd.Function):
    """x Wᵀ + b over an NF4 W; the gradient goes to x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        ctx.weight = weight                                      # the packed weight: no activation-sized copy
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, dY):
        dX = torch.matmul(dY, ctx.weight.dequantize(dY.dtype)) if ctx.needs_input_grad[0] else None   # (..., in)
        return dX, None, None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b with W dequantized to the compute dtype (autocast's when on, as `nn.Linear`; else x's).
    Without gradients on the Triton path (lora/core/backend.py), by the NF4 kernels of lora.kernels."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, bias = x.to(dtype), (bias.to(dtype) if bias is not None else None)
    elif bias is not None:
        bias = bias.to(x.dtype)
    with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
        if not (torch.is_grad_enabled() and x.requires_grad):
            from ..core.backend import uses_triton              # here: lora.core imports this module
            if uses_triton(x):
                return _nf4_linear_triton(x, weight, bias)
        return NF4LinearFunction.apply(x, weight, bias)


def _nf4_linear_triton(x, weight, bias):
    from .. import kernels
    x2 = x.reshape(-1, x.shape[-1])                                            # (M, in)
    if x2.shape[0] <= kernels.nf4_matmul_max_rows:
        y = kernels.nf4_matmul(x2, weight, bias)                               # dequantized in the K loop
    else:
        y = F.linear(x2, kernels.nf4_dequantize(weight, x.dtype), bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class NF4Linear(nn.Linear):
    """A frozen `nn.Linear` whose `weight` is an NF4Weight (same name, so targets and checkpoint keys
    match). An nn.Linear subclass, so LoRA targeting ("all-linear", names) sees it as any Linear."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        del self.weight                                          # the Parameter slot, replaced by the module
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        return cls(quantize_nf4(linear.weight.detach(), block_size, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def base_linear(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """The frozen base alone: `F.linear` for a dense weight, `nf4_linear` for an NF4 one."""
    return nf4_linear(x, weight, bias) if isinstance(weight, NF4Weight) else F.linear(x, weight, bias)


def quantize_linears(model: nn.Module, skip: set[str] = frozenset(), block_size: int = 64,
                     double_quant: bool = True) -> nn.Module:
    """Every nn.Linear of `model` whose name is not in `skip` (the output head) replaced by an
    NF4Linear, one at a time, in place."""
    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child) is nn.Linear and full not in skip:
                setattr(module, name, NF4Linear.from_linear(child, block_size, double_quant))
            else:
                walk(child, full + ".")
    walk(model, "")
    return model
