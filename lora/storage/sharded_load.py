"""A model's weights read in row ranges: each process reads from the safetensors files only the rows of
each tensor it keeps (its shard along dim 0), by offset, never the whole tensor.

    read_rows(model_dir, wanted)    fill each destination with rows [first, first + len) of the named
                                    tensor; returns the bytes read from the files

Rows of a tensor are contiguous in a safetensors file (row-major), so a shard along dim 0 is one byte
range: `pread` it straight into the destination when it is a CPU tensor of the file's dtype, through a
buffer of that range otherwise (a bf16 file trained in fp32, a GPU shard).
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
            rows, row_shape = dest.shape[0], tuple(dest.shape[1:])
            if not entry.shape or entry.shape[1:] != row_shape or first + rows > entry.shape[0]:
                raise LoRAError(f"{path}: {name} has shape {list(entry.shape)}, which rows {first}…{first + rows} "
                                f"of shape {list(row_shape)} do not fit")
            width, file_dtype = ST_DTYPES[entry.dtype]
            if file_dtype is None:
                raise LoRAError(f"{path}: {name} has dtype {entry.dtype}, which torch cannot hold")
            row_bytes = math.prod(row_shape) * width
            n = rows * row_bytes
            if n == 0:
                continue
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            direct = dest.device.type == "cpu" and dest.dtype == file_dtype and dest.is_contiguous()
            buf = dest.view(-1).view(torch.uint8) if direct else None
            got = pread_exact(fds[path], n, entry.begin + first * row_bytes, path, buf)
            if not direct:
                dest.copy_(got.view(file_dtype).view(dest.shape))
            total += n
    finally:
        for fd in fds.values():
            os.close(fd)
    return total
