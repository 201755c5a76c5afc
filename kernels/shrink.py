"""The shrink: S = dropout(x) Aᵀ.

    x: (M, K)   A = lora_A: (R, K)   S: (M, R)      reduction over K (4096 or 14336 for Llama-3-8B)

Each program owns a (BLOCK_M × BLOCK_R) tile of S and walks its share of K. With few rows (decode)
a single program per tile would walk all of K alone, so the K loop can be split over SPLIT_K
programs that write fp32 partial sums (summed afterwards: deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .dropout import keep_scale
from .mma import mma


@triton.jit(do_not_specialize=["seed"])
def _shrink_kernel(
    # pointers: x (M, K), lora_A (R, K), out (SPLIT_K, M, R)
    x_ptr, a_ptr, out_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_os, stride_om, stride_or,
    # dropout on x, and the autotune key
    dropout_p, seed, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)     # (BLOCK_M,)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)    # (BLOCK_R,)
    row_ok, rank_ok = rows < M, ranks < R

    # This program's share of K: whole BLOCK_K steps, so only the last tile of K can be ragged.
    chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_s * chunk
    k_end = tl.minimum(k_start + chunk, K)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)                 # (BLOCK_K,)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk    # (BLOCK_M, BLOCK_K)
        a_ptrs = a_ptr + cols[:, None] * stride_ak + ranks[None, :] * stride_ar   # (BLOCK_K, BLOCK_R): Aᵀ
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=rank_ok[None, :], other=0.0)
        else:
            col_ok = cols < K
            x = tl.load(x_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * keep_scale(seed, rows, cols, K, dropout_p)).to(a.dtype)
        acc = mma(x, a, acc, DOT_PRECISION, UPCAST)

    out_ptrs = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


# Autotune table for H100, per M bucket: (BLOCK_M, BLOCK_K, num_stages, num_warps).
_NAMES = ("BLOCK_M", "BLOCK_K")
_TABLE = {
    16: [(16, 128, 4, 4), (16, 256, 3, 4), (16, 64, 4, 4)],
    64: [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 3, 4)],
    256: [(64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 4, 8)],
    512: [(64, 64, 4, 4), (128, 64, 4, 8), (64, 128, 3, 4), (128, 128, 3, 8)],
}
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_K=32)

_shrink = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_shrink_kernel)
_shrink_tuned = triton.autotune(
    configs=launch.configs_from(_TABLE, _NAMES), key=["M_BUCKET", "K", "R", "SPLIT_K"],
    prune_configs_by={"early_config_prune": launch.bucket_pruner(_TABLE, _NAMES)},
)(_shrink)


def auto_split_k(M: int, K: int) -> int:
    """Split K only when rows alone give few programs (decode): aim for ~64 programs, ≥ 512 K each."""
    programs = triton.cdiv(M, 64)
    return max(1, min(16, K // 512, 64 // programs))


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
           split_k: int | None = None) -> torch.Tensor:
    """S = dropout(x) Aᵀ: x (M, K), lora_A (R, K) -> S (M, R) in x's dtype, fp32 accumulation."""
    M, K = x.shape
    R = lora_A.shape[0]
    split_k = split_k or auto_split_k(M, K)
    if split_k == 1:
        out = launch.empty_output((1, M, R), x.dtype, x.device)
    else:
        out = launch.empty_output((split_k, M, R), torch.float32, x.device)
    BLOCK_R = launch.rank_block(R, cap=128)
    args = (x, lora_A, out, M, K, R, *x.stride(), *lora_A.stride(), *out.stride(),
            float(dropout_p), int(seed), launch.m_bucket(M))
    meta = dict(HAS_DROPOUT=dropout_p > 0, SPLIT_K=split_k, BLOCK_R=BLOCK_R, **launch.dot_meta(x.dtype))
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, BLOCK_R), split_k)  # noqa: E731
    launch.launch(_shrink, _shrink_tuned, grid, args, meta, M, _TABLE, _NAMES, _INTERPRET_CONFIG)
    if split_k == 1:
        return out[0]
    return out.sum(0).to(x.dtype)
