"""An NF4 weight laid out for FSDP2 (--fsdp with a 4-bit base): one row per quantization block, so the
dim-0 shard FSDP2 gives each rank is whole blocks.

    W (out, in), n = out·in elements, n a multiple of block_size (64) → n_blocks = n / 64 blocks
    packed (n_blocks, 32) uint8      block j's 64 codes, two a byte (bitsandbytes' order: the flat
                                     packed bytes of NF4Weight, viewed one block a row)
    absmax (n_blocks,) float32       block j's scale: the value NF4Weight.scales() gives for it (with
                                     double quantization, the doubly dequantized one)
    W_i = NF4[q_i] · absmax_{i // 64}, in fp32, rounded once (NF4Weight.dequantize, unchanged)

Both are frozen nn.Parameters (requires_grad=False), so `fully_shard` shards them on dim 0 like the
bf16 weights (torch.chunk's split: rank r keeps blocks [r·⌈n_blocks/N⌉, …)) and all-gathers them for
the unit's forward and backward; NF4Weight's own code reads `self.packed` / `self.absmax`, which FSDP2
points at the gathered tensors while the unit computes. A rank's blocks are a contiguous run of the
flat weight, so it reads and quantizes only that run (lora/storage/sharded_load.py): blockwise
quantization of whole blocks gives the whole tensor's bytes for them.

The scales are held in float32, not double-quantized (8 bits a block plus a float32 per 256 blocks):
4.5 bits per parameter instead of 4.127, and the dequantized weight is the one the unsharded run's
NF4Weight gives, bit for bit (double_quantized_scales computes its scales from the whole tensor's
absmax).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LoRAError
from .nf4 import NESTED_BLOCK_SIZE, NF4Weight, blockwise_scale, dynamic_map, nf4_code, quantize_blockwise8


class ShardedNF4Weight(NF4Weight):
    """NF4Weight with `packed` (n_blocks, block_size/2) uint8 and `absmax` (n_blocks,) float32 held as
    frozen parameters (FSDP2 shards parameters, not buffers); `quant_map` stays a buffer."""

    def __init__(self, shape, dtype: torch.dtype, block_size: int = 64, device=None):
        n = torch.Size(shape).numel()
        if n % block_size:
            raise LoRAError(f"--fsdp with a 4-bit base needs every quantized weight to be whole blocks of "
                            f"{block_size} values; a {tuple(shape)} weight is not")
        nb = n // block_size
        super().__init__(torch.empty(nb, block_size // 2, dtype=torch.uint8, device=device),
                         torch.empty(nb, dtype=torch.float32, device=device), nf4_code(device), shape, dtype,
                         block_size)
        for name in ("packed", "absmax"):
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name), requires_grad=False))

    def _apply(self, fn, recurse=True):
        # to_empty / .to(device) follow fn; a dtype cast (model.to(torch.bfloat16)) moves only: the bytes
        # and the float32 scales are the format.
        probe = fn(torch.empty(0, device=self.packed.device))
        keeps_dtype = probe.dtype == torch.float32
        return nn.Module._apply(self, fn if keeps_dtype else (lambda t: t.to(probe.device)), recurse)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._parameters.values(), *self._buffers.values()))

    def reset_quant_map(self) -> None:
        """The NF4 code into quant_map (a buffer that to_empty left uninitialised)."""
        self.quant_map = nf4_code(self.packed.device)


def double_quantized_scales(absmax: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each block (n_blocks,) that quantize_nf4(..., double_quant=True) then
    NF4Weight.scales() give for a weight whose blocks' absmax (n_blocks,) float32 is `absmax`: the
    offset is the mean of the whole tensor's absmax, so this needs them all."""
    offset = absmax.mean()
    nested_map = dynamic_map().to(absmax.device)
    qa, nested_absmax = quantize_blockwise8(absmax - offset, nested_map)
    return blockwise_scale(nested_map[qa.long()], nested_absmax, NESTED_BLOCK_SIZE) + offset
