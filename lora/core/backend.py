"""Chooses how `LoRALinear` computes its forward, in one place:

- Triton's fused kernels on CUDA when they import (`set_backend("torch")` forces the plain op,
  `"triton"` forces the kernels);
- with no gradients wanted and no dropout (generation), plain ops without autograd (lora/core/infer_op.py);
- else the plain autograd Function (lora/core/op.py): one per projection, or one for q/k/v and one
  for gate/up when the layer belongs to a shared-input group (lora/core/group.py);
- in graph-safe mode (HPU, set by lora.runtime.device), dropout from the device RNG instead of a host seed,
  and the LoRA input always saved, never rebuilt from the autograd graph (lora/core/recompute.py).
Autocast is resolved here, as `nn.Linear` would: every input is cast to the autocast dtype.
A 4-bit base (NF4Weight) takes the plain op, its weight dequantized where used (lora/quant/), whenever
gradients are wanted: autograd then keeps only the packed weight. Without gradients (generation) on
the Triton path, decode sizes (M ≤ 16 rows) run the fused dequantize-and-multiply kernel, larger ones
the dequantize kernel and then the LoRA kernels.
A DoRA layer (lora/core/dora.py) takes `dora_forward`: the same choice of paths, one op per projection.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..quant.linear import base_linear
from ..quant.nf4 import NF4Weight
from .infer_op import lora_linear_infer, wants_fast_path
from .dora import dora_linear_graph_safe, dora_linear_torch
from .op import lora_linear_torch

_BACKEND = "auto"   # "auto" | "torch" | "triton"
_GRAPH_SAFE = False  # set by lora.runtime.device for HPU graphs / torch.compile: no host-side dropout seeds
_RECOMPUTE = True   # rebuild the LoRA input in backward when autograd keeps its factors (lora/core/recompute.py)


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA when available), 'torch' (always the plain path) or 'triton'."""
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def set_recompute_inputs(flag: bool) -> None:
    """True (default): where a LoRA input is a product whose factors the base's backward keeps anyway
    (RMSNorm's output for q/k/v and gate/up, act(g) ⊙ u for down), backward multiplies it again
    instead of the op keeping it: one elementwise pass per rebuilt input in backward, for almost no
    memory above the frozen base's. False: the op keeps the input (one activation per shared input)."""
    global _RECOMPUTE
    _RECOMPUTE = bool(flag)


def get_recompute_inputs() -> bool:
    return _RECOMPUTE


def set_graph_safe(flag: bool) -> None:
    """Graph capture (HPU Graphs, lazy mode, torch.compile) replays Python once: a dropout seed drawn
    on the host would be frozen into the graph. In graph-safe mode dropout uses the device's own RNG
    (`F.dropout`, which saves its mask) and nothing in the forward touches the host."""
    global _GRAPH_SAFE
    _GRAPH_SAFE = bool(flag)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run the base GEMM in, or None when autocast is off."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and weight.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return None


def _cast(x, weight, bias, lora_A, lora_B, dtype):
    """Inputs in the compute dtype: autocast's when on, else x's (an fp32 adapter on a bf16 model)."""
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype)


def uses_triton(x: torch.Tensor) -> bool:
    return _BACKEND == "triton" or (_BACKEND == "auto" and x.is_cuda and _triton_available())


def lora_forward(layer, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """`layer`'s LoRA output for `x` by the path that fits (see the module docstring)."""
    if wants_fast_path(layer, x, dropout_p) and not uses_triton(x):    # no gradients: lora/core/infer_op.py
        return lora_linear_infer(layer, x)
    group = layer.group
    if (group is not None and group.active(x) and not uses_triton(x)
            and not (dropout_p > 0 and _GRAPH_SAFE)):     # the group draws a host-side seed
        return grouped_lora_linear(group, layer, x, dropout_p)
    return lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, with autocast honoured like `nn.Linear` does."""
    dtype = _compute_dtype(x, weight)
    args = _cast(x, weight, bias, lora_A, lora_B, dtype)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if uses_triton(x) and not isinstance(weight, NF4Weight):
            from ..kernels import lora_linear as lora_linear_triton
            return lora_linear_triton(*args, scaling, dropout_p, recompute_input=_RECOMPUTE and not _GRAPH_SAFE)
        if uses_triton(x) and not (torch.is_grad_enabled() and any(t.requires_grad for t in args)):
            return _nf4_lora_linear_triton(*args, scaling, dropout_p)       # a 4-bit base, no gradients
        if _GRAPH_SAFE and dropout_p > 0:
            return _lora_linear_graph_safe(*args, scaling, dropout_p)
        return lora_linear_torch(*args, scaling, dropout_p, recompute_input=_RECOMPUTE and not _GRAPH_SAFE)


def dora_forward(layer, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """A DoRA layer's output (lora/core/dora.py): n = ‖W + s·B A‖_row by the factored norm, detached, then
    the fused kernel (`kernels.dora_linear`), the graph-safe plain ops, or the plain autograd Function.
    One op per projection: DoRA layers take no shared-input group."""
    norm = layer.dora_norm(cache=not _GRAPH_SAFE)                          # (out,) fp32, no grad
    dtype = _compute_dtype(x, layer.weight)
    x, weight, bias, lora_A, lora_B = _cast(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, dtype)
    magnitude = layer.lora_magnitude_vector.to(x.dtype)
    args = (x, weight, bias, lora_A, lora_B, magnitude, norm, layer.scaling, dropout_p)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if uses_triton(x) and not isinstance(weight, NF4Weight):
            from ..kernels import dora_linear
            return dora_linear(*args, recompute_input=_RECOMPUTE and not _GRAPH_SAFE)
        if _GRAPH_SAFE:
            return dora_linear_graph_safe(*args)
        return dora_linear_torch(*args, recompute_input=_RECOMPUTE)


def _nf4_lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Inference over an NF4 base on the kernels: the fused dequantize-and-multiply for M ≤ 16 rows plus
    the LoRA term by two small GEMMs; else the weight dequantized by its kernel for the LoRA kernels."""
    from .. import kernels
    x2 = x.reshape(-1, x.shape[-1])                                            # (M, in)
    if x2.shape[0] <= kernels.nf4_matmul_max_rows and dropout_p == 0:
        y = kernels.nf4_matmul(x2, weight, bias)                               # x Wᵀ + b  (M, out)
        y = torch.addmm(y, torch.mm(x2, lora_A.t()), lora_B.t(), alpha=scaling)
        return y.view(*x.shape[:-1], weight.shape[0])
    return kernels.lora_linear(x, kernels.nf4_dequantize(weight, x.dtype), bias, lora_A, lora_B, scaling, dropout_p)


def _lora_linear_graph_safe(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Plain autograd ops, dropout from the device RNG: capturable as one static graph."""
    xd = F.dropout(x, dropout_p, training=True)
    return torch.addmm(base_linear(x, weight, bias).flatten(0, -2), F.linear(xd, lora_A).flatten(0, -2),
                       lora_B.t(), alpha=scaling).view(*x.shape[:-1], weight.shape[0])


def grouped_lora_linear(group, member, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """`member`'s output through its shared-input group (plain PyTorch path; see lora/core/group.py)."""
    dtype = _compute_dtype(x, member.weight)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        return group.forward(member, x, dropout_p, lambda *t: _cast(*t, dtype), recompute_input=_RECOMPUTE and not _GRAPH_SAFE)


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        from .. import kernels      # lora.kernels (kernels/ at the repository root)
        _TRITON_OK = bool(kernels.AVAILABLE)
    return _TRITON_OK
