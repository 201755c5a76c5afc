"""Crash-safe writes: build into a temporary path beside the target, then rename.

A SIGKILL at any moment leaves either the old target (or none) or the complete new one, never a
half-written one. Stale temporaries from a killed run carry a recognisable prefix and are removed by
`clean_stale`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _tmp_sibling(target: Path, is_dir: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{target.name}-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    return Path(name)


def clean_stale(target: str | os.PathLike) -> None:
    """Remove temporaries that a killed write of `target` left beside it."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f"{TMP_PREFIX}{target.name}-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary directory; on success it replaces `target` whole.

    With `overwrite=False` an existing target is an error. The old target (if any) is moved aside
    and deleted only after the new one is in place.
    """
    target = Path(target)
    clean_stale(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    tmp = _tmp_sibling(target, is_dir=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = _tmp_sibling(target, is_dir=True)
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temporary file + rename)."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
