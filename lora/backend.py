"""Chooses how `LoRALinear` computes its forward: fused Triton kernels or the plain PyTorch op.

The choice depends only on the device of the inputs (and on `set_backend`): Triton on CUDA when it
imports, the plain autograd Function everywhere else (CPU, HPU, CUDA without Triton).
"""
from __future__ import annotations

import torch

from .functional import lora_linear_torch

_BACKEND = "auto"   # "auto" | "torch" | "triton"


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA when available), 'torch' (always the plain path) or 'triton'."""
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run the base GEMM in, or None when autocast is off."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and weight.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, with autocast honoured like `nn.Linear` does."""
    dtype = _compute_dtype(x, weight)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _dispatch(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if lora_A.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return _dispatch(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


def _dispatch(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    if _BACKEND == "triton" or (_BACKEND == "auto" and x.is_cuda and _triton_available()):
        from .kernels import lora_linear as lora_linear_triton
        return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        from . import kernels
        _TRITON_OK = bool(kernels.AVAILABLE)
    return _TRITON_OK
