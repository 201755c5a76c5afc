"""Interrupts (lora/runtime/signals.py, lora.cli.run_main) and the one-writer lock
(lora/storage/lock.py), with real signals and real processes."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora.errors import LoRAError
from lora.storage.lock import OutputLock, lock_path

ROOT = Path(__file__).resolve().parents[1]


def start(code: str, tmp_path: Path) -> subprocess.Popen:
    """A child running `code` (which creates `ready` once it is waiting) under lora.cli.run_main."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


SLEEPER = """
    import sys, time
    from pathlib import Path
    from lora.cli import run_main
    def body():
        Path(sys.argv[1], "ready").touch()
        time.sleep(60)
    sys.exit(run_main(body))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_is_one_line_and_its_exit_code(tmp_path, signum, code):
    proc = start(SLEEPER, tmp_path)
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err == "interrupted\n" and out == ""


DEFERRING = """
    import sys, time
    from pathlib import Path
    from lora.cli import run_main
    from lora.runtime.signals import Interrupted, deferred_interrupts
    def body():
        with deferred_interrupts() as stop:
            Path(sys.argv[1], "ready").touch()
            for step in range(6000):                 # a "step" of 10 ms; the signal is checked between steps
                time.sleep(0.01)
                if stop.signum is not None:
                    Path(sys.argv[1], "second").touch()
                    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
                    raise Interrupted(stop.signum, kept=f"stopped after step {step}")
    sys.exit(run_main(body))
"""


def test_a_deferred_signal_ends_at_the_next_safe_point(tmp_path):
    proc = start(DEFERRING, tmp_path)
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.startswith("interrupted: stopped after step ") and err.count("\n") == 1


def test_a_second_signal_stops_at_once(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(DEFERRING))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "60"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGINT)
    wait_for(tmp_path / "second", proc)             # the safe point is slow (a 60 s "checkpoint")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err == "interrupted\n"


# -- one writer per output --------------------------------------------------------------------------
HOLDER = """
    import sys, time
    from pathlib import Path
    from lora.storage.lock import OutputLock
    with OutputLock(Path(sys.argv[1], "out")):
        Path(sys.argv[1], "ready").touch()
        time.sleep(60)
"""


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    holder = start(HOLDER, tmp_path)
    try:
        wait_for(tmp_path / "ready", holder)
        with pytest.raises(LoRAError, match=rf"^--out {tmp_path / 'out'} is in use by another run "
                                            rf"\(pid {holder.pid}\)"):
            OutputLock(tmp_path / "out").acquire()
    finally:
        holder.kill()
        holder.communicate()
    # A lock whose holder was SIGKILLed is no lock: the next run takes it, and removes it when done.
    assert lock_path(tmp_path / "out").is_file()
    with OutputLock(tmp_path / "out") as lock:
        assert lock_path(tmp_path / "out").read_text() == f"{os.getpid()}\n"
        assert lock.fd is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "ready"]


def test_a_process_may_hold_its_own_lock_twice(tmp_path):
    """The demo holds --out while it writes the base there, then the training run takes it too."""
    out = tmp_path / "a" / "out"
    for _ in range(2):
        with OutputLock(out):
            with OutputLock(out):
                pass
            assert lock_path(out).read_text() == f"{os.getpid()}\n"      # the inner release kept it
            holder = start(HOLDER.replace('Path(sys.argv[1], "out")', f'Path({str(out)!r})'), tmp_path)
            out_, err = holder.communicate(timeout=60)
            assert holder.returncode == 1 and "in use by another run" in err
        assert not lock_path(out).exists()
    assert list((tmp_path / "a").iterdir()) == []
