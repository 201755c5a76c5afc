"""Keep freed memory inside the process (glibc's malloc), so a CPU training step reuses warm pages.

PyTorch's CPU tensors come from the C library's malloc. glibc gives large freed blocks back to the
kernel: blocks above the mmap threshold (128 KiB, raised on the fly up to 32 MiB) are unmapped on
free, and the heap's top is trimmed once more than twice that is free. A training step frees nearly
everything it allocated, so the next step gets fresh pages, and each 4 KiB page costs a minor fault
that the kernel zeroes: a cost per step that grows with the activations (docs/train.md has the
counts and the time measured on this project's CPU machine).

`keep_freed_memory()` turns both off with two `mallopt` calls: no block is mmapped on its own
(M_MMAP_MAX = 0), and the heap's top is trimmed only once more than 2 GiB of it is free
(M_TRIM_THRESHOLD). The process then stays at its high-water mark, as PyTorch's CUDA caching
allocator does on a GPU. It is process-wide, so the layers and ops never call it; `lora.training.train`
(what train.py runs) does on CPU, unless `TrainConfig.keep_freed_memory` is False.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1    # from glibc's <malloc.h>
M_MMAP_MAX = -4
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 2**31 - 1   # mallopt takes an int: the largest value it accepts

_KEPT = False


def _glibc_mallopt():
    """glibc's `mallopt(param, value)`, or None where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version            # glibc only (musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process. True when set (or already set), False where the
    C library is not glibc (macOS, Windows, musl): nothing is changed there."""
    global _KEPT
    if _KEPT:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    _KEPT = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _KEPT


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """The opposite: glibc's mmap threshold fixed at `threshold` bytes (1 MiB), so every block that
    large is mapped on its own and unmapped when freed. By default glibc raises the threshold to each
    freed mapped block's size (up to 32 MiB), after which blocks up to that size come from the heap and
    stay in the process once freed. --fsdp uses it: every unit's all-gathered weights are allocated and
    freed twice a step, and the heap kept a good part of them (docs/fsdp.md). True when set; False where
    the C library is not glibc."""
    mallopt = _glibc_mallopt()
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1
