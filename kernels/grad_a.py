"""dA = dSᵀ dropout(x): the gradient of lora_A, with the forward's mask regenerated from its seed.

    dS: (M, R)   x: (M, K)   dA: (R, K)      reduction over M (the tokens: 8192 in training)

Each program owns a (BLOCK_R × BLOCK_K) tile of dA and walks its share of M. Few columns give few
programs, so M can be split over SPLIT_M programs writing fp32 partial sums (summed afterwards:
deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .dropout import keep_scale
from .mma import mma


@triton.jit(do_not_specialize=["seed"])
def _grad_a_kernel(
    # pointers: dS (M, R), x (M, K), out (SPLIT_M, R, K)
    ds_ptr, x_ptr, out_ptr,
    # sizes
    M, K, R,
    # strides
    stride_dsm, stride_dsr,
    stride_xm, stride_xk,
    stride_os, stride_or, stride_ok,
    # dropout on x (the forward's mask), and the autotune key
    dropout_p, seed, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)      # (BLOCK_K,)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)     # (BLOCK_R,)
    col_ok, rank_ok = cols < K, ranks < R

    # This program's share of M: whole BLOCK_M steps.
    chunk = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = pid_s * chunk
    m_end = tl.minimum(m_start + chunk, M)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)                       # (BLOCK_M,)
        row_ok = rows < M
        ds_t = tl.load(ds_ptr + ranks[:, None] * stride_dsr + rows[None, :] * stride_dsm,
                       mask=rank_ok[:, None] & row_ok[None, :], other=0.0)   # (BLOCK_R, BLOCK_M): dSᵀ
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)       # (BLOCK_M, BLOCK_K)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * keep_scale(seed, rows, cols, K, dropout_p)).to(ds_t.dtype)
        acc = mma(ds_t, x, acc, DOT_PRECISION, UPCAST)

    out_ptrs = out_ptr + pid_s * stride_os + ranks[:, None] * stride_or + cols[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rank_ok[:, None] & col_ok[None, :])


# Autotune table for H100, per M bucket: (BLOCK_M, BLOCK_K, num_stages, num_warps).
_NAMES = ("BLOCK_M", "BLOCK_K")
_LARGE = [(64, 64, 4, 4), (128, 64, 4, 8), (64, 128, 3, 4), (128, 128, 3, 8)]
_TABLE = {16: [(16, 64, 4, 4), (16, 128, 4, 4)], 64: [(32, 64, 4, 4), (64, 64, 4, 4), (32, 128, 4, 4)],
          256: _LARGE, 512: _LARGE}
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_K=32)

_grad_a_tuned = triton.autotune(
    configs=launch.configs_from(_TABLE, _NAMES), key=["M_BUCKET", "K", "R", "SPLIT_M"],
    prune_configs_by={"early_config_prune": launch.bucket_pruner(_TABLE, _NAMES)},
)(_grad_a_kernel)


def auto_split_m(M: int, K: int) -> int:
    """Split the token reduction when K alone gives few programs: aim for ~128, ≥ 512 rows each."""
    programs = triton.cdiv(K, 64)
    return max(1, min(16, M // 512, 128 // programs))


def grad_a(ds: torch.Tensor, x: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
           split_m: int | None = None) -> torch.Tensor:
    """dA = dSᵀ dropout(x): ds (M, R), x (M, K) -> (R, K) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    R = ds.shape[1]
    split_m = split_m or auto_split_m(M, K)
    if split_m == 1:
        out = launch.empty_output((1, R, K), x.dtype, x.device)
    else:
        out = launch.empty_output((split_m, R, K), torch.float32, x.device)
    BLOCK_R = launch.rank_block(R, cap=128)
    args = (ds, x, out, M, K, R, *ds.stride(), *x.stride(), *out.stride(),
            float(dropout_p), int(seed), launch.m_bucket(M))
    meta = dict(HAS_DROPOUT=dropout_p > 0, SPLIT_M=split_m, BLOCK_R=BLOCK_R, **launch.dot_meta(x.dtype))
    grid = lambda cfg: (triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(R, BLOCK_R), split_m)  # noqa: E731
    launch.launch(_grad_a_kernel, _grad_a_tuned, grid, args, meta, M, _TABLE, _NAMES, _INTERPRET_CONFIG)
    if split_m == 1:
        return out[0]
    return out.sum(0).to(x.dtype)
