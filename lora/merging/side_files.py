"""The files beside the merged shards: the index, config.json, generation_config.json, tokenizer files.

Every top-level file of the base that is not a weight file is copied byte for byte; only a new dtype
changes one of them (config.json's dtype). Weights in another format are never copied: they would
be the stale, unmerged ones.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..storage.safetensors_stream import INDEX_NAME, TORCH_NAME

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def write_index(index: dict, out_dir: Path, total_size: int, names: set[str]) -> None:
    """The base's model.safetensors.index.json (same weight_map: same shards, for the tensors in
    `names`: a 4-bit base's statistics are not written), with the output's size."""
    weight_map = {k: v for k, v in index["weight_map"].items() if k in names}
    index = dict(index, weight_map=weight_map, metadata=dict(index.get("metadata") or {}, total_size=total_size))
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def side_files(base_dir: Path) -> list[Path]:
    """The top-level files of `base_dir` that are copied: every one but weights and hidden files."""
    return [p for p in sorted(base_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES)]


def copy_side_files(base_dir: Path, out_dir: Path, dtype: str | None, dequantized: bool = False) -> list[str]:
    """Every file of side_files(base_dir); `dtype` (a safetensors name) is written into config.json's
    dtype; `dequantized` (a 4-bit base written in full precision) drops its quantization_config.
    Returns the names copied."""
    copied = []
    for p in side_files(base_dir):
        if p.name == "config.json" and (dtype is not None or dequantized):
            cfg = json.loads(p.read_text())
            cfg.pop("quantization_config", None)
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
            for k in keys if dtype is not None else ():
                cfg[k] = TORCH_NAME[dtype]
            (out_dir / p.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(p, out_dir / p.name)
        copied.append(p.name)
    return copied
