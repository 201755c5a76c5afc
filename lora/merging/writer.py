"""Writing the output shards: the math and the reads on the caller's thread, the writes on a background one.

`write_shard` writes one output shard: its header first (known in advance: same shapes, known
dtypes), then every tensor in the base shard's order. An adapted weight is read with one `pread`
into a reused buffer and merged (lora/core/delta.py's `merged_weight`); with a new dtype every other
float tensor is converted chunk by chunk; anything else is copied file to file by the kernel
(`copy_file_range`), never through our address space.

`Writer` runs the writes and each shard's fsync in one background thread, in submission order, so
they overlap the merging of the next weight (os.write, copy_file_range and fsync release the GIL).
"""
from __future__ import annotations

import collections
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..core.delta import Workspace, all_finite, merged_weight
from ..errors import LoRAFailure
from ..runtime.progress import Progress
from ..storage.safetensors_stream import ST_DTYPES, Shard, copy_bytes, out_dtype, pread_exact, shard_header, write_all
from ..storage.quantized import read_nf4
from .plan import Update

_CONVERT_ELEMS = 4 * 1024 * 1024     # elements per dtype-conversion step


class Writer:
    """Does the file writes in one background thread, in submission order, and counts them on
    `progress` (input bytes done, and the tensor count beside the bar).

    Output tensors go through two alternating buffers: the merge fills one while the other is written.
    """

    def __init__(self, progress: Progress, n_tensors: int):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.slots = [(None, None), (None, None)]      # (buffer, future of the write that reads it)
        self.turn, self.paths = 0, {}                    # open fd -> its file, for error messages
        self.progress, self.n_tensors, self.tensors_done = progress, n_tensors, 0

    def submit(self, fn, *args, fd: int | None = None) -> Future:
        """Queue fn(*args); an OSError it raises names the file of `fd` (os.write's errors name none)."""
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()             # surface a failed write now

        def job():
            try:
                fn(*args)
            except OSError as e:
                if e.filename is None and fd in self.paths:
                    raise OSError(e.errno, e.strerror, str(self.paths[fd])) from None
                raise
        future = self.pool.submit(job)
        self.pending.append(future)
        return future

    def advance(self, nbytes: int, tensor_done: bool) -> None:
        """`nbytes` more of the input written (on the writer thread); `tensor_done`: a tensor finished."""
        if not tensor_done:
            self.progress.update(nbytes)
            return
        self.tensors_done += 1
        self.progress.update(nbytes, tensor=f"{self.tensors_done}/{self.n_tensors}")

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
            self.advance(nbytes, tensor_done)
        self.slots[self.turn] = (self.slots[self.turn][0], self.submit(job, fd=fd))
        self.turn ^= 1

    def open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags, 0o644)
        self.paths[fd] = path
        return fd

    def close_fds(self, *fds: int, sync: int | None = None) -> None:
        """Queued after the writes: fsync `sync`, then close the fds."""
        def job():
            if sync is not None:
                os.fsync(sync)
            for fd in fds:
                self.paths.pop(fd, None)
                os.close(fd)
        self.submit(job, fd=sync)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        for fd in self.paths:
            os.close(fd)
        if exc_type is None:
            while self.pending:
                self.pending.popleft().result()
        return False


def write_shard(shard: Shard, out_path: Path, plan: dict[str, list[Update]], adapter_fds: dict[Path, int],
                dtype: str | None, writer: Writer, ws: Workspace, nf4: dict | None = None) -> None:
    """One output shard: its header, then every tensor in the base shard's order (merged, converted or
    copied). `nf4`: the stored parts of a 4-bit base's weights (lora/storage/quantized.py), which are
    dequantized in fp32 first. The reads and the math run here; the writes are queued on `writer`."""
    header, _ = shard_header(shard, dtype)
    src = writer.open(shard.path, os.O_RDONLY)
    dst = writer.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    writer.submit(write_all, dst, header, fd=dst)
    for t in shard.entries:
        out = out_dtype(t, dtype)
        quantized = nf4 is not None and t.name in nf4
        if quantized and t.name not in plan:                # dequantized, written in the output dtype
            W = read_nf4(src, nf4[t.name], shard.path).dequantize(torch.float32)        # (out, in) fp32
            writer.write_tensor(dst, writer.buffer(t.shape, ST_DTYPES[out][1]).copy_(W), t.nbytes, True)
        elif t.name in plan:
            if quantized:
                W = read_nf4(src, nf4[t.name], shard.path).dequantize(torch.float32)    # (out, in) fp32
            else:
                raw = pread_exact(src, t.nbytes, t.begin, shard.path, ws.get("W", (t.nbytes,), torch.uint8))
                W = raw.view(ST_DTYPES[t.dtype][1]).view(t.shape)
            terms = [u.load(adapter_fds[u.path]) for u in plan[t.name]]
            merged = merged_weight(W, terms, ST_DTYPES[out][1], ws, writer.buffer(t.shape, ST_DTYPES[out][1]))
            check_merged_finite(t.name, merged, W)
            writer.write_tensor(dst, merged, t.nbytes, True)
        elif out != t.dtype:                        # a new dtype: convert element-wise, chunk by chunk
            size, src_dt, out_dt = ST_DTYPES[t.dtype][0], ST_DTYPES[t.dtype][1], ST_DTYPES[out][1]
            n_elems = math.prod(t.shape)
            for e0 in range(0, max(n_elems, 1), _CONVERT_ELEMS):
                n = min(_CONVERT_ELEMS, n_elems - e0)
                raw = pread_exact(src, n * size, t.begin + e0 * size, shard.path, ws.get("W", (n * size,), torch.uint8))
                chunk = writer.buffer((n,), out_dt).copy_(raw.view(src_dt))
                writer.write_tensor(dst, chunk, n * size, e0 + n >= n_elems)
        else:
            def copy(t=t):
                copy_bytes(src, dst, t.begin, t.nbytes, shard.path, lambda k: writer.advance(k, False))
                writer.advance(0, True)
            writer.submit(copy, fd=dst)
    writer.close_fds(src, dst, sync=dst)


def check_merged_finite(name: str, merged: torch.Tensor, W: torch.Tensor) -> None:
    """A merge never writes NaN or ±inf into a weight that had none (an update too large for the
    output dtype overflows to inf). One pass over the merged weight; W is read only if that fails."""
    if not all_finite(merged) and all_finite(W):
        bad = (~torch.isfinite(merged)).sum().item()
        raise LoRAFailure(f"{name}: the merged weight has {bad} non-finite value(s) where the base had none "
                          f"(the update overflows {merged.dtype}); nothing written")
