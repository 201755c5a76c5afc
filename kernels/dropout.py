"""Dropout on the LoRA branch, regenerated from a seed instead of stored.

An element of x (M, K) at row m, column k is kept when `tl.rand(seed, m·K + k) ≥ p` (Philox keyed on
the element's *logical* offset, so the mask does not depend on x's memory layout or on the tile that
asks). The shrink (forward), the dA pass and the dX epilogue each regenerate exactly the same mask,
so backward never needs a stored copy of dropout(x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def keep_scale(seed, rows, cols, K, dropout_p):
    """The dropout multiplier for the (rows × cols) tile of an (M, K) tensor: 1/(1-p) where kept,
    0 where dropped, as fp32. rows/cols are int64 so m·K + k cannot overflow."""
    offsets = rows[:, None] * K + cols[None, :]
    keep = tl.rand(seed, offsets) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit(do_not_specialize=["seed"])
def _mask_kernel(out_ptr, M, K, dropout_p, seed,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    scale = keep_scale(seed, rows, cols, K, dropout_p)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], scale,
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def dropout_mask(M: int, K: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The (M, K) fp32 multiplier the kernels apply for this seed (for tests and debugging only:
    the kernels themselves never materialise it)."""
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _mask_kernel[grid](out, M, K, float(dropout_p), int(seed), BLOCK_M=32, BLOCK_K=32)
    return out
