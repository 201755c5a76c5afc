"""The Gaudi (HPU) paths against a recording fake of habana_frameworks (tests/fake_habana).

Each run is a subprocess (tests/gaudi_driver.py) so that import order is real: the fake records
PT_HPU_LAZY_MODE at its import, and every call our code makes, in order. What these tests verify is
the call protocol of Habana's documented API, not Gaudi hardware: nothing here has run on a Gaudi.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "gaudi_driver.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gaudi")
    from lora.demo.task import build_demo_base
    build_demo_base(tmp / "base", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2)
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"word{i}=", "completion": f"w{i * 7 % 10}"}) + "\n")
    (tmp / "prompts.txt").write_text("abc=\nhello there=\nx=\n")
    return tmp


def drive(tmp, name, script, *args):
    out = tmp / f"{name}.json"
    r = subprocess.run([sys.executable, str(DRIVER), str(out), script, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    return result["exit"], [tuple(c) for c in result["calls"]], r.stderr


def train_args(tmp, out, *extra):
    return ("--device", "hpu", "--model", str(tmp / "base"), "--data", str(tmp / "train.jsonl"), "--out",
            str(tmp / out), "--force", "--batch-size", "4", "--max-seq-len", "20", "--no-progress", *extra)


def names(calls):
    return [c[0] for c in calls]


def test_lazy_mode_with_hpu_graphs_training(setup):
    code, calls, err = drive(setup, "lazy", "train", *train_args(
        setup, "lazy", "--max-steps", "3", "--grad-accum", "2", "--lora-dropout", "0.1", "--dtype", "bf16",
        "--eval-split", "0.2"))
    assert code == 0, err
    n = names(calls)
    # PT_HPU_LAZY_MODE was set before the first habana import
    assert calls[0] == ("import habana_frameworks", {"PT_HPU_LAZY_MODE": "1"})
    # HPU Graphs: ModuleCacher once, on the bare model (no DDP wrapper), before the first step
    cachers = [c for c in calls if c[0] == "ModuleCacher"]
    assert len(cachers) == 1 and cachers[0][1]["inplace"] is True and cachers[0][1]["ddp"] is False
    assert n.index("ModuleCacher") < n.index("backward")
    assert "torch.compile" not in n
    # mark_step right after every backward and right after every optimizer step
    assert n.count("backward") == 3 * 2
    for i, name in enumerate(n):
        if name in ("backward", "FusedAdamW.step"):
            assert n[i + 1] == "mark_step", (i, n[i - 2:i + 3])
    assert n.count("FusedAdamW.step") == 3
    # FusedAdamW gets our eps (its own default is 1e-6) and no empty group; clip-norm is the fused one
    (adam,) = [c[1] for c in calls if c[0] == "FusedAdamW"]
    assert adam["eps"] == 1e-8 and all(s > 0 for s in adam["group_sizes"])
    assert n.count("FusedClipNorm.clip_norm") == 3
    # with graphs the grads are zeroed in place
    assert all(c[1]["set_to_none"] is False for c in calls if c[0] == "FusedAdamW.zero_grad")
    # bf16 autocast on the hpu device type around every forward
    autocasts = [c[1] for c in calls if c[0] == "autocast"]
    assert autocasts and all(a == {"device_type": "hpu", "dtype": "torch.bfloat16", "enabled": True} for a in autocasts)
    # static shapes: every training and eval forward saw one shape
    shapes = {json.dumps(c[1]["shapes"], sort_keys=True) for c in calls if c[0] == "cached_forward"}
    assert shapes == {json.dumps({"input_ids": [4, 20], "attention_mask": [4, 20]}, sort_keys=True)}
    # LoRA dropout drew no host-side seed (it would be frozen into the captured graph)
    assert "host_seed" not in n


def test_eager_mode_training_compiles_and_never_marks_steps(setup):
    code, calls, err = drive(setup, "eager", "train", *train_args(setup, "eager", "--hpu-mode", "eager",
                                                                  "--max-steps", "2", "--lora-dropout", "0.1"))
    assert code == 0, err
    n = names(calls)
    assert calls[0] == ("import habana_frameworks", {"PT_HPU_LAZY_MODE": "0"})
    assert [c[1] for c in calls if c[0] == "torch.compile"] == [{"backend": "hpu_backend"}]
    assert "mark_step" not in n and "ModuleCacher" not in n and "wrap_in_hpu_graph" not in n
    assert n.count("FusedAdamW.step") == 2 and "host_seed" not in n


def test_resume_restores_the_hpu_generator(setup):
    """The HPU generator (graph-safe LoRA dropout draws from it) is seeded, checkpointed and restored.
    The fake's generator moves on at every backward, as dropout moves the real one."""
    import hashlib
    import shutil

    import torch
    args = train_args(setup, "rng", "--max-steps", "4", "--save-every", "2", "--lora-dropout", "0.1")
    code, calls, err = drive(setup, "rng", "train", *args)
    assert code == 0, err
    # seeded like torch's generator: the adapter's init, then the dropout stream (seed + 1 + rank)
    assert [c[1] for c in calls if c[0] == "hpu.random.manual_seed"] == [{"seed": 0}, {"seed": 1}]
    saved = [c[1]["digest"] for c in calls if c[0] == "hpu.random.get_rng_state"]
    assert len(saved) == 2 and saved[0] != saved[1]               # one per checkpoint, and it moved on
    ckpt = setup / "rng" / "checkpoints"
    blob = torch.load(ckpt / "step-2" / "trainer_state.pt", weights_only=True)
    assert hashlib.sha256(blob["rng"][0]["hpu"].numpy().tobytes()).hexdigest()[:16] == saved[0]
    # a run killed after step 2: resume sets the generator back to step 2's state, and from there it
    # moves on exactly as in the run that was not interrupted
    shutil.rmtree(ckpt / "step-4")
    shutil.rmtree(setup / "rng" / "adapter")
    code, calls, err = drive(setup, "rng", "train", *args, "--resume")
    assert code == 0, err
    restored = [c[1] for c in calls if c[0] == "hpu.random.set_rng_state"]
    assert restored == [{"digest": saved[0], "dtype": "torch.uint8"}]
    assert [c[1]["digest"] for c in calls if c[0] == "hpu.random.get_rng_state"] == saved[1:]


def test_graphs_need_lazy_mode(setup):
    code, calls, err = drive(setup, "bad", "train", *train_args(setup, "bad", "--hpu-mode", "eager", "--hpu-graphs"))
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: --hpu-graphs needs --hpu-mode lazy (HPU Graphs do not run in eager mode)"
    assert not (setup / "bad").exists()


def test_inference_lazy_wraps_in_hpu_graph_with_static_shapes(setup):
    code, calls, err = drive(setup, "infer", "infer", "--device", "hpu", "--model", str(setup / "base"),
                             "--adapter", str(setup / "lazy" / "adapter"), "--prompt-file", str(setup / "prompts.txt"),
                             "--max-new-tokens", "5", "--batch-size", "2")
    assert code == 0, err
    n = names(calls)
    assert calls[0] == ("import habana_frameworks", {"PT_HPU_LAZY_MODE": "1"})
    assert n.count("wrap_in_hpu_graph") == 1 and "ModuleCacher" not in n and "mark_step" not in n
    # three prompts of different lengths in two batches, 5 new tokens each: two shapes in all
    shapes = {json.dumps(c[1]["shapes"], sort_keys=True) for c in calls if c[0] == "hpu_graph_forward"}
    assert len(shapes) == 2, shapes
    assert n.count("hpu_graph_forward") == 2 * 5 + 2     # + the untimed warm-up (prefill + 1 step)


def test_inference_refuses_dynamic_shapes_on_hpu(setup):
    code, calls, err = drive(setup, "infer0", "infer", "--device", "hpu", "--model", str(setup / "base"),
                             "--prompt", "abc=", "--bucket", "0")
    assert code == 2 and "--bucket 0 (dynamic shapes) is not possible on hpu" in err
