"""The concatenated-K GEMM: one output tile, one fp32 accumulator, one write.

    C = X Wt + scaling · (S Bt) ⊙ mask + bias
    X: (M, K)   Wt: (K, N)   S: (M, R)   Bt: (R, N)   mask, C: (M, N)   bias: (N,)

The LoRA term costs R more steps of the reduction (R ≤ 256 against K in the thousands), not another
pass over C. The accumulator starts from the LoRA term (scaled, and masked when asked) and the K loop
of the base GEMM runs on top of it; the bias is added in the epilogue.

Used twice by `lora_linear`:
  forward   y  = x Wᵀ + s · S Bᵀ + b          Wt = Wᵀ, Bt = lora_Bᵀ (strides, no copies)
  backward  dX = dY W + (dS A) ⊙ mask        Wt = W,  Bt = lora_A, scaling = 1 (dS carries s)

DoRA (kernels/dora.py) adds options, each a constexpr that is off for LoRA (so LoRA compiles to the
kernel above). With g = m / ‖W + s·B A‖_row (N,) and xd = x ⊙ mask_x:
  COL_SCALE  forward    y = g ⊙ acc + b, the row scale in the epilogue
  STORE_U    forward    u = acc before the scale (M, N), kept for dm
  DROP_X     forward    acc from xd, a second accumulator from x − xd:  y = g ⊙ u + (x − xd) Wᵀ + b
  K_SCALE    backward   dY ⊙ g along the reduction (dX = (dY ⊙ g) W + dS A)
  DROP_C     backward   acc ⊙ mask + (dY W) ⊙ (1 − mask), the second accumulator from unscaled dY
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .dropout import keep_scale
from .mma import mma


@triton.jit(do_not_specialize=["seed"])
def _gemm_kernel(
    # pointers: X (M, K), Wt (K, N), S (M, R), Bt (R, N), bias (N,), C (M, N);
    # DoRA: col (N,) fp32, kscale (K,) fp32, U (M, N) with C's strides
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, c_ptr, col_ptr, kscale_ptr, u_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_sm, stride_sr,
    stride_br, stride_bn,
    stride_cm, stride_cn,
    # LoRA scale, dropout mask over C's (M, N) elements, and the autotune key
    scaling, dropout_p, seed, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COL_SCALE: tl.constexpr, STORE_U: tl.constexpr, DROP_X: tl.constexpr,
    K_SCALE: tl.constexpr, DROP_C: tl.constexpr,
):
    # Grouped launch order: GROUP_M row-tiles share each column strip of Wt while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # (BLOCK_M,)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)   # (BLOCK_N,)
    row_ok, col_ok = rows < M, cols < N
    # Ragged edge tiles load wrapped-around rows/columns (valid memory, results never stored), so the
    # loads need no row/column predicates; only the store is masked.
    rows_ld, cols_ld = rows % M, cols % N

    # LoRA steps of the reduction: acc = S Bt over R, R ≤ 256, padded to BLOCK_R by masks.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rank_ok = ranks < R
        s = tl.load(s_ptr + rows_ld[:, None] * stride_sm + ranks[None, :] * stride_sr,
                    mask=rank_ok[None, :], other=0.0)                            # (BLOCK_M, BLOCK_R)
        b = tl.load(b_ptr + ranks[:, None] * stride_br + cols_ld[None, :] * stride_bn,
                    mask=rank_ok[:, None], other=0.0)                            # (BLOCK_R, BLOCK_N)
        acc = mma(s, b, acc, DOT_PRECISION, UPCAST)
    acc = acc * scaling
    if HAS_DROPOUT:   # dX's LoRA part: d(dropout(x))/dx is the same mask the forward used
        acc = acc * keep_scale(seed, rows, cols, N, dropout_p)

    # Base steps of the reduction, on top: acc += X Wt over K. DoRA's dropout forms also sum a second
    # product, acc2, from the same loaded tiles (two dots per step: PEFT's form runs two base GEMMs).
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = x_ptr + rows_ld[:, None] * stride_xm + ks[None, :] * stride_xk     # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols_ld[None, :] * stride_wn     # (BLOCK_K, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if DROP_X:        # DoRA forward: acc from xd = x ⊙ mask_x (the shrink's mask), acc2 from x − xd
            xf = x.to(tl.float32)
            xd = xf * keep_scale(seed, rows, k0 + ks, K, dropout_p)                 # (BLOCK_M, BLOCK_K)
            acc2 = mma((xf - xd).to(x.dtype), w, acc2, DOT_PRECISION, UPCAST)
            x = xd.to(x.dtype)
        if K_SCALE:       # DoRA dX: X = dY, scaled by g along the reduction (N of the forward)
            if DROP_C:
                acc2 = mma(x, w, acc2, DOT_PRECISION, UPCAST)
            if EVEN_K:
                kscale = tl.load(kscale_ptr + k0 + ks)
            else:
                kscale = tl.load(kscale_ptr + k0 + ks, mask=k_ok, other=0.0)          # (BLOCK_K,)
            x = (x.to(tl.float32) * kscale[None, :]).to(x.dtype)
        acc = mma(x, w, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    out_ok = row_ok[:, None] & col_ok[None, :]
    if STORE_U:
        tl.store(u_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                 acc.to(u_ptr.dtype.element_ty), mask=out_ok)
    if COL_SCALE:
        acc = acc * tl.load(col_ptr + cols_ld)[None, :]
    if DROP_X:
        acc += acc2
    if DROP_C:        # dX = (dY g W + dS A) ⊙ mask + (dY W) ⊙ (1 − mask), mask over C's (M, N)
        mask_c = keep_scale(seed, rows, cols, N, dropout_p)
        acc = acc * mask_c + acc2 * (1.0 - mask_c)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_ld).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_ok)


# Autotune table for H100, per M bucket: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps).
_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_TABLE = {
    16: [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 3, 4), (16, 256, 64, 4, 4)],
    64: [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (32, 128, 128, 4, 4), (64, 256, 64, 3, 8)],
    256: [(64, 128, 64, 4, 4), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8), (128, 64, 64, 4, 4)],
    512: [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 3, 4),
          (64, 256, 64, 4, 4), (128, 256, 32, 4, 8)],
}
_FIXED = dict(GROUP_M=8)
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)

_gemm = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemm_kernel)
_gemm_tuned = triton.autotune(
    configs=launch.configs_from(_TABLE, _NAMES, **_FIXED),
    # stride_wk: forward (Wᵀ) and dX (W) tune apart; DoRA's dropout forms (two dots per step) too
    key=["M_BUCKET", "N", "K", "R", "stride_wk", "DROP_X", "DROP_C"],
    prune_configs_by={"early_config_prune": launch.bucket_pruner(_TABLE, _NAMES)},
)(_gemm)


def lora_gemm(x: torch.Tensor, wt: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, scaling: float,
              bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """C = x wt + scaling · (s bt) ⊙ mask(seed) + bias, in x's dtype with fp32 accumulation.

    x (M, K), wt (K, N), s (M, R), bt (R, N), bias (N,): any strides (pass transposed views)."""
    c = launch.empty_output((x.shape[0], wt.shape[1]), x.dtype, x.device)
    _run(c, x, wt, s, bt, scaling, bias, dropout_p, seed, HAS_DROPOUT=dropout_p > 0)
    return c


def dora_gemm(x: torch.Tensor, wt: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, scaling: float,
              bias: torch.Tensor | None, g: torch.Tensor, dropout_p: float, seed: int, backward: bool,
              u: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA's two uses of the kernel, g (fp32) the row scale m / ‖W + s·B A‖_row, mask(seed) the dropout
    multiplier (0 or 1/(1 − p)), xd = x ⊙ mask:

    forward   (x (M, K), wt = Wᵀ, s = S, bt = Bᵀ, g (N,)):
        u = xd wt + scaling · s bt        written into `u` (M, N) when given
        C = g ⊙ u + (x − xd) wt + bias    (x − xd = 0 without dropout: one GEMM)
    backward  (x = dY (M, K), wt = W, s = dS (carries s and g), bt = A, scaling = 1, g (K,)):
        C = ((x ⊙ g) wt + s bt) ⊙ mask + (x wt) ⊙ (1 − mask)     = (dY ⊙ g) W + dS A without dropout"""
    c = launch.empty_output((x.shape[0], wt.shape[1]), x.dtype, x.device)
    drop = dropout_p > 0
    if backward:
        _run(c, x, wt, s, bt, scaling, bias, dropout_p, seed, kscale=g, K_SCALE=True, DROP_C=drop)
    else:
        _run(c, x, wt, s, bt, scaling, bias, dropout_p, seed, col=g, u=u, COL_SCALE=True,
             STORE_U=u is not None, DROP_X=drop)
    return c


def _run(c, x, wt, s, bt, scaling, bias, dropout_p, seed, col=None, kscale=None, u=None, **flags) -> None:
    """Launch the kernel into c (M, N); flags: the constexpr options (off when not given). Unused
    pointers get c (never read: their constexpr is off)."""
    M, K = x.shape
    N = wt.shape[1]
    R = s.shape[1]
    BLOCK_R = launch.rank_block(R, cap=64)
    args = (x, wt, s, bt, bias if bias is not None else c, c,
            col if col is not None else c, kscale if kscale is not None else c, u if u is not None else c,
            M, N, K, R, *x.stride(), *wt.stride(), *s.stride(), *bt.stride(), *c.stride(),
            float(scaling), float(dropout_p), int(seed), launch.m_bucket(M))
    assert u is None or u.stride() == c.stride(), "u is written with C's strides"
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=False, COL_SCALE=False, STORE_U=False, DROP_X=False,
                K_SCALE=False, DROP_C=False, BLOCK_R=BLOCK_R, **launch.dot_meta(x.dtype))
    meta.update(flags)
    grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)  # noqa: E731
    launch.launch(_gemm, _gemm_tuned, grid, args, meta, M, _TABLE, _NAMES, _INTERPRET_CONFIG, _FIXED)
