"""Many adapters in one batch: shrink and expand over stacked adapters, the adapter chosen per row
(decode, Punica's BGMV) or per segment of consecutive rows (prefill, Punica's SGMV; vLLM's
`lora_shrink` / `lora_expand`).

    S[i] = s_k · x[i] A_kᵀ        (M, R)      shrink, k = the adapter of row i, scaling applied here
    y[i] += S[i] B_kᵀ             (M, N)      expand, added into the base output in place
        x: (M, K)   lora_A: (n, R, K)   lora_Bt: (n, R, N) (B_kᵀ stacked)   scalings: (n,) fp32

R is the largest rank: smaller adapters are zero-padded (lora/serving/load.py), and zero rows of A
and of Bᵀ add nothing. A row whose adapter is -1 is neither read nor written (y keeps the base
output bit for bit; its S row is never written).

Per-segment (prefill): a segment is a run of rows with one adapter (`seg_start`, `seg_len`,
`seg_adapter`), so each program multiplies one adapter's tiles with `tl.dot`; grid (segments, row
tiles, rank or output tiles). Per-row (decode, a handful of rows each with its own adapter): each
row gathers its own adapter's tile, so the product is an elementwise multiply and a sum over the
reduced axis in fp32, not a `tl.dot`; grid (row tiles, rank or output tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .mma import mma


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, s_ptr, seg_start_ptr, seg_len_ptr, seg_adapter_ptr, scale_ptr,
    K, R,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_sm, stride_sr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_g, pid_m, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = tl.load(seg_start_ptr + pid_g), tl.load(seg_len_ptr + pid_g)
    k_ad = tl.load(seg_adapter_ptr + pid_g).to(tl.int64)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (start + offs).to(tl.int64)                                    # (BLOCK_M,)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)        # (BLOCK_R,)
    row_ok, rank_ok = offs < length, ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)     # (BLOCK_M, BLOCK_K)
        a = tl.load(a_ptr + k_ad * stride_an + cols[:, None] * stride_ak + ranks[None, :] * stride_ar,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)   # (BLOCK_K, BLOCK_R): A_kᵀ
        acc = mma(x, a, acc, DOT_PRECISION, UPCAST)
    acc = acc * tl.load(scale_ptr + k_ad)
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(
    s_ptr, bt_ptr, y_ptr, seg_start_ptr, seg_len_ptr, seg_adapter_ptr,
    R, N,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bo, stride_ym, stride_yo,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_g, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = tl.load(seg_start_ptr + pid_g), tl.load(seg_len_ptr + pid_g)
    k_ad = tl.load(seg_adapter_ptr + pid_g).to(tl.int64)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (start + offs).to(tl.int64)
    outs = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok, out_ok = offs < length, outs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rank_ok = ranks < R
        s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)   # (BLOCK_M, BLOCK_R)
        bt = tl.load(bt_ptr + k_ad * stride_bn + ranks[:, None] * stride_br + outs[None, :] * stride_bo,
                     mask=rank_ok[:, None] & out_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = mma(s, bt, acc, DOT_PRECISION, UPCAST)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + outs[None, :] * stride_yo
    ok = row_ok[:, None] & out_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, s_ptr, idx_ptr, scale_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_sm, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ad = tl.load(idx_ptr + rows, mask=rows < M, other=-1).to(tl.int64)  # (BLOCK_M,) each row's adapter
    live, rank_ok = ad >= 0, ranks < R
    ad = tl.where(live, ad, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_M, BLOCK_K)
        a = tl.load(a_ptr + ad[:, None, None] * stride_an + ranks[None, :, None] * stride_ar
                    + cols[None, None, :] * stride_ak,
                    mask=live[:, None, None] & rank_ok[None, :, None] & col_ok[None, None, :],
                    other=0.0).to(tl.float32)                             # (BLOCK_M, BLOCK_R, BLOCK_K)
        acc += tl.sum(x[:, None, :] * a, axis=2)
    acc = acc * tl.load(scale_ptr + ad)[:, None]
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=live[:, None] & rank_ok[None, :])


@triton.jit
def _bgmv_expand_kernel(
    s_ptr, bt_ptr, y_ptr, idx_ptr,
    M, R, N,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bo, stride_ym, stride_yo,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    outs = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ad = tl.load(idx_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
    live, out_ok = ad >= 0, outs < N
    ad = tl.where(live, ad, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rank_ok = ranks < R
        s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                    mask=live[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)     # (BLOCK_M, BLOCK_R)
        bt = tl.load(bt_ptr + ad[:, None, None] * stride_bn + ranks[None, :, None] * stride_br
                     + outs[None, None, :] * stride_bo,
                     mask=live[:, None, None] & rank_ok[None, :, None] & out_ok[None, None, :],
                     other=0.0).to(tl.float32)                            # (BLOCK_M, BLOCK_R, BLOCK_N)
        acc += tl.sum(s[:, :, None] * bt, axis=1)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + outs[None, :] * stride_yo
    ok = live[:, None] & out_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ok)


# One config each: decode tiles are small by nature; prefill tiles as the single-adapter shrink's.
_SEG = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32)
_ROW = dict(BLOCK_M=4, BLOCK_K=32, BLOCK_N=32)


def segments(row_adapter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg_start, seg_len, seg_adapter) int32: the runs of consecutive rows sharing an adapter, in row
    order, runs of -1 (no adapter) left out. row_adapter: (M,) int."""
    ids = row_adapter.to(torch.int64)
    change = torch.ones_like(ids, dtype=torch.bool)
    change[1:] = ids[1:] != ids[:-1]
    starts = torch.nonzero(change).squeeze(1)                               # (runs,)
    lens = torch.diff(starts, append=torch.tensor([ids.numel()], device=ids.device))
    adapters = ids[starts]
    keep = adapters >= 0
    return starts[keep].to(torch.int32), lens[keep].to(torch.int32), adapters[keep].to(torch.int32)


def _check(x, lora_A, lora_Bt, scalings, y):
    launch.check_device(x, lora_A, lora_Bt, scalings, y)
    n, R, K = lora_A.shape
    if x.dim() != 2 or x.shape[1] != K or lora_Bt.shape[:2] != (n, R) or y.shape != (x.shape[0], lora_Bt.shape[2]):
        raise launch.InputError(f"shapes do not fit: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, "
                                f"lora_Bt {tuple(lora_Bt.shape)}, y {tuple(y.shape)}")
    if scalings.shape != (n,):
        raise launch.InputError(f"scalings must have one value per adapter ({n}), got {tuple(scalings.shape)}")


def sgmv_(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_Bt: torch.Tensor, scalings: torch.Tensor,
          seg_start: torch.Tensor, seg_len: torch.Tensor, seg_adapter: torch.Tensor, max_len: int) -> torch.Tensor:
    """y (M, N) += per segment g: s_k · (x[rows_g] A_kᵀ) B_kᵀ, k = seg_adapter[g]; returns y. max_len: the
    longest segment (sizes the grid)."""
    _check(x, lora_A, lora_Bt, scalings, y)
    n, R, K = lora_A.shape
    N, G = y.shape[1], seg_start.numel()
    if G == 0:
        return y
    S = launch.empty_output((x.shape[0], R), x.dtype, x.device)
    BR = launch.rank_block(R, cap=64)
    meta = launch.dot_meta(x.dtype)
    _sgmv_shrink_kernel[(G, triton.cdiv(max_len, _SEG["BLOCK_M"]), triton.cdiv(R, BR))](
        x, lora_A, S, seg_start, seg_len, seg_adapter, scalings, K, R,
        *x.stride(), *lora_A.stride(), *S.stride(), **meta,
        BLOCK_M=_SEG["BLOCK_M"], BLOCK_R=BR, BLOCK_K=_SEG["BLOCK_K"])
    _sgmv_expand_kernel[(G, triton.cdiv(max_len, _SEG["BLOCK_M"]), triton.cdiv(N, _SEG["BLOCK_N"]))](
        S, lora_Bt, y, seg_start, seg_len, seg_adapter, R, N,
        *S.stride(), *lora_Bt.stride(), *y.stride(), **meta,
        BLOCK_M=_SEG["BLOCK_M"], BLOCK_N=_SEG["BLOCK_N"], BLOCK_R=BR)
    return y


def bgmv_(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_Bt: torch.Tensor, scalings: torch.Tensor,
          row_adapter: torch.Tensor) -> torch.Tensor:
    """y (M, N) += per row i: s_k · (x[i] A_kᵀ) B_kᵀ, k = row_adapter[i] (-1: nothing); returns y."""
    _check(x, lora_A, lora_Bt, scalings, y)
    n, R, K = lora_A.shape
    M, N = y.shape
    if M == 0:
        return y
    S = launch.empty_output((M, R), x.dtype, x.device)
    BR = launch.rank_block(R, cap=64)
    _bgmv_shrink_kernel[(triton.cdiv(M, _ROW["BLOCK_M"]), triton.cdiv(R, BR))](
        x, lora_A, S, row_adapter, scalings, M, K, R, *x.stride(), *lora_A.stride(), *S.stride(),
        BLOCK_M=_ROW["BLOCK_M"], BLOCK_R=BR, BLOCK_K=_ROW["BLOCK_K"])
    _bgmv_expand_kernel[(triton.cdiv(M, _ROW["BLOCK_M"]), triton.cdiv(N, _ROW["BLOCK_N"]))](
        S, lora_Bt, y, row_adapter, M, R, N, *S.stride(), *lora_Bt.stride(), *y.stride(),
        BLOCK_M=_ROW["BLOCK_M"], BLOCK_N=_ROW["BLOCK_N"], BLOCK_R=BR)
    return y
