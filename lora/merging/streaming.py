"""Fold LoRA adapters into a Hugging Face safetensors checkpoint, streaming tensor by tensor.

For every adapted projection (adapter keys `base_model.model.<module>.lora_{A,B}.weight` →
checkpoint tensor `<module>.weight`) the merged weight is lora/core/delta.py's, rounded once:

    W' = round_to_dtype( fp32(W) + Σ_i w_i · (s_i · fp32(B_i) @ fp32(A_i)) )
    DoRA (one adapter, weight 1): V = fp32(W) + s · fp32(B) @ fp32(A),  W' = round_to_dtype( m / ‖V‖_row ⊙ V )

Every other tensor is copied byte for byte. The output keeps the base's shard files, tensor order
and index; only `dtype` changes bytes elsewhere (float tensors converted, config.json's dtype set).
A bitsandbytes 4-bit base (lora/storage/quantized.py) is written as the full-precision checkpoint it
stands for: each 4-bit weight dequantized (the adapter folded in fp32 where it has one) and written
as bf16 or `dtype`, its statistics dropped, config.json without its quantization_config.

Memory stays flat in the number of layers: headers are parsed by hand (lora/storage/safetensors_stream.py),
the adapters' A and B are read only when their weight comes up (plan.py), and each shard is written
as a stream (writer.py). `safetensors.safe_open` is not used because its mmap pages would count
towards RSS, up to a whole shard.

Failure safety: everything is checked before anything is written (the inputs, the adapters' values,
the free space on `out_dir`'s file system), and one merge at a time holds `out_dir`
(lora/storage/lock.py). The output is written into a temporary directory beside `out_dir`
(lora.storage.atomic.atomic_dir) and renamed into place at the end, after `verify` (verify.py) when
asked: a crash, a signal, a full disk or a failed check leaves `out_dir` as it was.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.delta import Workspace
from ..errors import LoRAError, LoRAFailure
from ..runtime.progress import Progress
from ..runtime.signals import Interrupted
from ..storage.atomic import atomic_dir, clean_stale
from ..storage.lock import OutputLock
from ..storage.quantized import dequantized_layout
from ..storage.safetensors_stream import DTYPE_ARG, read_checkpoint, shard_header
from .plan import plan_updates
from .side_files import copy_side_files, side_files, write_index
from .verify import verify_merged
from .writer import Writer, write_shard


@dataclass
class MergeReport:
    out_dir: Path
    n_tensors: int
    n_merged: int
    bytes_written: int
    seconds: float                         # reading, merging and writing (fsync included), not verify
    side_files: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None      # set by verify
    tolerance: float | None = None
    adapter_effect: float | None = None    # max |logits(base+adapter) - logits(base)|, from verify
    verify_seconds: float | None = None


def _check_paths(base_dir: Path, adapter_dirs: list[Path], out_dir: Path, force: bool) -> None:
    if not base_dir.is_dir():
        raise LoRAError(f"base checkpoint {base_dir} is not a directory")
    out, base = out_dir.resolve(), base_dir.resolve()
    if out == base:
        raise LoRAError(f"--out {out_dir} is the base checkpoint itself; choose another directory")
    for d in adapter_dirs:
        if not d.is_dir():
            raise LoRAError(f"adapter {d} is not a directory")
        if out == d.resolve():
            raise LoRAError(f"--out {out_dir} is the adapter directory {d}; choose another directory")
    for src in [base, *(d.resolve() for d in adapter_dirs)]:
        if out in src.parents:
            raise LoRAError(f"--out {out_dir} contains the input {src}; replacing it would delete the input")
    if out_dir.exists() and not force:
        raise LoRAError(f"{out_dir} already exists (pass --force / force=True to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise LoRAError(f"{out_dir} exists and is not a directory")


def _check_free_space(out_dir: Path, needed: int) -> None:
    """The whole output must fit beside what is there now (a replaced `out_dir` goes only at the end)."""
    where = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free = shutil.disk_usage(where).free
    if needed > free:
        raise LoRAFailure(f"--out {out_dir}: the merged checkpoint needs {needed / 1e6:,.1f} MB and its file system "
                          f"has {free / 1e6:,.1f} MB free; nothing written")


@contextlib.contextmanager
def _interrupt_note(out_dir: Path):
    """A signal during the merge says what it kept: nothing (the temporary output is removed)."""
    try:
        yield
    except Interrupted as e:
        raise Interrupted(e.signum, f"nothing written, {out_dir} left as it was") from None


@contextlib.contextmanager
def _named_as_output(tmp: Path, out_dir: Path):
    """An OS error on a file of the temporary output names the file it was to become in `out_dir`."""
    try:
        yield
    except OSError as e:
        name = str(e.filename or "")
        if name.startswith(str(tmp)):
            raise OSError(e.errno, e.strerror, str(out_dir) + name[len(str(tmp)):]) from None
        raise


def merge_checkpoint(base_dir, adapter_dirs, out_dir, weights=None, dtype=None, force: bool = False,
                     verify: bool = False, progress: bool = True) -> MergeReport:
    """Write base + Σ weights[i]·adapter[i] to `out_dir` as a complete Hugging Face checkpoint.

    base_dir:     HF checkpoint dir with model.safetensors or model.safetensors.index.json (+ shards)
    adapter_dirs: one PEFT-format adapter dir, or a list of them
    weights:      one float per adapter (default 1.0 each); the deltas are summed in fp32
    dtype:        None (keep each tensor's dtype), "float32"/"float16"/"bfloat16" (or fp32/fp16/bf16, or a
                  torch dtype) for every float tensor of the output; config.json's dtype follows
    force:        replace an existing out_dir (atomically: the old one goes only once the new is complete)
    verify:       compare logits of base+adapter (our LoRALinear, unmerged) and the merged model before
                  the output is moved into place; above a dtype-suited tolerance it raises VerifyError
                  (a LoRAFailure) and writes nothing
    progress:     progress bar on stderr
    """
    t0 = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_dirs = [Path(adapter_dirs)] if isinstance(adapter_dirs, (str, os.PathLike)) else [Path(a) for a in adapter_dirs]
    if not adapter_dirs:
        raise LoRAError("no adapter given")
    if weights is None:
        weights = [1.0] * len(adapter_dirs)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapter_dirs):
        raise LoRAError(f"{len(weights)} weight(s) for {len(adapter_dirs)} adapter(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise LoRAError(f"weights must be finite numbers, got {weights}")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None and dtype not in DTYPE_ARG:
        raise LoRAError(f"dtype {dtype!r} is not one of float32, float16, bfloat16")
    out_dt = DTYPE_ARG[dtype] if dtype is not None else None
    clean_stale(out_dir)        # a killed merge's leftovers; puts back an out_dir it had set aside
    _check_paths(base_dir, adapter_dirs, out_dir, force)

    # Everything that can be wrong with the inputs is found here, before the first byte is written.
    shards, index = read_checkpoint(base_dir)
    shards, nf4 = dequantized_layout(shards, out_dt or "BF16")
    entries = {t.name: t for s in shards for t in s.entries}
    if len(entries) != sum(len(s.entries) for s in shards):
        raise LoRAError(f"{base_dir}: a tensor name appears in more than one shard")
    plan = plan_updates(adapter_dirs, weights, entries)

    sizes = [shard_header(s, out_dt)[1] for s in shards]
    _check_free_space(out_dir, sum(sizes) + sum(p.stat().st_size for p in side_files(base_dir)))

    report = MergeReport(out_dir, len(entries), len(plan), 0, 0.0)
    with OutputLock(out_dir), _interrupt_note(out_dir):
        _check_paths(base_dir, adapter_dirs, out_dir, force)      # again: another merge may have just ended
        bar = Progress(sum(t.nbytes for t in entries.values()), "merge", "B", enabled=progress, unit_scale=True)
        with contextlib.closing(bar), atomic_dir(out_dir) as tmp, _named_as_output(tmp, out_dir):
            with contextlib.ExitStack() as stack, Writer(bar, len(entries)) as writer:
                adapter_fds, ws = {}, Workspace()
                for path in {u.path for ups in plan.values() for u in ups}:
                    adapter_fds[path] = fd = os.open(path, os.O_RDONLY)
                    stack.callback(os.close, fd)
                for shard in shards:
                    write_shard(shard, tmp / shard.path.name, plan, adapter_fds, out_dt, writer, ws, nf4)
            if index is not None:
                write_index(index, tmp, sum(sizes), set(entries))
            report.side_files = copy_side_files(base_dir, tmp, out_dt, dequantized=bool(nf4))
            bar.close()
            report.bytes_written = sum(sizes)
            report.seconds = time.monotonic() - t0
            if verify:
                t1 = time.monotonic()
                report.max_abs_diff, report.tolerance, report.adapter_effect = verify_merged(
                    base_dir, adapter_dirs, weights, tmp)
                report.verify_seconds = time.monotonic() - t1
    return report
