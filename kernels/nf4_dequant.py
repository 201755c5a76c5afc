"""NF4 dequantization: bitsandbytes' 4-bit format (lora/quant/nf4.py) back to a dense weight.

    W_i = NF4[q_i] · absmax_j      q_i: nibble i of packed (even i: the HIGH nibble), j = i // QBLOCK
    absmax_j = nested_map[qa_j] · nested_absmax[j // NESTED] + offset      (double quantization)
    packed: (⌈n/2⌉,) uint8   qa: (n_blocks,) uint8 (or float32 absmax without double quantization)
    nested_absmax: (⌈n_blocks/NESTED⌉,) f32   nested_map: (256,) f32   NF4: (16,) f32   offset: (1,) f32

Each program writes BLOCK contiguous elements of W. The fp32 products and sum are the plain path's,
one operation at a time (launched with fp fusion off: a fused multiply-add would round once instead of
twice), and the cast to the output dtype rounds to nearest even as torch's does: the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch


@triton.jit
def nf4_values(idx, mask, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, code_ptr, offset_ptr,
               QBLOCK: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W at the flat indices `idx` (any shape, int64) in fp32; 0 where `mask` is False."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    code = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = idx // QBLOCK
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_map_ptr + qa, mask=mask, other=0.0) * \
            tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return code * scale


@triton.jit
def to_dtype(w, dtype: tl.constexpr):
    """fp32 `w` in `dtype`, rounded to nearest even. For bf16 the rounding is done on the bits first
    (then the cast is exact): Triton's interpreter truncates fp32 → bf16, the GPU rounds to nearest."""
    if dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        w = bits.to(tl.float32, bitcast=True)
    return w.to(dtype)


@triton.jit
def _nf4_dequant_kernel(
    # pointers: the NF4 weight's buffers, out (n,)
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, code_ptr, offset_ptr, out_ptr,
    # size
    n,
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)        # (BLOCK,)
    ok = idx < n
    w = nf4_values(idx, ok, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, code_ptr, offset_ptr,
                   QBLOCK, NESTED, DOUBLE_QUANT)
    tl.store(out_ptr + idx, to_dtype(w, out_ptr.dtype.element_ty), mask=ok)


def weight_args(weight) -> tuple:
    """The NF4 weight's buffers in the kernels' pointer order, and its constexprs."""
    if weight.double_quant:
        ptrs = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_quant_map, weight.quant_map,
                weight.offset.reshape(1))
    else:
        ptrs = (weight.packed, weight.absmax, weight.absmax, weight.absmax, weight.quant_map, weight.absmax)
    meta = dict(QBLOCK=weight.block_size, NESTED=weight.nested_block_size if weight.double_quant else 1,
                DOUBLE_QUANT=weight.double_quant)
    return ptrs, meta


def nf4_dequantize(weight, dtype: torch.dtype | None = None, block: int = 1024) -> torch.Tensor:
    """The NF4Weight `weight` as a dense tensor of its shape in `dtype` (its own by default)."""
    dtype = dtype or weight.dtype
    ptrs, meta = weight_args(weight)
    launch.check_device(*ptrs)
    n = weight.numel()
    out = launch.empty_output((n,), dtype, weight.device)
    if n:
        fp = {} if launch.INTERPRET else dict(enable_fp_fusion=False)
        _nf4_dequant_kernel[(triton.cdiv(n, block),)](*ptrs, out, n, **meta, BLOCK=block, **fp)
    return out.view(weight.shape)
