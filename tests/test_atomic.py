"""lora/storage/atomic.py: a write interrupted anywhere leaves the old target or the new one, and cleaning up
never touches a write that is still running."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora.storage.atomic import atomic_dir, atomic_write_text, clean_stale, clean_stale_in

ROOT = Path(__file__).resolve().parents[1]


def make_dir(path: Path, text: str) -> None:
    path.mkdir()
    (path / "f.txt").write_text(text)


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def run_writer(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_replace_and_no_leftovers(tmp_path):
    target = tmp_path / "out"
    make_dir(target, "old")
    with atomic_dir(target) as tmp:
        (tmp / "f.txt").write_text("new")
        assert (target / "f.txt").read_text() == "old"          # untouched until the end
    assert (target / "f.txt").read_text() == "new" and entries(tmp_path) == ["out"]
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").read_text() == "{}\n" and entries(tmp_path) == ["a.json", "out"]


def test_an_exception_or_ctrl_c_keeps_the_old_target(tmp_path):
    target = tmp_path / "out"
    make_dir(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError
    assert (target / "f.txt").read_text() == "old" and entries(tmp_path) == ["out"]
    # interrupted between moving the old target aside and moving the new one in
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    os.replace = replace
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(target) as tmp:
                (tmp / "f.txt").write_text("new")
    finally:
        os.replace = real_replace
    assert calls[0].startswith(".old-out.") and calls[1] == "out"
    assert (target / "f.txt").read_text() == "old" and entries(tmp_path) == ["out"]


def test_sigkill_between_the_two_renames_restores_the_old_target(tmp_path):
    """The writer dies with the old target moved aside and the new one complete but not in place:
    the next clean-up puts the old target back (the write did not happen), then removes the rest."""
    target = tmp_path / "out"
    make_dir(target, "old")
    proc = run_writer("""
        import os, sys
        from pathlib import Path
        from lora.storage.atomic import atomic_dir
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if Path(dst).name.startswith(".old-"):
                os.kill(os.getpid(), 9)
        os.replace = replace
        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "f.txt").write_text("new")
        """, target)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    names = entries(tmp_path)
    assert "out" not in names and len(names) == 2
    assert {n.split(".")[1] for n in names} == {"old-out", "tmp-out"}
    clean_stale(target)
    assert (target / "f.txt").read_text() == "old" and entries(tmp_path) == ["out"]


def test_cleaning_never_touches_a_running_writer(tmp_path):
    """Two writers of one target: the second one's clean-up leaves the first one's temporary alone
    while it runs, and removes it once the first is killed."""
    target, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    proc = run_writer("""
        import sys, time
        from pathlib import Path
        from lora.storage.atomic import atomic_dir
        target, ready, go = map(Path, sys.argv[1:])
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text("first")
            ready.touch()
            while not go.exists():
                time.sleep(0.02)
        """, target, ready, go)
    try:
        wait_for(ready, proc)
        (running,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out.")]
        clean_stale(target)
        clean_stale_in(tmp_path)
        assert running.is_dir() and (running / "f.txt").read_text() == "first"
        with atomic_dir(target) as tmp:                 # a second writer finishes meanwhile
            (tmp / "f.txt").write_text("second")
        assert running.is_dir()
        go.touch()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert (target / "f.txt").read_text() == "first"   # the last rename wins, whole
        assert entries(tmp_path) == ["go", "out", "ready"]
    finally:
        proc.kill()
        proc.wait()
    # a writer killed mid-write: its temporary is stale now
    go.unlink()
    ready.unlink()
    proc = run_writer("""
        import sys, time
        from pathlib import Path
        from lora.storage.atomic import atomic_dir
        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "f.txt").write_text("third")
            Path(sys.argv[2]).touch()
            time.sleep(600)
        """, target, ready)
    try:
        wait_for(ready, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out.")]) == 1
    clean_stale_in(tmp_path)
    assert entries(tmp_path) == ["out", "ready"] and (target / "f.txt").read_text() == "first"


def test_only_this_targets_temporaries_are_cleaned(tmp_path):
    (tmp_path / ".tmp-out.bak.abcd1234").mkdir()        # a temporary of "out.bak", not of "out"
    (tmp_path / ".tmp-outer.abcd1234").mkdir()          # of "outer"
    (tmp_path / ".tmp-out-zz_91xy0").mkdir()            # a killed write of "out" from before the locks
    (tmp_path / ".tmp-out.q1w2e3r4").write_text("x")    # a killed write of "out" (file)
    clean_stale(tmp_path / "out")
    assert entries(tmp_path) == [".tmp-out.bak.abcd1234", ".tmp-outer.abcd1234"]
    clean_stale_in(tmp_path)
    assert entries(tmp_path) == []
