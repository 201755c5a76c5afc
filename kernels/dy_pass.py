"""The backward's one pass over dY: both LoRA products that read dY, from the same loaded tiles.

    dS = s · dY B      (M, R)      reduction over N, complete inside one program
    dB = s · dYᵀ S     (N, R)      reduction over M, summed across programs with fp32 atomics

    dY: (M, N)   B = lora_B: (N, R)   S: (M, R) saved by the forward

Each program owns BLOCK_M rows of dY and one BLOCK_R slice of the rank, and walks all of N: every
dY tile is loaded once and feeds both dots. dB's partial sums from different row blocks meet in a
zeroed fp32 buffer (atomic adds: the summation order, so the last bits of dB, can vary run to run).

DoRA (kernels/dora.py) adds two options, constexprs that are off for LoRA:
  COL_SCALE   dY ⊙ g per column before both dots (g = m / ‖W + s·B A‖_row, fp32 (N,)): dS, dB of DoRA
  GRAD_M      Σ_rows dY ⊙ u (N,), fp32 atomics, from the unscaled dY tile and the forward's u (M, N):
              dm = that / ‖·‖. Programs of the first rank block add it (the others would repeat it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .mma import mma


@triton.jit
def _dy_pass_kernel(
    # pointers: dY (M, N), lora_B (N, R), S (M, R), dS (M, R), dB (N, R) fp32 zeroed;
    # DoRA: g (N,) fp32, U (M, N), dYU (N,) fp32 zeroed
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, g_ptr, u_ptr, dyu_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dsm, stride_dsr,
    stride_dbn, stride_dbr,
    stride_um, stride_un,
    # LoRA scale and the autotune key
    scaling, M_BUCKET,
    EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COL_SCALE: tl.constexpr, GRAD_M: tl.constexpr,
):
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)      # (BLOCK_M,)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)     # (BLOCK_R,)
    row_ok, rank_ok = rows < M, ranks < R

    s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)              # (BLOCK_M, BLOCK_R)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)                         # (BLOCK_N,)
        dy_ptrs = dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn
        b_ptrs = b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br
        col_ok = cols < N
        if EVEN_N:
            dy = tl.load(dy_ptrs, mask=row_ok[:, None], other=0.0)             # (BLOCK_M, BLOCK_N)
            b = tl.load(b_ptrs, mask=rank_ok[None, :], other=0.0)              # (BLOCK_N, BLOCK_R)
        else:
            dy = tl.load(dy_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        if GRAD_M:
            if pid_r == 0:
                u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_un,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)            # (BLOCK_M, BLOCK_N)
                tl.atomic_add(dyu_ptr + cols, tl.sum(dy.to(tl.float32) * u.to(tl.float32), axis=0),
                              mask=col_ok)
        if COL_SCALE:
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)                             # (BLOCK_N,)
            dy = (dy.to(tl.float32) * g[None, :]).to(dy.dtype)
        ds = mma(dy, b, ds, DOT_PRECISION, UPCAST)                              # dY B
        db = mma(tl.trans(dy), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                 DOT_PRECISION, UPCAST)                                         # dYᵀ S, this row block
        tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + ranks[None, :] * stride_dbr, db * scaling,
                      mask=col_ok[:, None] & rank_ok[None, :])

    tl.store(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
             (ds * scaling).to(ds_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


# Autotune table for H100, per M bucket: (BLOCK_M, BLOCK_N, num_stages, num_warps).
_NAMES = ("BLOCK_M", "BLOCK_N")
_TABLE = {
    16: [(16, 128, 4, 4), (16, 256, 3, 4), (16, 64, 4, 4)],
    64: [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 3, 4)],
    256: [(64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 4, 8)],
    512: [(64, 64, 4, 4), (128, 64, 4, 8), (64, 128, 3, 8), (128, 128, 3, 8)],
}
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)

_dy_pass = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(_dy_pass_kernel)
_dy_pass_tuned = triton.autotune(
    configs=launch.configs_from(_TABLE, _NAMES), key=["M_BUCKET", "N", "R", "GRAD_M"],
    prune_configs_by={"early_config_prune": launch.bucket_pruner(_TABLE, _NAMES)},
    reset_to_zero=["db_ptr", "dyu_ptr"],     # each timed config adds into them: start every one from zero
)(_dy_pass)


def dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s · dY B (M, R) in dY's dtype, and dB = s · dYᵀ S (N, R) in fp32.

    dy (M, N), lora_B (N, R), S (M, R): any strides (dY from autograd may be expanded, stride 0)."""
    ds, db, _ = _run(dy, lora_B, S, scaling, None, None)
    return ds, db


def dora_dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scaling: float, g: torch.Tensor,
                 u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DoRA: dS = s · (dY ⊙ g) B (M, R) in dY's dtype, dB = s · (dY ⊙ g)ᵀ S (N, R) fp32, and
    Σ_rows dY ⊙ u (N,) fp32 when u (M, N) is given (None otherwise). g: (N,) fp32."""
    return _run(dy, lora_B, S, scaling, g, u)


def _run(dy, lora_B, S, scaling, g, u):
    M, N = dy.shape
    R = S.shape[1]
    ds = launch.empty_output((M, R), dy.dtype, dy.device)
    db = torch.zeros((N, R), dtype=torch.float32, device=dy.device)     # atomics need zeros
    dyu = torch.zeros((N,), dtype=torch.float32, device=dy.device) if u is not None else None
    BLOCK_R = launch.rank_block(R, cap=128)
    args = (dy, lora_B, S, ds, db, g if g is not None else db, u if u is not None else db,
            dyu if dyu is not None else db, M, N, R, *dy.stride(), *lora_B.stride(), *S.stride(), *ds.stride(),
            *db.stride(), *(u.stride() if u is not None else (0, 0)), float(scaling), launch.m_bucket(M))
    meta = dict(BLOCK_R=BLOCK_R, COL_SCALE=g is not None, GRAD_M=u is not None, **launch.dot_meta(dy.dtype))
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, BLOCK_R))  # noqa: E731
    launch.launch(_dy_pass, _dy_pass_tuned, grid, args, meta, M, _TABLE, _NAMES, _INTERPRET_CONFIG)
    return ds, db, dyu
