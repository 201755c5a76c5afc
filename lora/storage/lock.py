"""One writer per output: an exclusive lock on an output path for a run's whole life.

The lock is the file `.<name>.lock` beside the output `<name>`, holding the owner's pid, with an
exclusive `flock` on it. A second run on the same output finds the lock taken and fails at once,
naming the holder's pid, before it writes anything. The kernel drops a `flock` when its process
dies, SIGKILL included, so a lock left by a killed run is no lock: the next run takes it over (and
`--resume` works as before).

A process that holds the lock may take it again (the demo holds `--out` while it writes the base
model there, and the training run it starts takes it too); it is released with the outermost hold.
The lock file is removed when the run ends. Removing a file that another process may have opened
but not yet locked is the classic race of lock files; it is closed by checking, once the lock is
held, that the path still names the locked file (same inode), and starting over if it does not.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoRAError

try:
    import fcntl
except ImportError:             # not POSIX: no locking
    fcntl = None


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


_HELD: dict[Path, int] = {}       # lock files this process holds -> how many holds are open


class OutputLock:
    """`with OutputLock(out, flag="--out"):` the run's exclusive hold on `out` (a file or directory,
    existing or not). Creates `out`'s parent directory if needed: the lock file lives there."""

    def __init__(self, target: str | os.PathLike, flag: str = "--out"):
        self.target, self.flag = Path(target), flag
        self.path = lock_path(self.target)
        self.fd: int | None = None
        self.key = self.path.resolve()
        self.nested = False

    def acquire(self) -> "OutputLock":
        if fcntl is None:
            return self
        if self.key in _HELD:                # this process holds it already
            _HELD[self.key] += 1
            self.nested = True
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:                 # a read-only or full file system, no permission: say where
            raise OSError(e.errno, e.strerror, str(self.target)) from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise LoRAError(f"{self.flag} {self.target} is in use by another run (pid {holder}); wait for it "
                                f"to finish or choose another {self.flag}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                 # the previous holder removed the file we opened: again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.fd = fd
        _HELD[self.key] = 1
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self.release()
            raise OSError(e.errno, e.strerror, str(self.target)) from None
        return self

    def release(self) -> None:
        if self.nested:
            _HELD[self.key] -= 1
            self.nested = False
            return
        if self.fd is None:
            return
        del _HELD[self.key]
        try:
            os.unlink(self.path)         # still locked: a waiter that opened it will see it is gone
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
