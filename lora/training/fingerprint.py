"""Digests of a run's inputs, so `--resume` can tell that the data or the model changed under it.

    data:  sha256 of the file's bytes (one more pass over a file the run reads whole anyway;
           docs/train.md has the rate measured)
    model: sha256 over config.json, the tokenizer files, and for every *.safetensors file its name,
           size, header (every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB
           samples of its tensor data

The model's digest samples instead of reading every byte, so that it costs milliseconds for any
size. Any other checkpoint of the same architecture (a fine-tune, a merge, another dtype) differs in
nearly every weight, so in the samples; a change of a few bytes between samples would go unseen.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

SAMPLES, SAMPLE_BYTES = 16, 64 * 1024
# what the tokenizer is read from (lora/demo/tokenizer.py, transformers' AutoTokenizer)
_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt")


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes, or None when `path` is not a file (the caller reports that)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_part(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            h.update(head)
            return
        (n,) = struct.unpack("<Q", head)
        start = 8 + min(n, size - 8)
        h.update(f.read(start - 8))                          # the JSON header, whole
        span = size - start
        if span <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read(span))
            return
        for i in range(SAMPLES):
            f.seek(start + (span - SAMPLE_BYTES) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def model_digest(model_dir: str | os.PathLike) -> str | None:
    """The sampled digest of a local Hugging Face model directory (see above), or None if it is not
    a directory."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.suffix == ".safetensors" and p.is_file():
            _safetensors_part(h, p)
        elif p.name in _SMALL_FILES and p.is_file():
            h.update(f"{p.name}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()
