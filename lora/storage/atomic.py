"""Crash-safe writes: build into a temporary path beside the target, then rename.

A SIGKILL at any moment leaves either the old target (or none, if there was none) or the complete
new one, never a half-written one. Beside the target `name` a write makes

    .tmp-<name>.<random>    the new content, while it is written
    .old-<name>.<random>    the previous target, moved aside for the final rename

and holds an exclusive `flock` on each while it works (the kernel drops it when the process dies,
even by SIGKILL). `clean_stale` acts only on entries whose lock it can take, so it never touches the
temporaries of a write still running in another process. A directory replaced whole cannot be
swapped in one rename: there is one instant when the old target is aside and the new one not yet in
place. A writer that dies there leaves the target missing and `.old-` beside it, and `clean_stale`
moves the old target back.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:             # not POSIX: no locks, so no temporary is ever judged stale
    fcntl = None

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_RANDOM = r"[a-z0-9_]{8}"       # tempfile's random part (.tmp-), or 8 hex digits (.old-)


def _lock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False if another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_locked(path: Path) -> int:
    """An fd of `path` (a file or a directory) holding its exclusive lock."""
    fd = os.open(path, os.O_RDONLY)
    _lock(fd)
    return fd


def _tmp_dir(target: Path) -> tuple[Path, int]:
    """A new `.tmp-` directory beside `target`, and the fd that holds its lock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent))
    return path, _open_locked(path)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)              # also drops the lock


def _is_ours(path: Path, prefix: str, target_name: str) -> bool:
    """Whether `path` is a temporary of `target_name` (not of another target whose name begins alike)."""
    return re.fullmatch(re.escape(prefix + target_name) + r"[.-]" + _RANDOM, path.name) is not None


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def _if_abandoned(path: Path):
    """Yield True when no running writer holds `path` (its lock is free; it stays ours meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:               # gone meanwhile, or unreadable: leave it
        yield False
        return
    try:
        yield _lock(fd)
    finally:
        os.close(fd)


def clean_stale(target: str | os.PathLike) -> None:
    """Undo what killed writes of `target` left beside it: move an old target that was set aside back
    if the target is missing, and delete the rest. A running writer's entries are left alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for prefix in (OLD_PREFIX, TMP_PREFIX):     # `.tmp-<name>-<random>`: named so before the locks; stale
        for p in sorted(target.parent.glob(f"{prefix}{target.name}*")):
            if not _is_ours(p, prefix, target.name):
                continue
            with _if_abandoned(p) as abandoned:
                if not abandoned:
                    continue
                if prefix == OLD_PREFIX and not target.exists():
                    os.replace(p, target)   # the writer died between its two renames: the old target stays
                else:
                    _remove(p)


def clean_stale_in(directory: str | os.PathLike) -> None:
    """`clean_stale` for every target that has temporaries in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    names = {m.group(1) for p in directory.iterdir()
             if (m := re.fullmatch(rf"(?:{re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)})(.+)[.-]{_RANDOM}", p.name))}
    for name in sorted(names):
        clean_stale(directory / name)


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
    tmp, tmp_fd = _tmp_dir(target)
    old, old_fd = None, None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old_fd = _open_locked(target)          # the lock moves aside with it
            old = target.parent / f"{OLD_PREFIX}{target.name}.{secrets.token_hex(4)}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as e:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)   # interrupted between the two renames (Ctrl-C): the old target stays
        shutil.rmtree(tmp, ignore_errors=True)
        _close(tmp_fd)
        _close(old_fd)
        _raise_naming(e, target)
    _close(tmp_fd)
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)
    _close(old_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    tmp = Path(name)
    try:
        _lock(fd)
        with open(fd, "w", closefd=False) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_naming(e, path)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`path` ← `data` with plain file I/O, so that a full disk is an OSError (ENOSPC) naming `path`.
    (safetensors and torch.save report a failed write in their own words; the writers of this package
    serialise to bytes in memory and write them here.)"""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        _raise_naming(e, path)


def _raise_naming(e: BaseException, path: str | os.PathLike):
    """Re-raise `e`; an OSError that names no file (os.write's, a full disk's) names `path`."""
    if isinstance(e, OSError) and e.filename is None:
        raise OSError(e.errno, e.strerror, str(path)) from None
    raise e
