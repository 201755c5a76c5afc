"""merge.py and infer.py when things go wrong: signals, full and read-only disks, poisoned weights and
two writers on one output. Each test runs the real script in a subprocess and asserts the exit code,
the single stderr line and the exact set of files left on disk."""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_merge import make_adapter, make_base

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from lora.demo.tokenizer import char_vocab, save_char_tokenizer
    d = tmp_path_factory.mktemp("failures")
    base = make_base(d / "base", vocab_size=len(char_vocab()))
    save_char_tokenizer(base)                    # a real tokenizer, for infer.py
    return {"base": base, "adapter": make_adapter(base, d / "adapter")}


def files(d: Path) -> set[str]:
    """Every path under `d`, relative, hidden ones included."""
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_script(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def start_driver(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def held(script: str, module: str, function: str) -> str:
    """Python code that runs `script` (argv: READY then the script's arguments) with `module.function`
    held for a minute, on the main thread (where signals land), the first time it is called: READY
    appears, and the work is caught in the middle."""
    return f"""
import runpy, sys, time
from pathlib import Path
import {module} as target
ready, original = Path(sys.argv[1]), target.{function}
def held(*args, **kw):
    ready.touch()
    time.sleep(60)
    return original(*args, **kw)
target.{function} = held
sys.argv = ["{script}", *sys.argv[2:]]
runpy.run_path("{script}", run_name="__main__")
"""


# merge.py with its first merged weight held, inside the temporary output directory
HELD_MERGE = held("merge.py", "lora.merging.writer", "merged_weight")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_keeps_the_old_out(work, tmp_path, signum, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous merge")
    ready = tmp_path / "ready"
    proc = start_driver(HELD_MERGE, ready, "--base", work["base"], "--adapter", work["adapter"], "--out", out,
                        "--force", "--no-progress")
    wait_for(ready, proc)
    assert any(p.name.startswith(".tmp-out.") for p in tmp_path.iterdir())      # mid-merge indeed
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert stderr == f"interrupted: nothing written, {out} left as it was\n" and stdout == ""
    assert files(tmp_path) == {"ready", "out", "out/old.txt"}
    assert (out / "old.txt").read_text() == "the previous merge"


def test_a_second_merge_on_the_same_out_fails_at_once(work, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = start_driver(HELD_MERGE, ready, "--base", work["base"], "--adapter", work["adapter"], "--out", out,
                          "--no-progress")
    try:
        wait_for(ready, holder)
        before = files(tmp_path)
        t0 = time.monotonic()
        r = run_script(["merge.py", "--base", work["base"], "--adapter", work["adapter"], "--out", out, "--force"])
        assert r.returncode == 2 and time.monotonic() - t0 < 60
        assert r.stderr == (f"error: --out {out} is in use by another run (pid {holder.pid}); wait for it to "
                            "finish or choose another --out\n")
        assert files(tmp_path) == before                                        # wrote nothing
    finally:
        holder.kill()
        holder.communicate()
    # The holder was SIGKILLed: its lock died with it, and the next merge runs (and cleans up after it).
    r = run_script(["merge.py", "--base", work["base"], "--adapter", work["adapter"], "--out", out, "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert {p for p in files(tmp_path) if "/" not in p} == {"ready", "out"}


# -- full and read-only file systems ---------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(size: str, read_only: bool = False):
    """A tmpfs of `size` (root only; CI runs as root), unmounted afterwards; None when none can be had."""
    if os.geteuid() != 0:
        yield None
        return
    mnt = Path(tempfile.mkdtemp(prefix="lora-tmpfs-"))
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode:
        mnt.rmdir()
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)     # lazy: even if a killed child holds it
        mnt.rmdir()


def test_a_merge_that_cannot_fit_says_so_before_writing(work):
    with small_tmpfs("64k") as mnt:
        if mnt is None:
            pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
        out = mnt / "merged"
        r = run_script(["merge.py", "--base", work["base"], "--adapter", work["adapter"], "--out", out])
        assert r.returncode == 1
        assert r.stderr.startswith(f"error: --out {out}: the merged checkpoint needs ") and r.stderr.count("\n") == 1
        assert r.stderr.endswith(" MB free; nothing written\n")
        assert files(mnt) == set()


# The disk fills up during the merge: every write of tensor bytes fails as a full disk's would.
FULL_DISK_MERGE = """
import errno, os, sys
import lora.merging.writer as writer
def full(fd, data):
    if not isinstance(data, bytes):                    # the shard header fits; the first tensor does not
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.write(fd, data)
writer.write_all = full
import runpy
sys.argv = ["merge.py", *sys.argv[1:]]
runpy.run_path("merge.py", run_name="__main__")
"""


def test_a_disk_that_fills_up_mid_merge_is_one_line_and_leaves_nothing(work, tmp_path):
    out = tmp_path / "out"
    proc = start_driver(FULL_DISK_MERGE, "--base", work["base"], "--adapter", work["adapter"], "--out", out,
                        "--no-progress")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert stderr == f"error: {out / 'model.safetensors'}: {os.strerror(errno.ENOSPC)}\n"
    assert files(tmp_path) == set()


def test_a_read_only_out_is_one_line(work, tmp_path):
    with small_tmpfs("1m", read_only=True) as mnt:
        if mnt is None:                        # not root: a directory without write permission instead
            mnt = tmp_path / "ro"
            mnt.mkdir()
            mnt.chmod(0o555)
        out = mnt / "merged"
        r = run_script(["merge.py", "--base", work["base"], "--adapter", work["adapter"], "--out", out])
        assert r.returncode == 1
        assert r.stderr in (f"error: {out}: {os.strerror(errno.EROFS)}\n", f"error: {out}: {os.strerror(errno.EACCES)}\n")
        assert files(mnt) == set()


def test_a_symlink_loop_as_base_is_one_line(work, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    r = run_script(["merge.py", "--base", loop, "--adapter", work["adapter"], "--out", tmp_path / "out"])
    assert r.returncode == 2 and r.stderr == f"error: base checkpoint {loop} is not a directory\n"
    assert files(tmp_path) == {"loop"}


# -- poisoned weights ------------------------------------------------------------------------------
def poisoned_adapter(src: Path, dst: Path, value: float) -> tuple[Path, str]:
    """A copy of the adapter `src` with one element of one lora_B set to `value`; (dir, that key)."""
    dst.mkdir()
    tensors = load_file(src / ADAPTER_FILE)
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[3]
    tensors[key][1, 2] = value
    save_file(tensors, str(dst / ADAPTER_FILE), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst, key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_merge_refuses_a_non_finite_adapter(work, tmp_path, value):
    bad, key = poisoned_adapter(work["adapter"], tmp_path / "bad", value)
    out = tmp_path / "out"
    r = run_script(["merge.py", "--base", work["base"], "--adapter", bad, "--out", out])
    assert r.returncode == 2
    assert r.stderr == (f"error: {bad / ADAPTER_FILE}: {key} holds 1 non-finite value(s) (NaN or ±inf); "
                        "refusing a poisoned adapter\n")
    assert files(tmp_path) == {"bad", f"bad/{ADAPTER_FILE}", "bad/adapter_config.json"}


def test_a_merge_never_writes_inf_into_a_finite_weight(work, tmp_path):
    """A finite adapter whose update overflows the output dtype (fp16: |x| > 65504) is refused."""
    base = make_base(tmp_path / "base16", dtype=torch.float16)
    big = tmp_path / "big"
    big.mkdir()
    tensors = load_file(work["adapter"] / ADAPTER_FILE)
    for k in tensors:
        if k.endswith("lora_B.weight"):
            tensors[k] = tensors[k] * 1e6
    save_file(tensors, str(big / ADAPTER_FILE), metadata={"format": "pt"})
    (big / "adapter_config.json").write_text((work["adapter"] / "adapter_config.json").read_text())
    out = tmp_path / "out"
    r = run_script(["merge.py", "--base", base, "--adapter", big, "--out", out, "--no-progress"])
    assert r.returncode == 1
    assert r.stderr.startswith("error: model.layers.0.") and r.stderr.count("\n") == 1
    assert r.stderr.endswith(" non-finite value(s) where the base had none (the update overflows "
                             "torch.float16); nothing written\n")
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_infer_refuses_a_non_finite_adapter(work, tmp_path):
    bad, key = poisoned_adapter(work["adapter"], tmp_path / "bad", float("nan"))
    r = run_script(["infer.py", "--model", work["base"], "--adapter", bad, "--prompt", "hello"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {bad}: {key} holds 1 non-finite value(s)")


# -- infer.py interrupted --------------------------------------------------------------------------
HELD_INFER = held("infer.py", "lora.inference.complete", "generate")      # infer.py before its first batch


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_generation_is_one_line(work, tmp_path, signum, code):
    ready = tmp_path / "ready"
    proc = start_driver(HELD_INFER, ready, "--model", work["base"], "--adapter", work["adapter"],
                        "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu")
    wait_for(ready, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and stderr == "interrupted\n"
    assert files(tmp_path) == {"ready"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere(dtype):
    from lora.core.delta import all_finite
    g = torch.Generator().manual_seed(0)
    t = torch.randn(67, 129, generator=g).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for value in (float("nan"), float("inf"), float("-inf")):
        for i, j in ((0, 0), (66, 128), (31, 77)):
            bad = t.clone()
            bad[i, j] = value
            assert not all_finite(bad), (value, i, j)
