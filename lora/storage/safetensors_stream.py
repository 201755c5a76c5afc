"""Safetensors files read and written as streams: the format is an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw tensor
bytes. Headers are parsed by hand and checked against the file size (a truncated file is caught before
any work), tensors are read with `pread` into caller buffers and copied file-to-file by the kernel, so
nothing here maps a whole shard into memory (as `safetensors.safe_open` would, counting towards RSS).
Used by lora/merging/ (the merge reads and writes checkpoints with it, never through safe_open).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoRAError

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

HEADER_LIMIT = 100 * 1024 * 1024        # safetensors' own bound on the JSON header
COPY_CHUNK = 64 * 1024 * 1024           # bytes per copy_file_range call (progress granularity)

# safetensors dtype name -> (bytes per element, torch dtype or None when torch has no such dtype)
ST_DTYPES = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
    "U16": (2, None), "U32": (4, None), "U64": (8, None), "C64": (8, None),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)), "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "F8_E8M0": (1, None),
}
# Only these are merged into or converted by --dtype (fp8 weights come with scales we do not model).
FLOAT_NAMES = {"F64", "F32", "F16", "BF16"}
# merge's dtype names (merge.py --dtype, merge_checkpoint(dtype=…)) -> safetensors dtype name
DTYPE_ARG = {
    "float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# -- reading safetensors headers ----------------------------------------------------------------
@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int            # absolute byte offset in the file
    nbytes: int


@dataclass
class Shard:
    path: Path
    entries: list[Entry]                 # in file (data offset) order
    metadata: dict | None


def read_shard_header(path: Path) -> Shard:
    """Parse and fully check a safetensors header against the file's size (catches truncation)."""
    def bad(msg: str):
        raise LoRAError(f"{path}: corrupt or truncated safetensors file ({msg})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            bad(f"{size} bytes, too short for a header")
        n = int.from_bytes(raw, "little")
        if n > HEADER_LIMIT or 8 + n > size:
            bad(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad(f"header is not JSON: {e}")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start, entries = 8 + n, []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            bad(f"malformed entry for {name!r}")
        if dtype not in ST_DTYPES:
            raise LoRAError(f"{path}: tensor {name} has dtype {dtype}, which this merge does not support")
        if not (isinstance(b, int) and isinstance(e, int)) or e < b or any(d < 0 for d in shape):
            bad(f"bad offsets or shape for {name!r}")
        if math.prod(shape) * ST_DTYPES[dtype][0] != e - b:
            bad(f"{name}: {e - b} bytes for shape {list(shape)} {dtype}")
        entries.append(Entry(name, dtype, shape, data_start + b, e - b))
    entries.sort(key=lambda t: t.begin)
    end = data_start
    for t in entries:
        if t.begin != end:
            bad(f"{t.name}: data does not follow the previous tensor")
        end += t.nbytes
    if end != size:
        bad(f"data ends at byte {end} but the file has {size} bytes")
    return Shard(path, entries, metadata)


def read_checkpoint(base_dir: Path) -> tuple[list[Shard], dict | None]:
    """All shards' headers and the index (None for a single model.safetensors), cross-checked."""
    if (base_dir / SINGLE_NAME).is_file():
        return [read_shard_header(base_dir / SINGLE_NAME)], None
    index_path = base_dir / INDEX_NAME
    if not index_path.is_file():
        raise LoRAError(f"{base_dir}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)")
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise LoRAError(f"{index_path}: not a valid index (needs a 'weight_map' of tensor -> shard file)") from None
    shards = []
    for file in dict.fromkeys(weight_map.values()):
        if Path(file).name != file or file in (".", ".."):
            raise LoRAError(f"{index_path}: shard name {file!r} is not a plain file name")
        if not (base_dir / file).is_file():
            raise LoRAError(f"{index_path}: shard {file} is missing")
        shard = read_shard_header(base_dir / file)
        for t in shard.entries:
            listed = weight_map.get(t.name)
            if listed is None:
                raise LoRAError(f"{index_path}: missing index entry for tensor {t.name} (held by {file})")
            if listed != file:
                raise LoRAError(f"{index_path}: lists {t.name} in {listed}, but {file} holds it")
        shards.append(shard)
    held = {t.name for s in shards for t in s.entries}
    for name, file in weight_map.items():
        if name not in held:
            raise LoRAError(f"{index_path}: lists {name} in {file}, which has no such tensor")
    return shards, index



def pread_exact(fd: int, n: int, offset: int, path: Path, buf: torch.Tensor | None = None) -> torch.Tensor:
    """n bytes at `offset` as a uint8 tensor (into `buf`, a uint8 tensor of n bytes, when given)."""
    buf = torch.empty(n, dtype=torch.uint8) if buf is None else buf
    view, got = memoryview(buf.numpy()), 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise LoRAError(f"{path}: truncated while reading (file changed during the merge?)")
        got += k
    return buf


def read_tensor(fd: int, entry: Entry, path: Path, buf: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `entry` of the open shard `fd` (into `buf`, a uint8 tensor of entry.nbytes, when given)."""
    dtype = ST_DTYPES[entry.dtype][1]
    if dtype is None:
        raise LoRAError(f"{path}: tensor {entry.name} has dtype {entry.dtype}, which torch cannot hold")
    return pread_exact(fd, entry.nbytes, entry.begin, path, buf).view(dtype).reshape(entry.shape)


def write_all(fd: int, data: torch.Tensor | bytes) -> None:
    """Write a tensor's raw bytes (or bytes) at fd's position; os.write may write less than asked."""
    if isinstance(data, torch.Tensor):
        data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_bytes(src: int, dst: int, offset: int, n: int, path: Path, step) -> None:
    """Copy n bytes from src at `offset` to dst's current position, in the kernel when it can."""
    done = 0
    while done < n:
        k = min(COPY_CHUNK, n - done)
        try:
            got = os.copy_file_range(src, dst, k, offset + done)
        except (OSError, AttributeError):          # other filesystem, old kernel, no syscall
            got = os.write(dst, os.pread(src, k, offset + done))
        if got == 0:
            raise LoRAError(f"{path}: truncated while reading (file changed during the merge?)")
        done += got
        step(got)


def out_dtype(entry: Entry, dtype: str | None) -> str:
    return dtype if dtype is not None and entry.dtype in FLOAT_NAMES else entry.dtype


def shard_header(shard: Shard, dtype: str | None) -> tuple[bytes, int]:
    """The output shard's header (8-byte length + JSON, padded to 8 bytes) and its data size."""
    meta = dict(shard.metadata or {})
    meta.setdefault("format", "pt")              # transformers refuses files without it
    header, offset = {"__metadata__": meta}, 0
    for t in shard.entries:
        out = out_dtype(t, dtype)
        nbytes = math.prod(t.shape) * ST_DTYPES[out][0]
        header[t.name] = {"dtype": out, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset
