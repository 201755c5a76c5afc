"""Ctrl-C and SIGTERM as exceptions, so that every `with` and `finally` cleans up on the way out.

`handle_signals()` (each script calls it once, before any work) makes SIGINT and SIGTERM raise
`Interrupted` in the main thread: temporaries are removed by the code that made them, existing
outputs are untouched, and `lora.cli.run_main` prints one line and exits 128 + the signal number
(130 for SIGINT, 143 for SIGTERM).

`deferred_interrupts()` is for work that should end at a safe point: inside it the first signal is
only recorded (`.signum`), and the work checks it where stopping loses nothing (training: after the
optimizer step, then it writes a checkpoint). A second signal raises at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the work; `kept` says what was saved (shown after `interrupted`)."""

    def __init__(self, signum: int, kept: str = ""):
        super().__init__(kept)
        self.signum, self.kept = signum, kept

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Deferral:
    def __init__(self):
        self.signum: int | None = None


_DEFERRAL: _Deferral | None = None


def _raise(signum, frame) -> None:
    if _DEFERRAL is not None and _DEFERRAL.signum is None:
        _DEFERRAL.signum = signum            # the first one: the work stops at its next safe point
        return
    raise Interrupted(signum)


def handle_signals() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (main thread only; elsewhere this does nothing)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def deferred_interrupts():
    """Inside: the first SIGINT/SIGTERM sets `.signum` of the yielded object instead of raising."""
    global _DEFERRAL
    outer, _DEFERRAL = _DEFERRAL, _Deferral()
    try:
        yield _DEFERRAL
    finally:
        _DEFERRAL = outer
