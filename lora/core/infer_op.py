"""The LoRA forward when no gradient is wanted (generation, evaluation): plain tensor ops, no autograd
Function, nothing saved, nothing concatenated or sliced per call.

    y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ
        x: (M, in)   W: (out, in)   A = lora_A: (r, in)   B = lora_B: (out, r)

Three ops: the base `F.linear` (the merged model's own call), the shrink S = x Aᵀ (M, r), and the
expand folded into y by `addmm_` with alpha = scaling (BLAS's beta = 1: y is not read and written a
second time, and scaling multiplies inside the GEMM instead of a pass over S).

Why a separate path: at decode sizes (M = 1–8 rows) the arithmetic of the adapter is ~5% of the
layer's at r = 16, but the training op (lora/core/op.py) pays per call for what only training needs:
an autograd Function's dispatch and bookkeeping, the shared-input group's cache key (lora/core/group.py),
the casts and the scale applied to S as its own pass. docs/infer.md has the profile and the measurements.

Bᵀ is kept as a contiguous (r, out) copy (and an adapter in another dtype than the compute dtype,
e.g. fp32 on a bf16 base, as a cast copy), made once and cached on the layer. The cache is checked
on every call against the parameter object, its version counter (bumped by every in-place write
through it: an optimizer step, `copy_` under no_grad, `load_adapter`) and its storage pointer (a
`.data = t` assignment); the copies cost r · (in + out) elements. Only an in-place write through
`.data` (`p.data.copy_(t)`) bypasses the version counter: call `drop_cast_cache(layer)` after one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def wants_fast_path(layer, x: torch.Tensor, dropout_p: float) -> bool:
    """True when `layer`'s forward on `x` needs no autograd graph and no dropout, over a dense base,
    and the layer is plain LoRA (a DoRA layer has a `lora_magnitude_vector`: another formula).
    Parameters are read from `_parameters` directly: this runs on every projection of every step."""
    if dropout_p != 0:
        return False
    params = layer._parameters
    if torch.is_grad_enabled() and (x.requires_grad or params["lora_A"].requires_grad
                                    or params["lora_B"].requires_grad):
        return False
    # An NF4Weight base is a submodule, not a parameter: it takes its own paths.
    return (isinstance(params.get("weight"), torch.Tensor) and params.get("lora_magnitude_vector") is None
            and not torch.is_autocast_enabled(x.device.type))      # autocast's casts: the general path


def _cached(layer, slot: str, param: torch.Tensor, dtype: torch.dtype, make):
    """make(param in `dtype`), computed once and kept on the layer until `param` changes: another
    tensor object, an in-place write (`_version`), or new storage (`data_ptr`, e.g. `.data = t`)."""
    entry = layer.__dict__.get(slot)
    if (entry is None or entry[0] is not param or entry[1] != param._version or entry[2] != param.data_ptr()
            or entry[3] != dtype):
        # The entry holds `param` itself, so its id and storage cannot be reused while the entry lives.
        entry = (param, param._version, param.data_ptr(), dtype, make(param.detach().to(dtype)))
        layer.__dict__[slot] = entry
    return entry[4]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def adapter_in(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), Bᵀ (r, out)) in `dtype`: A itself when it has that dtype (else a cached cast), and a
    cached contiguous copy of Bᵀ (the expand reads it row by row, not through a transposed view)."""
    params = layer._parameters
    A = params["lora_A"]
    if A.dtype != dtype:
        A = _cached(layer, "_infer_A", A, dtype, _same)
    return A, _cached(layer, "_infer_Bt", params["lora_B"], dtype, _transposed)


def drop_cast_cache(layer) -> None:
    """Forget the cached copies of `layer`'s adapter: after an in-place write through `.data`, or to
    free their memory."""
    layer.__dict__.pop("_infer_A", None)
    layer.__dict__.pop("_infer_Bt", None)


def lora_linear_infer(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ for x of shape (..., in), without autograd (see above)."""
    params = layer._parameters
    W, bias = params["weight"], params.get("bias")     # a missing bias is a plain None attribute
    if x.dtype != W.dtype:                       # as the plain op computes: in x's dtype
        W = W.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    A, Bt = adapter_in(layer, x.dtype)                                # (r, in), (r, out)
    x2 = x.reshape(-1, x.shape[-1])                                   # (M, in)
    y = F.linear(x2, W, bias)                                         # x Wᵀ + b  (M, out)
    y.addmm_(x2.mm(A.t()), Bt, alpha=layer.scaling)                  # += scaling · (x Aᵀ) Bᵀ
    return y.view(*x.shape[:-1], y.shape[-1])
