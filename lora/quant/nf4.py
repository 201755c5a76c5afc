"""NF4 with double quantization, in bitsandbytes' exact format (its `quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`): the same packed bytes, scales and dequantized values.

    W (any shape, n elements) → flat, row-major → blocks of `block_size` (64; the last may be shorter)
    absmax_j  = max |block_j|                                  (float32, one per block)
    q_i       = index of the NF4 code nearest to W_i / absmax_j       (ties to the lower index)
    packed    = q[0::2] << 4 | q[1::2]                         (uint8, ⌈n/2⌉ bytes; even element in the HIGH nibble)
    double quantization of the scales:
    offset    = mean(absmax);  absmax − offset → 8 bits in blocks of 256 on bitsandbytes' dynamic map,
                one float32 nested_absmax per 256 blocks
    dequantize: absmax = nested_map[qa] · nested_absmax + offset;  W_i = NF4[q_i] · absmax_j, in fp32, rounded once

Storage: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter (plus a 16- and a 256-entry table per weight).
Every expression follows bitsandbytes' arithmetic step by step (a reciprocal-multiply for full blocks,
a division for the ragged tail; the 8-bit search through its 65536-entry table), so rounding agrees bit
for bit. Dequantizing has no data-dependent shapes and no host syncs (graph-safe).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import LoRAError

# bitsandbytes' NF4 table (its exact float32 values; a 4-decimal rounding is not bit-compatible).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NESTED_BLOCK_SIZE = 256          # blocks of scales per nested float32 absmax
_CHUNK = 1 << 20                 # elements quantized at a time: small fp32 temporaries, reused by malloc


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, float32, sorted."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-1, 1]): for exponent
    e = 0…6, 2^e fractions (midpoints of linspace(0.1, 1, 2^e + 1)) times 10^(e−6), both signs, plus 0
    and 1; the same float32 arithmetic as its `create_dynamic_map()`."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _lut8(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: the code index that bitsandbytes' CPU 8-bit quantizer picks for each of 65536
    evenly spaced values v_i = −1 + 2i/65535: the first index whose midpoint to the next is ≥ v_i."""
    mids = 0.5 * (code[:-1] + code[1:])                                    # (255,)
    v = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, v)


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE):
    """(codes uint8 (n,), absmax float32 (⌈n/block_size⌉,)): x (float32, flat) on the 256-entry `code`,
    as bitsandbytes' CPU `quantize_blockwise` does: the value scaled by 1/absmax, mapped to a 16-bit
    grid position round(65535 · (v + 1)/2), looked up (an all-zero block gets code 0)."""
    n = x.numel()
    nb = -(-n // block_size)
    blocks = torch.nn.functional.pad(x, (0, nb * block_size - n)).view(nb, block_size)
    absmax = blocks.abs().amax(dim=1)                                      # (nb,)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    grid = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32).clamp_(0, 65535)   # truncation, as a C cast
    q = _lut8(code.float().cpu()).to(x.device)[grid.long()]
    q = torch.where(absmax[:, None] == 0, 0, q)
    return q.to(torch.uint8).view(-1)[:n], absmax


def blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """values (n,) float32 times their block's absmax, in fp32: (n,). No host sync: the ragged last
    block is padded, not sliced by a data-dependent size."""
    n = values.numel()
    nb = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, nb * block_size - n))
    return (padded.view(nb, block_size) * absmax[:, None]).view(-1)[:n]


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Two code indices a byte, the even element in the HIGH nibble: (⌈n/2⌉,) uint8 (q's length even)."""
    q = q.to(torch.uint8)
    return q[0::2] << 4 | q[1::2]


def _quantize_packed(flat: torch.Tensor, bounds: torch.Tensor, block_size: int):
    """(packed uint8 (⌈n/2⌉,), absmax float32 (⌈n/block_size⌉,)) for a flat float tensor, bitsandbytes'
    rule, a chunk of whole blocks at a time (each chunk's length is even: it packs on its own), so no
    fp32 copy or index array of the whole weight is ever made."""
    n = flat.numel()
    full = n - n % block_size
    packed, absmaxes = [], []
    step = max(block_size, _CHUNK // block_size * block_size)
    for start in range(0, full, step):
        blocks = flat[start:min(start + step, full)].float().view(-1, block_size)
        am = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / am.clamp(min=1e-38))[:, None]).clamp(-1, 1)
        packed.append(_pack(torch.bucketize(scaled.view(-1), bounds, out_int32=True)))
        absmaxes.append(am)
    if full < n:                                                           # the ragged last block
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        scaled = (tail / am).clamp(-1, 1)
        if scaled.numel() % 2:                                             # an odd count: a 0 pads the last byte
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        packed.append(_pack(torch.bucketize(scaled, bounds, out_int32=True)))
        absmaxes.append(am.view(1))
    return torch.cat(packed), torch.cat(absmaxes)


class NF4Weight(nn.Module):
    """A frozen weight stored as NF4. Buffers, so `.to(device)` moves them; dtype casts (`.half()`,
    `model.to(torch.bfloat16)`) leave them as they are: the bytes and float32 scales are the format.

    packed (⌈n/2⌉, 1) uint8       two codes a byte, bitsandbytes' order and shape
    absmax (n_blocks,)            uint8 codes of the scales (double quantization) or their float32 values
    nested_absmax (⌈n_blocks/256⌉,) float32, nested_quant_map (256,) float32, offset () float32: double quantization
    quant_map (16,) float32       the NF4 code
    shape, dtype, block_size      the original weight's; nested_block_size (256) the scales' blocks
    """

    def __init__(self, packed, absmax, quant_map, shape, dtype, block_size: int = 64,
                 nested_absmax=None, nested_quant_map=None, offset=None, nested_block_size: int = NESTED_BLOCK_SIZE):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("quant_map", quant_map)
        self.double_quant = nested_absmax is not None
        if self.double_quant:
            self.register_buffer("nested_absmax", nested_absmax)
            self.register_buffer("nested_quant_map", nested_quant_map)
            self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32).reshape(()))
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = block_size
        self.nested_block_size = nested_block_size

    def _apply(self, fn, recurse=True):
        # Only the device follows `fn`: a probe tells where fn sends a tensor, whatever dtype it asks.
        device = fn(torch.empty(0, device=self.packed.device)).device
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def _version(self) -> int:
        return self.packed._version

    def is_floating_point(self) -> bool:
        """True: it stands for a float weight (autocast and dtype choices treat it as one)."""
        return True

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")

    def scales(self) -> torch.Tensor:
        """The float32 absmax of every block (n_blocks,)."""
        if not self.double_quant:
            return self.absmax
        nested = blockwise_scale(self.nested_quant_map[self.absmax.long()], self.nested_absmax, self.nested_block_size)
        return nested + self.offset

    def codes(self) -> torch.Tensor:
        """The code index of every element (n,), int64: high nibble first."""
        p = self.packed.view(-1)
        return torch.stack((p >> 4, p & 0xF), dim=1).view(-1)[:self.numel()].long()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (shape) in `dtype` (its original dtype by default): NF4[q] · absmax in fp32, one rounding."""
        # byte b → (NF4[b >> 4], NF4[b & 0xF]): one lookup per byte, no unpacked index tensor
        pairs = torch.stack((self.quant_map.repeat_interleave(16), self.quant_map.repeat(16)), dim=1)   # (256, 2)
        codes = torch.nn.functional.embedding(self.packed.view(-1).int(), pairs).view(-1)[:self.numel()]
        values = blockwise_scale(codes, self.scales(), self.block_size)
        return values.view(self.shape).to(dtype or self.dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """`weight` (bf16, fp16 or fp32, any shape) as an NF4Weight, bit-identical to bitsandbytes'
    `quantize_4bit(weight, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`."""
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LoRAError(f"NF4 quantizes float32, bfloat16 or float16 weights, not {weight.dtype}")
    if block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise LoRAError(f"NF4 block size must be a power of two from 32 to 4096, got {block_size}")
    with torch.no_grad():
        code = nf4_code(weight.device)
        bounds = (code[:-1] + code[1:]) / 2                                # (15,) midpoints
        packed, absmax = _quantize_packed(weight.detach().reshape(-1), bounds, block_size)
        packed = packed.unsqueeze(1)                                       # (⌈n/2⌉, 1), bitsandbytes' shape
        if not double_quant:
            return NF4Weight(packed, absmax, code, weight.shape, weight.dtype, block_size)
        offset = absmax.mean()
        nested_map = dynamic_map().to(weight.device)
        qa, nested_absmax = quantize_blockwise8(absmax - offset, nested_map)
        return NF4Weight(packed, qa, code, weight.shape, weight.dtype, block_size,
                         nested_absmax=nested_absmax, nested_quant_map=nested_map, offset=offset)
