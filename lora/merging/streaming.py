"""Fold LoRA adapters into a Hugging Face safetensors checkpoint, streaming tensor by tensor.

For every adapted projection (adapter keys `base_model.model.<module>.lora_{A,B}.weight` →
checkpoint tensor `<module>.weight`):

    W' = round_to_dtype( fp32(W) + Σ_i w_i · (s_i · fp32(B_i) @ fp32(A_i)) )     one rounding
         W: (out, in)   A_i: (r_i, in)   B_i: (out, r_i)   s_i = adapter i's scaling for the module

Every other tensor is copied byte for byte. The output keeps the base's shard files, tensor order
and index; only `--dtype` changes bytes elsewhere (float tensors converted, config.json's dtype set).

Memory stays flat in the number of layers (the file format side is lora/storage/safetensors_stream.py):
safetensors headers are parsed by hand, a merged weight is
read with one `pread` into a reused buffer, its adapter tensors only when it comes up, unchanged
tensors are copied file-to-file by the kernel (`copy_file_range`, never through our address space),
and each output shard's header is known before its data (same shapes, known dtypes), so it is
written first and the data streamed after it. `safetensors.safe_open` is not used because its mmap
pages would count towards RSS, up to a whole shard. Writes (and each shard's fsync) run in one
background thread, in order, while the next weight is merged.

Crash safety: everything is checked before anything is written, then written into a temporary
directory beside `out_dir` (lora.storage.atomic.atomic_dir) that is renamed into place at the end.
`--verify` (verify_merged) lives here too: it is the merge's own check.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..storage.adapter import PREFIX, WEIGHTS_NAME, read_adapter_config, weights_path
from ..storage.atomic import atomic_dir, clean_stale
from ..core.delta import Term, Workspace, merged_weight
from ..errors import LoRAError
from ..storage.safetensors_stream import (
    INDEX_NAME, ST_DTYPES, FLOAT_NAMES, DTYPE_ARG, TORCH_NAME, Entry, Shard, read_checkpoint,
    read_shard_header, pread_exact, write_all, copy_bytes, out_dtype, shard_header,
)

# Files beside the weights that are weights in another format: never copied (they would be stale).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# -- planning the merge -------------------------------------------------------------------------
@dataclass
class _Update:
    """Where a Term's tensors live: read from the adapter file only when their weight is merged, so
    the adapter (which grows with the layers, too) is never held whole."""
    path: Path
    lora_A: Entry
    lora_B: Entry
    scaling: float
    weight: float

    def load(self, fd: int) -> Term:
        A, B = (pread_exact(fd, e.nbytes, e.begin, self.path).view(ST_DTYPES[e.dtype][1]).reshape(e.shape)
                for e in (self.lora_A, self.lora_B))
        return Term(A, B, self.scaling, self.weight)


_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")


def _plan_updates(adapter_dirs: list[Path], weights: list[float],
                  base: dict[str, Entry]) -> dict[str, list[_Update]]:
    """{checkpoint tensor name: updates in adapter order}; every mismatch is a one-line LoRAError.
    Only headers are read here: shapes and dtypes are checked before any tensor is."""
    plan: dict[str, list[_Update]] = {}
    for adapter_dir, w in zip(adapter_dirs, weights):
        config = read_adapter_config(adapter_dir)
        path = weights_path(adapter_dir)
        pairs: dict[str, dict[str, Entry]] = {}
        for t in sorted(read_shard_header(path).entries, key=lambda t: t.name):
            m = _KEY.match(t.name)
            if m is None:
                raise LoRAError(f"{adapter_dir}: unexpected key {t.name} (expected {PREFIX}<module>.lora_A/B.weight)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        if not pairs:
            raise LoRAError(f"{adapter_dir}: {WEIGHTS_NAME} holds no LoRA tensors")
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise LoRAError(f"{adapter_dir}: {module} has no {missing}.weight")
            target = base.get(f"{module}.weight")
            if target is None:
                raise LoRAError(f"{adapter_dir}: target module {module} is not in the base checkpoint "
                                f"(no tensor {module}.weight)")
            lora_A, lora_B = ab["A"], ab["B"]
            for t in (lora_A, lora_B):
                if t.dtype not in FLOAT_NAMES or len(t.shape) != 2:
                    raise LoRAError(f"{adapter_dir}: {t.name} must be a 2-D float tensor, got {t.dtype} {t.shape}")
            if target.dtype not in FLOAT_NAMES or len(target.shape) != 2:
                raise LoRAError(f"{adapter_dir}: base tensor {target.name} is {target.dtype} {target.shape}; "
                                f"only 2-D F32/F16/BF16/F64 weights can be merged into")
            out_f, in_f = target.shape
            r = config.rank_for(module)
            if lora_A.shape != (r, in_f):
                raise LoRAError(f"{adapter_dir}: {lora_A.name} has shape {lora_A.shape} but base weight "
                                f"{target.name} has shape {target.shape} (needs ({r}, {in_f}) at r={r})")
            if lora_B.shape != (out_f, r):
                raise LoRAError(f"{adapter_dir}: {lora_B.name} has shape {lora_B.shape} but base weight "
                                f"{target.name} has shape {target.shape} (needs ({out_f}, {r}) at r={r})")
            plan.setdefault(target.name, []).append(_Update(path, lora_A, lora_B, config.scaling_for(module), w))
    return plan


# -- writing ------------------------------------------------------------------------------------
class _Progress:
    """Bytes written with MB/s and ETA, and the tensor count: tqdm when installed, else a plain line."""

    def __init__(self, total_bytes: int, n_tensors: int, enabled: bool):
        self.total, self.n, self.done, self.bytes = total_bytes, n_tensors, 0, 0
        self.enabled, self.bar, self.t0, self.last = enabled, None, time.monotonic(), 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
            except ImportError:
                pass

    def advance(self, nbytes: int, tensor_done: bool) -> None:
        self.bytes += nbytes
        self.done += tensor_done
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"tensor {self.done}/{self.n}", refresh=False)
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.last > 1.0 or self.done == self.n:
            self.last, dt = now, max(now - self.t0, 1e-9)
            rate = self.bytes / dt
            eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
            print(f"\rmerge: tensor {self.done}/{self.n}, {self.bytes / 1e6:.0f}/{self.total / 1e6:.0f} MB, "
                  f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f}s", end="\n" if self.done == self.n else "",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Writer:
    """Does the file writes in one background thread, in submission order, so writing and fsync
    overlap the merging math (os.write, copy_file_range and fsync release the GIL).

    Output tensors go through two alternating buffers: the merge fills one while the other is written.
    """

    def __init__(self, progress: _Progress, hold):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.slots = [(None, None), (None, None)]      # (buffer, future of the write that reads it)
        self.turn, self.progress, self.hold, self.fds = 0, progress, hold, set()

    def submit(self, fn, *args) -> Future:
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()             # surface a failed write now
        future = self.pool.submit(fn, *args)
        self.pending.append(future)
        return future

    def buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An output buffer nobody is writing from any more."""
        buf, future = self.slots[self.turn]
        if future is not None:
            future.result()
        n = math.prod(shape)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self.slots[self.turn] = (None, None)
            buf = torch.empty(n, dtype=dtype)
        self.slots[self.turn] = (buf, None)
        return buf[:n].view(shape)

    def write_tensor(self, fd: int, t: torch.Tensor, nbytes: int, tensor_done: bool) -> None:
        """Write `t` (a buffer from .buffer()) and count `nbytes` of input as done."""
        def job():
            write_all(fd, t)
            self.progress.advance(nbytes, tensor_done)
            if tensor_done:
                self.hold()
        self.slots[self.turn] = (self.slots[self.turn][0], self.submit(job))
        self.turn ^= 1

    def open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags, 0o644)
        self.fds.add(fd)
        return fd

    def close_fds(self, *fds: int, sync: int | None = None) -> None:
        """Queued after the writes: fsync `sync`, then close the fds."""
        def job():
            if sync is not None:
                os.fsync(sync)
            for fd in fds:
                self.fds.discard(fd)
                os.close(fd)
        self.submit(job)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        for fd in self.fds:
            os.close(fd)
        if exc_type is None:
            while self.pending:
                self.pending.popleft().result()
        return False


_CONVERT_ELEMS = 4 * 1024 * 1024     # elements per --dtype conversion step


def _write_shard(shard: Shard, out_path: Path, plan: dict[str, list[_Update]], adapter_fds: dict[Path, int],
                 dtype: str | None, writer: _Writer, ws: Workspace) -> None:
    """One output shard: its header, then every tensor in the base shard's order (merged, converted or
    copied). The reads and the math run here; the writes are queued on `writer`."""
    header, _ = shard_header(shard, dtype)
    src = writer.open(shard.path, os.O_RDONLY)
    dst = writer.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    writer.submit(write_all, dst, header)
    for t in shard.entries:
        out = out_dtype(t, dtype)
        if t.name in plan:
            raw = pread_exact(src, t.nbytes, t.begin, shard.path, ws.get("W", (t.nbytes,), torch.uint8))
            W = raw.view(ST_DTYPES[t.dtype][1]).view(t.shape)
            terms = [u.load(adapter_fds[u.path]) for u in plan[t.name]]
            merged = merged_weight(W, terms, ST_DTYPES[out][1], ws, writer.buffer(t.shape, ST_DTYPES[out][1]))
            writer.write_tensor(dst, merged, t.nbytes, True)
        elif out != t.dtype:                        # --dtype: convert element-wise, chunk by chunk
            size, src_dt, out_dt = ST_DTYPES[t.dtype][0], ST_DTYPES[t.dtype][1], ST_DTYPES[out][1]
            n_elems = math.prod(t.shape)
            for e0 in range(0, max(n_elems, 1), _CONVERT_ELEMS):
                n = min(_CONVERT_ELEMS, n_elems - e0)
                raw = pread_exact(src, n * size, t.begin + e0 * size, shard.path, ws.get("W", (n * size,), torch.uint8))
                chunk = writer.buffer((n,), out_dt).copy_(raw.view(src_dt))
                writer.write_tensor(dst, chunk, n * size, e0 + n >= n_elems)
        else:
            def copy(t=t):
                copy_bytes(src, dst, t.begin, t.nbytes, shard.path, lambda k: writer.progress.advance(k, False))
                writer.progress.advance(0, True)
                writer.hold()
            writer.submit(copy)
    writer.close_fds(src, dst, sync=dst)


def _test_hold_hook():
    """For the crash-safety test: with LORA_MERGE_TEST_HOLD=<file>, after the first tensor is written
    create <file> and sleep, so a test can SIGKILL the merge at a known moment."""
    path = os.environ.get("LORA_MERGE_TEST_HOLD")
    state = {"fired": False}

    def hold():
        if path and not state["fired"]:
            state["fired"] = True
            Path(path).write_text(str(os.getpid()))
            time.sleep(600)
    return hold


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str | None) -> list[str]:
    """config.json, generation_config.json, tokenizer files…: every top-level non-weight file."""
    copied = []
    for p in sorted(base_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name == "config.json" and dtype is not None:
            cfg = json.loads(p.read_text())
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
            for k in keys:
                cfg[k] = TORCH_NAME[dtype]
            (out_dir / p.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(p, out_dir / p.name)
        copied.append(p.name)
    return copied


# -- --verify -----------------------------------------------------------------------------------
def _reference_model(base_dir: Path, adapter_dirs: list[Path], weights: list[float]):
    """Base model in fp32 carrying the adapter(s) unmerged, as our LoRALinear.

    One adapter: exactly lora.load_adapter. Several: per module one LoRALinear whose rank is the sum
    of the adapters' ranks, A = [A_1; A_2; …] and B = [w_1 s_1 B_1, w_2 s_2 B_2, …] with scaling 1,
    so its forward is x Wᵀ + Σ_i w_i s_i (x A_iᵀ) B_iᵀ — the unmerged sum.
    """
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from ..storage.adapter import load_adapter
    from ..core.layer import LoRALinear

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if len(adapter_dirs) == 1 and weights[0] == 1.0:
        return load_adapter(model, adapter_dirs[0])
    modules = dict(model.named_modules())
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, ups in _plan_updates(adapter_dirs, weights, _module_weights(model)).items():
        module = name.removesuffix(".weight")
        parts[module] = []
        for u in ups:
            fd = os.open(u.path, os.O_RDONLY)
            try:
                t = u.load(fd)
            finally:
                os.close(fd)
            parts[module].append((t.lora_A.float(), t.lora_B.float() * (t.scaling * t.weight)))
    with torch.no_grad():
        for module, ab in parts.items():
            linear = modules[module]
            if not isinstance(linear, nn.Linear):
                raise LoRAError(f"verify: {module} is a {type(linear).__name__}, not an nn.Linear")
            r = sum(a.shape[0] for a, _ in ab)
            layer = LoRALinear(linear, r=r, alpha=r)                       # scaling = 1
            layer.lora_A.copy_(torch.cat([a for a, _ in ab], dim=0))       # (Σr, in)
            layer.lora_B.copy_(torch.cat([b for _, b in ab], dim=1))       # (out, Σr)
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def _module_weights(model) -> dict[str, Entry]:
    """The fp32 model's parameters as header entries, so _plan_updates can check shapes against them."""
    return {n: Entry(n, "F32", tuple(p.shape), 0, 0) for n, p in model.named_parameters()}


# Tolerance on max |logit difference|, relative to the logits' scale max(1, max|logit|). The merged
# weights are rounded once to their dtype (unit roundoff u: 2^-11 fp16, 2^-8 bf16) and that error
# passes through every layer: 16·u. For fp32 the difference comes from activation roundoff
# (x Wᵀ + s·(x Aᵀ) Bᵀ vs x (W + s·B A)ᵀ), not weight rounding: a floor of 2^-16 (1.5e-5) covers it.
_UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}
VERIFY_ULPS, VERIFY_FLOOR = 16, 2.0 ** -16


@torch.no_grad()
def verify_merged(base_dir: Path, adapter_dirs: list[Path], weights: list[float],
                  merged_dir: Path, n_seq: int = 3, seq_len: int = 16) -> tuple[float, float, float]:
    """(max |logit difference|, tolerance, adapter effect) between base+adapter (unmerged, our layer)
    and the merged checkpoint, both run in fp32 on the same random token sequences. The adapter's
    effect, max |logits(base+adapter) - logits(base)|, says how much a wrong merge could show."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..core.inject import disable_adapter

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()            # our own bar has already run; theirs would repeat
    try:
        ref_model = _reference_model(base_dir, adapter_dirs, weights)
        vocab = ref_model.config.vocab_size
        ids = torch.randint(0, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
        ref = ref_model(input_ids=ids).logits.float()
        with disable_adapter(ref_model):
            effect = (ref_model(input_ids=ids).logits.float() - ref).abs().max().item()
        del ref_model
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits.float()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    shards, _ = read_checkpoint(merged_dir)
    worst = max((_UNIT_ROUNDOFF[t.dtype] for s in shards for t in s.entries if t.dtype in _UNIT_ROUNDOFF),
                default=2.0 ** -24)
    tol = max(VERIFY_ULPS * worst, VERIFY_FLOOR) * max(1.0, ref.abs().max().item())
    return (got - ref).abs().max().item(), tol, effect


# -- the entry point ----------------------------------------------------------------------------
class VerifyError(LoRAError):
    """--verify found the merged model's logits too far from base+adapter's."""


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


def merge_checkpoint(base_dir, adapter_dirs, out_dir, weights=None, dtype=None, force: bool = False,
                     verify: bool = False, progress: bool = True) -> MergeReport:
    """Write base + Σ weights[i]·adapter[i] to `out_dir` as a complete Hugging Face checkpoint.

    base_dir:     HF checkpoint dir with model.safetensors or model.safetensors.index.json (+ shards)
    adapter_dirs: one PEFT-format adapter dir, or a list of them
    weights:      one float per adapter (default 1.0 each); the deltas are summed in fp32
    dtype:        None (keep each tensor's dtype) or "float32"/"float16"/"bfloat16" (or a torch dtype)
                  for every float tensor of the output; config.json's dtype follows
    force:        replace an existing out_dir (atomically: the old one goes only once the new is complete)
    verify:       compare logits of base+adapter (our LoRALinear, unmerged) and the merged model before
                  the output is moved into place; above a dtype-suited tolerance it raises LoRAError
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
    entries = {t.name: t for s in shards for t in s.entries}
    if len(entries) != sum(len(s.entries) for s in shards):
        raise LoRAError(f"{base_dir}: a tensor name appears in more than one shard")
    plan = _plan_updates(adapter_dirs, weights, entries)

    sizes = [shard_header(s, out_dt)[1] for s in shards]
    bar = _Progress(sum(t.nbytes for t in entries.values()), len(entries), progress)
    hold = _test_hold_hook()
    report = MergeReport(out_dir, len(entries), len(plan), 0, 0.0)
    try:
        with atomic_dir(out_dir) as tmp:
            with contextlib.ExitStack() as stack, _Writer(bar, hold) as writer:
                adapter_fds, ws = {}, Workspace()
                for path in {u.path for ups in plan.values() for u in ups}:
                    adapter_fds[path] = fd = os.open(path, os.O_RDONLY)
                    stack.callback(os.close, fd)
                for shard in shards:
                    _write_shard(shard, tmp / shard.path.name, plan, adapter_fds, out_dt, writer, ws)
            if index is not None:
                index = dict(index, metadata=dict(index.get("metadata") or {}, total_size=sum(sizes)))
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            report.side_files = _copy_side_files(base_dir, tmp, out_dt)
            bar.close()
            report.bytes_written = sum(sizes)
            report.seconds = time.monotonic() - t0
            if verify:
                t1 = time.monotonic()
                report.max_abs_diff, report.tolerance, report.adapter_effect = verify_merged(base_dir, adapter_dirs, weights, tmp)
                report.verify_seconds = time.monotonic() - t1
                if not report.max_abs_diff <= report.tolerance:
                    raise VerifyError(f"verify: max |logit difference| {report.max_abs_diff:.3g} exceeds the "
                                    f"tolerance {report.tolerance:.3g}; nothing written")
    finally:
        bar.close()
    return report
