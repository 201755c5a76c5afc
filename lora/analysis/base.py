"""The base checkpoint's weights for the adapted modules: checked against the adapter from the
safetensors headers alone, then read one tensor at a time.

Memory stays flat in the model's size, as in merge.py: each `<module>.weight` is read with one
`pread` into a reused byte buffer and widened into a reused float64 buffer, so at most one weight
(in float64) is held, whatever the number of layers or shards.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from ..core.delta import Workspace
from ..errors import LoRAError
from ..storage.safetensors_stream import FLOAT_NAMES, ST_DTYPES, Entry, pread_exact, read_checkpoint


class BaseWeights:
    """The base weights W (out, in) of `shapes` ({module: ΔW's (out, in)}), checked on construction."""

    def __init__(self, base_dir: str | os.PathLike, shapes: dict[str, tuple[int, int]]):
        base_dir = Path(base_dir)
        if not base_dir.is_dir():
            raise LoRAError(f"base checkpoint {base_dir} is not a directory")
        shards, _ = read_checkpoint(base_dir)
        held = {t.name: (s.path, t) for s in shards for t in s.entries}
        self.entries: dict[str, tuple[Path, Entry]] = {}
        for module, shape in shapes.items():
            found = held.get(f"{module}.weight")
            if found is None:
                raise LoRAError(f"{base_dir}: the adapter's module {module} is not in the base checkpoint "
                                f"(no tensor {module}.weight)")
            t = found[1]
            if t.dtype not in FLOAT_NAMES or len(t.shape) != 2:
                raise LoRAError(f"{base_dir}: {t.name} is {t.dtype} {list(t.shape)}; "
                                f"only 2-D float weights are analysed")
            if t.shape != tuple(shape):
                raise LoRAError(f"{base_dir}: {t.name} is {t.shape[0]} × {t.shape[1]} but the adapter's ΔW for "
                                f"{module} is {shape[0]} × {shape[1]} (an adapter made for another model?)")
            self.entries[module] = found

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(module, W in float64), in file order (sequential reads). W is a reused buffer: valid
        until the next item."""
        ws, fds = Workspace(), {}
        try:
            for module, (path, t) in sorted(self.entries.items(), key=lambda kv: (str(kv[1][0]), kv[1][1].begin)):
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                raw = pread_exact(fds[path], t.nbytes, t.begin, path, ws.get("raw", (t.nbytes,), torch.uint8))
                W = ws.get("W", t.shape, torch.float64)
                yield module, W.copy_(raw.view(ST_DTYPES[t.dtype][1]).view(t.shape))
        finally:
            for fd in fds.values():
                os.close(fd)
