"""The decode-size base GEMM over an NF4 weight, dequantized inside the K loop: y = x Wᵀ + b.

    x: (M, K), M ≤ 16   W: (N, K) as NF4 (nf4_dequant.py's layout)   b: (N,)   y: (M, N)

At decode sizes the base GEMM is bound by reading W; reading 4-bit W (a quarter of bf16's bytes) and
never writing a dense copy is the point. Each program owns BLOCK_N output columns and walks K; each
(BLOCK_K × BLOCK_N) tile of Wᵀ is dequantized in registers, rounded to x's dtype (as the plain path
rounds its dense W), and multiplied with fp32 accumulation. The rows are padded to BLOCK_M = 16
(`tl.dot`'s smallest dimension) by masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .mma import mma
from .nf4_dequant import nf4_values, to_dtype, weight_args

MAX_M = 16


@triton.jit
def _nf4_matmul_kernel(
    # pointers: x (M, K), the NF4 weight's buffers, bias (N,), out (M, N)
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, code_ptr, offset_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M).to(tl.int64)                                   # (BLOCK_M,)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)    # (BLOCK_N,)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)                            # (BLOCK_K,)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)            # (BLOCK_M, BLOCK_K)
        idx = cols[None, :] * K + ks[:, None]                                   # (BLOCK_K, BLOCK_N): W[n, k], row-major
        w = nf4_values(idx, k_ok[:, None] & col_ok[None, :], packed_ptr, absmax_ptr, nested_absmax_ptr,
                       nested_map_ptr, code_ptr, offset_ptr, QBLOCK, NESTED, DOUBLE_QUANT)
        acc = mma(x, to_dtype(w, x.dtype), acc, DOT_PRECISION, UPCAST)          # acc += x Wᵀ tile
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def nf4_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
               block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """y = x Wᵀ + b for x (M, K) with M ≤ 16 and W an NF4Weight (N, K): (M, N) in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_M:
        raise launch.InputError(f"nf4_matmul is the decode-size GEMM: M ≤ {MAX_M} rows, got {M}")
    if weight.shape[1] != K:
        raise launch.InputError(f"x has {K} columns but the NF4 weight is {tuple(weight.shape)}")
    ptrs, meta = weight_args(weight)
    launch.check_device(x, *ptrs)
    out = launch.empty_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    fp = {} if launch.INTERPRET else dict(enable_fp_fusion=False)
    _nf4_matmul_kernel[(triton.cdiv(N, block_n),)](
        x, *ptrs, bias if bias is not None else x, out, M, N, K, *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, **meta, **launch.dot_meta(x.dtype),
        BLOCK_M=MAX_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **fp)
    return out
