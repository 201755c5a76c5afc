"""train.py when things go wrong: signals, a full or read-only disk, poisoned checkpoints, two runs on one
--out, bad arguments. Each test runs the real script and asserts the exit code, the single stderr line
and the files left on disk."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_merge_infer_failures import files, small_tmpfs, wait_for
from test_train import adapter, metrics, run_cli, tiny, tiny_args  # noqa: F401  (tiny: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def long_run(tiny, out, *extra):
    return tiny_args(tiny, out, "--max-steps", 80, "--save-every", 4, "--log-every", 1, "--lora-dropout", 0.1,
                     "--keep-checkpoints", 2, *extra)


def leftovers(out: Path) -> list[str]:
    """What a run into `out` must never leave, in it or beside it: temporaries, moved-aside targets, its
    lock. Another run's files beside it (one still going) are not this run's."""
    inside = [f"{out.name}/{p}" for p in files(out) if Path(p).name.startswith((".tmp-", ".old-"))]
    beside = [p.name for p in out.parent.iterdir()
              if p.name.startswith((f".tmp-{out.name}.", f".old-{out.name}.", f".{out.name}.lock"))]
    return inside + beside


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_in_flight_and_resume_is_bit_identical(tiny, tmp_path, signum, code):
    ref = run_cli(long_run(tiny, tmp_path / "ref"))
    out = tmp_path / "run"
    run = run_cli(long_run(tiny, out))
    wait_for(out / "checkpoints" / "step-4", run)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == code, err
    last = err.strip().splitlines()[-1]
    step = int(last.split("(step ")[1].split(" ")[0])
    assert 4 <= step < 80, "the run finished before the signal; raise --max-steps"
    assert last == (f"interrupted: checkpoint {out / 'checkpoints' / f'step-{step}'} (step {step} of 80) kept; "
                    "the same command with --resume continues from it")
    assert err.count("Traceback") == 0
    assert (out / "checkpoints" / f"step-{step}" / "state.json").is_file()
    assert not (out / "adapter").exists() and not leftovers(out)
    assert max(r["step"] for r in metrics(out)) == step             # logged up to the step it kept

    assert ref.wait() == 0, ref.stderr.read()
    resumed = run_cli(long_run(tiny, out, "--resume"))
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert f"resuming from {out / 'checkpoints' / f'step-{step}'}" in err
    want, got = adapter(tmp_path / "ref" / "adapter"), adapter(out / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    losses = lambda d: [(r["step"], r["loss"]) for r in metrics(d)]
    assert losses(out) == losses(tmp_path / "ref")
    assert not leftovers(out)


def test_a_second_run_on_the_same_out_fails_at_once_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    first = run_cli(long_run(tiny, out, "--max-steps", 100000))
    try:
        wait_for(out / "checkpoints" / "step-4", first)
        second = run_cli(long_run(tiny, out, "--max-steps", 100000))
        _, err = second.communicate(timeout=120)
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2
        assert err == (f"error: --out {out} is in use by another run (pid {first.pid}); wait for it to finish "
                       "or choose another --out\n")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Its lock died with it: the next run on that --out goes ahead.
    again = run_cli(long_run(tiny, out, "--max-steps", 8, "--force"))
    _, err = again.communicate()
    assert again.returncode == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not leftovers(out)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "error: --lr must be a positive number, got -1.0"),
    (["--lora-r", "0"], "error: LoRAConfig: r must be an integer >= 1, got 0"),
    (["--target-modules", "qproj"], "error: target module 'qproj' matches no module; candidates: down_proj, "
                                    "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--eval-split", "0.1"], "error: the demo evaluates on its own held-out examples: --eval-data and "
                              "--eval-split need --model and --data"),
])
def test_the_demo_checks_every_argument_before_writing(tmp_path, flags, message):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "demo"), *flags],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr == message + "\n"
    assert files(tmp_path) == set()


def test_targets_are_checked_before_a_real_run_writes(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cli(tiny_args(tiny, out, "--target-modules", "q_proj,nope", "--max-steps", 2))
    _, err = r.communicate()
    assert r.returncode == 2 and err.startswith("error: target module 'nope' matches no module")
    assert files(tmp_path) == set()


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_checkpoints(tiny, tmp_path):
    with small_tmpfs("4m") as mnt:
        if mnt is None:
            pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
        out = mnt / "run"
        run = run_cli(long_run(tiny, out, "--max-steps", 100000))
        try:
            wait_for(out / "checkpoints" / "step-4" / "state.json", run)
            with open(mnt / "filler", "wb", buffering=0) as f:        # the disk fills up under the run
                while True:
                    try:
                        f.write(b"\0" * 4096)
                    except OSError:
                        break
            _, err = run.communicate(timeout=300)
        finally:
            run.kill()
            run.wait()
        (mnt / "filler").unlink()
        assert run.returncode == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: {out}/") and line.endswith(": No space left on device"), line
        assert err.count("\n") <= 3 and "Traceback" not in err     # the run's two info lines, then the error
        kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
        assert kept and all((out / "checkpoints" / f"step-{s}" / "state.json").is_file() for s in kept)
        assert not leftovers(out) and not (out / "adapter").exists()


def test_a_read_only_out_is_one_line(tiny, tmp_path):
    with small_tmpfs("1m", read_only=True) as mnt:
        if mnt is None:
            pytest.skip("needs root to mount a read-only tmpfs (CI runs as root)")
        r = run_cli(tiny_args(tiny, mnt / "run", "--max-steps", 2))
        _, err = r.communicate()
        assert r.returncode == 1 and err == f"error: {mnt / 'run'}: Read-only file system\n"


def test_resume_refuses_a_poisoned_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    r = run_cli(tiny_args(tiny, out, "--max-steps", 4, "--save-every", 2))
    assert r.wait() == 0
    ckpt = out / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(ckpt)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(ckpt), metadata={"format": "pt"})
    before = {p: (out / p).stat().st_mtime_ns for p in files(out)}
    r = run_cli(tiny_args(tiny, out, "--max-steps", 4, "--save-every", 2, "--resume"))
    _, err = r.communicate()
    assert r.returncode == 2, err
    assert err.strip().splitlines()[-1] == (f"error: {out / 'checkpoints' / 'step-4' / 'adapter'}: {key} holds 1 "
                                             "non-finite value(s) (NaN or ±inf); refusing a poisoned adapter")
    assert {p: (out / p).stat().st_mtime_ns for p in files(out)} == before      # nothing written


def test_sigterm_under_torchrun_stops_every_rank_at_one_step(tiny, tmp_path):
    """torchrun passes SIGTERM on to its workers; they agree on the step to stop at (one all-reduce per
    step) and rank 0 writes that step's checkpoint with every rank's RNG state."""
    out = tmp_path / "ddp"
    args = long_run(tiny, out, "--max-steps", 100000, "--batch-size", 4, "--device", "cpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "train.py")]
    run = subprocess.Popen([*torchrun, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        wait_for(out / "checkpoints" / "step-4" / "state.json", run, timeout=180)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
        run.wait()
    assert run.returncode != 0
    kept = [line for line in err.splitlines() if line.startswith("interrupted: checkpoint ")]
    assert len(kept) == 2 and kept[0] == kept[1], err[-3000:]        # each rank's line: the same step
    step = int(kept[0].split("(step ")[1].split(" ")[0])
    ckpt = out / "checkpoints" / f"step-{step}"
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    rng = torch.load(ckpt / "trainer_state.pt", weights_only=True)["rng"]
    assert len(rng) == 2                                             # both ranks took part in that step's save
    assert "lora/" not in err                                        # no traceback from the workers (torchrun's own agent prints one)
    assert not leftovers(out)


@pytest.mark.parametrize("kind", ["directory", "symlink-loop"])
def test_a_data_path_that_is_no_file_is_one_line(tiny, tmp_path, kind):
    data = tmp_path / "data.jsonl"
    if kind == "directory":
        data.mkdir()
        message = f"error: {data}: is a directory (expected a data file)\n"
    else:
        data.symlink_to(data)
        message = f"error: {data}: a symbolic link to nothing (a loop, or its target is gone)\n"
    args = tiny_args(tiny, tmp_path / "out", "--max-steps", 2)
    args[args.index("--data") + 1] = str(data)
    r = run_cli(args)
    _, err = r.communicate()
    assert r.returncode == 2 and err == message
    assert files(tmp_path) == {"data.jsonl"}

