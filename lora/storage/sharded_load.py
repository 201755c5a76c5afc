"""A model's weights read in pieces: each process reads from the safetensors files only the part of
each tensor it keeps (its shard along dim 0, or a run of quantization blocks), by offset, never the
whole tensor.

    read_rows(model_dir, wanted)        fill each destination with rows [first, first + len) of the named
                                        tensor; returns the bytes read from the files
    read_elements(model_dir, wanted)    the same for a run of elements [first, first + numel) of the
                                        named tensor, flattened row-major
    read_nf4_blocks(model_dir, name, first, packed, scales)
                                        blocks [first, first + len) of a bitsandbytes 4-bit weight: their
                                        packed bytes and float32 scales (lora/quant/sharded.py's layout)

A tensor is row-major in a safetensors file, so rows of it (and any run of its flat elements) are one
byte range: `pread` it straight into the destination when it is a CPU tensor of the file's dtype,
through a buffer of that range otherwise (a bf16 file trained in fp32, a GPU shard).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import LoRAError
from .safetensors_stream import ST_DTYPES, pread_exact, read_checkpoint


def read_rows(model_dir: str | os.PathLike, wanted: dict[str, tuple[int, torch.Tensor]]) -> int:
    """For each `name: (first_row, dest)`, rows first_row … first_row + dest.shape[0] of the checkpoint
    tensor `name` into `dest` (at least 1-D: that many rows and the tensor's other dims; on any
    device). Returns the bytes read. A name the checkpoint lacks, or a shape that does not fit, is a
    one-line error."""
    def first_element(path, name, entry, first, dest):
        rows, row_shape = dest.shape[0], tuple(dest.shape[1:])
        if not entry.shape or entry.shape[1:] != row_shape or first + rows > entry.shape[0]:
            raise LoRAError(f"{path}: {name} has shape {list(entry.shape)}, which rows {first}…{first + rows} "
                            f"of shape {list(row_shape)} do not fit")
        return first * math.prod(row_shape)
    return _read(model_dir, wanted, first_element)


def read_elements(model_dir: str | os.PathLike, wanted: dict[str, tuple[int, torch.Tensor]]) -> int:
    """For each `name: (first, dest)`, elements first … first + dest.numel() of the checkpoint tensor
    `name` flattened row-major, into `dest` (any shape, filled row-major). Returns the bytes read."""
    def first_element(path, name, entry, first, dest):
        if first < 0 or first + dest.numel() > math.prod(entry.shape):
            raise LoRAError(f"{path}: {name} has shape {list(entry.shape)}, which elements {first}…"
                            f"{first + dest.numel()} do not fit")
        return first
    return _read(model_dir, wanted, first_element)


def _read(model_dir, wanted: dict[str, tuple[int, torch.Tensor]], first_element) -> int:
    shards, _ = read_checkpoint(Path(model_dir))
    where = {e.name: (s.path, e) for s in shards for e in s.entries}
    missing = sorted(set(wanted) - set(where))
    if missing:
        raise LoRAError(f"{model_dir}: {len(missing)} weight(s) the model needs are not in its safetensors "
                        f"files, e.g. {missing[0]}")
    total, fds = 0, {}
    try:
        for name, (first, dest) in wanted.items():
            path, entry = where[name]
            start = first_element(path, name, entry, first, dest)
            width, file_dtype = ST_DTYPES[entry.dtype]
            if file_dtype is None:
                raise LoRAError(f"{path}: {name} has dtype {entry.dtype}, which torch cannot hold")
            n = dest.numel() * width
            if n == 0:
                continue
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            direct = dest.device.type == "cpu" and dest.dtype == file_dtype and dest.is_contiguous()
            buf = dest.view(-1).view(torch.uint8) if direct else None
            got = pread_exact(fds[path], n, entry.begin + start * width, path, buf)
            if not direct:
                dest.copy_(got.view(file_dtype).view(dest.shape))
            total += n
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


def read_nf4_blocks(model_dir: str | os.PathLike, name: str, first: int, packed: torch.Tensor,
                    scales: torch.Tensor, quant_state: dict) -> int:
    """Blocks first … first + len(scales) of the bitsandbytes 4-bit weight `name` (…weight): their packed
    bytes into `packed` (blocks, block_size/2) uint8 and their float32 scales into `scales` (blocks,),
    the values NF4Weight.scales() gives (with double quantization: nested_quant_map[code] ·
    nested_absmax + offset, for only these blocks' codes and the nested scales that cover them).
    `quant_state` is the weight's decoded quant state. Returns the bytes read."""
    blocks = scales.shape[0]
    read = read_elements(model_dir, {name: (first * packed.shape[1], packed)})
    if "nested_offset" not in quant_state:
        return read + read_elements(model_dir, {f"{name}.absmax": (first, scales)})
    nested_bs = int(quant_state.get("nested_blocksize", 256))
    lo, hi = first // nested_bs, -(-(first + blocks) // nested_bs)
    codes = torch.empty(blocks, dtype=torch.uint8)
    nested_absmax = torch.empty(hi - lo, dtype=torch.float32)
    nested_map = torch.empty(256, dtype=torch.float32)
    read += read_elements(model_dir, {f"{name}.absmax": (first, codes), f"{name}.nested_absmax": (lo, nested_absmax),
                                      f"{name}.nested_quant_map": (0, nested_map)})
    nested = nested_absmax[torch.arange(first, first + blocks) // nested_bs - lo]                # (blocks,)
    offset = torch.tensor(quant_state["nested_offset"], dtype=torch.float32)
    scales.copy_(nested_map[codes.long()] * nested + offset)       # as NF4Weight.scales(): a product, then + offset
    return read
