"""The training loop: schedule, outputs, exact resume after SIGKILL, NaN stop, DDP, flags, bad input, demo."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora import LoRAConfig, LoRAError, load_adapter
from lora.storage.adapter import read_adapter_tensors
from lora.demo.task import build_demo_base, make_task_examples
from lora.training import TrainConfig, train
from lora.training.run_dir import check_out_dir
from lora.training.schedule import lr_factor, make_scheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as train_cli  # noqa: E402  (the CLI at the repository root)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a machine shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (char tokenizer) and a small prompt/completion dataset."""
    root = tmp_path_factory.mktemp("tiny")
    build_demo_base(root / "base", seed=0, **TINY)
    for name, n, seed in (("train", 96, 1), ("eval", 16, 2)):
        rows = make_task_examples(n, seed=seed, word_len=3)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_args(tiny, out, *extra):
    return ["--model", str(tiny / "base"), "--data", str(tiny / "train.jsonl"), "--out", str(out),
            "--max-seq-len", "12", "--batch-size", "8", "--lr", "1e-2", "--no-progress", *map(str, extra)]


def tiny_config(tiny, out, **kw):
    cfg = dict(model=str(tiny / "base"), data=str(tiny / "train.jsonl"), out=str(out), max_seq_len=12,
               batch_size=8, lr=1e-2, max_steps=6, log_every=1, progress=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def adapter(path):
    return read_adapter_tensors(Path(path))


def close(a: dict, b: dict, rel: float) -> bool:
    """Same keys, and every tensor equal up to rel × its largest entry: Adam divides by sqrt(v), so an
    entry whose grad is ~0 may move by ±lr on rounding noise alone; an entry-wise rtol cannot hold."""
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= rel * a[k].abs().max() for k in a)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -- schedule ---------------------------------------------------------------------------------
def test_lr_schedule_values():
    warmup, total = 4, 14
    assert [lr_factor(s, warmup, total) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, warmup, total) == 1.0                                 # cosine starts at the peak
    assert lr_factor(9, warmup, total) == pytest.approx(0.5, abs=1e-12)       # half way: cos(π/2)
    assert lr_factor(13, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)), abs=1e-12)
    assert lr_factor(0, 0, 10) == 1.0                                         # no warmup
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-3)
    sched = make_scheduler(opt, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([3e-3 * lr_factor(s, warmup, total) for s in range(total)], rel=1e-12)


# -- a run and its outputs ------------------------------------------------------------------------
def test_outputs_of_a_run(tiny, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_config(tiny, out, eval_data=str(tiny / "eval.jsonl"), save_every=2, keep_checkpoints=2,
                            lora=LoRAConfig(r=4, lora_alpha=8)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    ckpt = out / "checkpoints" / "step-6"
    assert {p.name for p in ckpt.iterdir()} == {"adapter", "trainer_state.pt", "state.json"}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng"} and state["scheduler"]["last_epoch"] == 6
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert rows[-1]["loss"] < rows[0]["loss"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["step"] == 6 and ev["eval_loss"] == pytest.approx(res.eval_loss)
    # The final adapter is the trained one, in PEFT format, and equals the last checkpoint's.
    final = adapter(out / "adapter")
    assert all(torch.equal(final[k], v) for k, v in adapter(ckpt / "adapter").items())
    assert any(k.endswith("q_proj.lora_B.weight") and v.abs().sum() > 0 for k, v in final.items())
    from transformers import AutoModelForCausalLM
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny / "base"), out / "adapter")
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    assert torch.allclose(fresh(ids).logits, res.model.eval()(ids).logits, atol=1e-6)


def test_pack_eval_split_and_periodic_eval(tiny, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_config(tiny, out, pack=True, max_seq_len=16, eval_split=0.25, eval_every=2, max_steps=4))
    rows = metrics(out)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2]                  # the eval at the end goes to eval.json
    assert math.isfinite(evals[0]["eval_loss"])
    assert json.loads((out / "eval.json").read_text())["eval_loss"] == pytest.approx(res.eval_loss)


def test_resuming_a_finished_run_changes_nothing(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", max_steps=3)
    train(cfg)
    before = adapter(cfg.out + "/adapter")
    again = train(tiny_config(tiny, tmp_path / "run", max_steps=3, resume=True))
    assert again.step == 3 and again.train_loss == metrics(cfg.out)[-1]["loss"]
    after = adapter(cfg.out + "/adapter")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["step"] for r in metrics(cfg.out)] == [1, 2, 3]


def test_grad_accum_equals_one_big_batch(tiny, tmp_path):
    a = train(tiny_config(tiny, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3))
    b = train(tiny_config(tiny, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=3))
    assert [r["loss"] for r in metrics(a.out)] == pytest.approx([r["loss"] for r in metrics(b.out)], rel=1e-6)
    ta, tb = adapter(a.out / "adapter"), adapter(b.out / "adapter")
    assert close(ta, tb, 1e-4)


def test_grad_checkpointing_keeps_dropout_masks(tiny, tmp_path):
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.2)
    a = train(tiny_config(tiny, tmp_path / "a", max_steps=3, lora=lora))
    b = train(tiny_config(tiny, tmp_path / "b", max_steps=3, lora=lora, grad_checkpointing=True))
    ta, tb = adapter(a.out / "adapter"), adapter(b.out / "adapter")
    assert close(ta, tb, 1e-5)


def test_bf16_training_follows_fp32(tiny, tmp_path):
    """bf16 (base weights in bf16, forward under bf16 autocast; the adapter and its update in fp32)
    against the same run in fp32.

    Losses: within one bf16 epsilon (2^-7, 0.8%) of fp32's, relative, at every step. A bf16 rounding
    errs by at most half an epsilon (the unit roundoff); the logits pass through a few of them in a
    row (each matmul's bf16 inputs and weights; the sums are fp32) and the loss, a mean over some 300
    tokens, averages their independent errors down: one epsilon bounds it with margin. An adapter
    that learns nothing, or the wrong way, leaves that band: the fp32 loss falls by more than five
    epsilons over the run (asserted, so the test can tell).
    Adapters: Adam moves each entry by about ±lr whatever the size of its grad, so an entry whose grad
    is rounding noise may move either way and no bound per entry holds; the update as a whole (B
    starts at 0) points the same way, cos >= 0.99."""
    eps = torch.finfo(torch.bfloat16).eps
    fp32 = train(tiny_config(tiny, tmp_path / "fp32", dtype="fp32"))
    bf16 = train(tiny_config(tiny, tmp_path / "bf16", dtype="bf16"))
    want, got = [r["loss"] for r in metrics(fp32.out)], [r["loss"] for r in metrics(bf16.out)]
    assert want[0] - min(want) > 5 * eps * want[0]
    assert got == pytest.approx(want, rel=eps)
    assert got != want                                          # bf16 ran: its rounding shows
    assert {p.dtype for n, p in bf16.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    a, b = adapter(fp32.out / "adapter"), adapter(bf16.out / "adapter")
    assert all(t.dtype == torch.float32 for t in b.values())    # PEFT keeps fp32
    flat = lambda t: torch.cat([t[k].flatten() for k in sorted(t) if "lora_B" in k])
    assert torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0) >= 0.99


def test_plain_progress_line_without_tqdm(tiny, tmp_path, monkeypatch, capsys):
    """The loop's bar (lora/runtime/progress.py) without tqdm: a plain line on every log step with the
    step count, the loss, the lr, tokens/s and the ETA (and the count alone at most once a second)."""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)          # import fails as if not installed
    train(tiny_config(tiny, tmp_path / "run", max_steps=4, log_every=2, progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")]
    logged, rows = [line for line in lines if "  loss " in line], metrics(tmp_path / "run")
    assert all(re.fullmatch(r"train \d/4  .*  ETA \d+:\d\d", line) for line in lines)
    assert len(logged) == len(rows) == 2
    for line, row in zip(logged, rows):
        m = re.fullmatch(r"train (\d+)/4  loss (\S+)  lr (\S+)  tok_s ([\d,]+)  \S+ step/s  ETA \d+:\d\d", line)
        assert m, line
        assert (int(m[1]), m[2], m[3]) == (row["step"], f"{row['loss']:.4f}", f"{row['lr']:.2e}")
        assert int(m[4].replace(",", "")) == round(row["tokens_per_s"])


# -- resume after SIGKILL -------------------------------------------------------------------------
def run_cli(args, **kw):
    # One thread: on a busy machine a tiny model's ops wait on a descheduled second thread.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_is_bit_identical(tiny, tmp_path):
    steps = 80
    args = lambda out: tiny_args(tiny, out, "--max-steps", steps, "--save-every", 4, "--log-every", 1,
                                 "--lora-dropout", 0.1, "--keep-checkpoints", 2)
    ref = run_cli(args(tmp_path / "ref"))
    killed = run_cli(args(tmp_path / "run"))
    first = tmp_path / "run" / "checkpoints" / "step-4"
    deadline = time.time() + 120
    while not first.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert first.exists(), killed.stderr.read()
    assert not (tmp_path / "run" / "adapter").exists(), "the run finished before the kill; raise `steps`"
    assert ref.wait() == 0, ref.stderr.read()
    # what killed writes leave (lora/storage/atomic.py), whether or not this kill left any
    (tmp_path / "run" / "checkpoints" / ".tmp-step-8.k1ll3d00").mkdir(exist_ok=True)
    (tmp_path / "run" / ".tmp-metrics.jsonl.k1ll3d00").write_text("half a line")

    resumed = run_cli(args(tmp_path / "run") + ["--resume"])
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    for d in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert not [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    want, got = adapter(tmp_path / "ref" / "adapter"), adapter(tmp_path / "run" / "adapter")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # The metrics of the killed-and-resumed run are those of the uninterrupted one, step for step.
    losses = lambda out: [(r["step"], r["loss"]) for r in metrics(out)]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


# -- NaN stop ---------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "nan"
    # lr 1e30: the first Adam step moves every lora_B entry by ~1e30, so the next forward overflows.
    rc = train_cli.main(tiny_args(tiny, out, "--lr", "1e30", "--warmup-steps", 0, "--max-steps", 5,
                                  "--save-every", 1))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert err.startswith("error: loss became") and "at step 2" in err
    assert f"last good checkpoint is {out / 'checkpoints' / 'step-1'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert not (out / "adapter").exists()
    assert all(torch.isfinite(t).all() for t in adapter(out / "checkpoints" / "step-1" / "adapter").values())


# -- data parallel ----------------------------------------------------------------------------
def test_torchrun_two_gloo_processes_match_one_process(tiny, tmp_path):
    """torchrun, 2 processes × batch 4 = one process × batch 8: same losses and adapter (fp32 tolerance).
    The LoRA flags go through torchrun by their full names (--lora-r, not --r): the adapter has rank 4."""
    out2 = tmp_path / "ddp"
    args = tiny_args(tiny, out2, "--max-steps", 4, "--batch-size", 4, "--log-every", 1, "--device", "cpu",
                     "--eval-data", tiny / "eval.jsonl", "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(tiny_config(tiny, tmp_path / "one", max_steps=4, batch_size=8, eval_data=str(tiny / "eval.jsonl"),
                            lora=LoRAConfig(r=4, lora_alpha=8)))
    # Eval is sharded over the ranks (16 examples = 4 batches of 4) and reduced.
    assert json.loads((out2 / "eval.json").read_text())["eval_loss"] == pytest.approx(one.eval_loss, rel=1e-5)
    assert json.loads((out2 / "run.json").read_text())["world_size"] == 2
    assert [r["loss"] for r in metrics(out2)] == pytest.approx([r["loss"] for r in metrics(one.out)], rel=1e-5)
    ta, tb = adapter(out2 / "adapter"), adapter(one.out / "adapter")
    assert {t.shape[0] for k, t in ta.items() if "lora_A" in k} == {4}
    assert close(ta, tb, 1e-4)
    assert any(tb[k].abs().sum() > 0 for k in tb if "lora_B" in k)


def test_every_flag_passes_through_torchruns_parser(capsys):
    """torchrun's own parser takes a script flag that starts like one of its options for an abbreviation
    of it (--r: --rdzv-*, --role, --run-path). Every flag train.py generates, each with a value, comes out
    as given; --r, the short alias of --lora-r, is the one that does not."""
    from torch.distributed.run import get_args_parser

    from lora.training import flags
    parser = train_cli.build_parser()
    sample = {int: "3", float: "0.5", str: "x", flags.names: "q_proj", flags.targets: "q_proj,v_proj",
              flags.ints: "0,1", flags.float_pair: "0.9,0.99", flags.json_object: '{"q_proj": 4}',
              flags.init_weights: "gaussian"}
    argv = []
    for action in parser._actions:
        for name in action.option_strings:
            if name not in ("-h", "--help", "--r"):
                argv += [name] if action.nargs == 0 else [name, action.choices[0] if action.choices else sample[action.type]]
    torchrun = lambda *script_args: get_args_parser().parse_args(
        ["--standalone", "--nproc_per_node", "2", "train.py", *script_args])
    args = torchrun(*argv)
    assert args.training_script == "train.py" and args.training_script_args == argv
    parser.parse_args(argv)                                    # and train.py reads them all
    # one flag per TrainConfig field and per LoRA setting (the device flags are lora/cli.py's)
    from dataclasses import fields
    assert {a.dest for a in parser._actions} == {f.name for f in fields(TrainConfig)} - {"lora"} | set(
        flags.LORA_FLAGS) | {"help"}
    with pytest.raises(SystemExit):
        torchrun("--r", "8")
    assert "ambiguous option: --r could match" in capsys.readouterr().err


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no-data-file", "empty-data", "unusable-record", "no-config", "seq-len", "model-only"])
def test_bad_input_is_one_line_before_any_work(tiny, tmp_path, capsys, case):
    out = tmp_path / "out"
    data = tmp_path / "d.jsonl"
    args = tiny_args(tiny, out)
    if case == "no-data-file":
        args[3], message = str(tmp_path / "missing.jsonl"), "missing.jsonl: no such file"
    elif case == "empty-data":
        data.write_text("")
        args[3], message = str(data), "empty"
    elif case == "unusable-record":
        data.write_text('{"prompt": "a", "completion": "b"}\n{"title": "x"}\n')
        args[3], message = str(data), "d.jsonl:2: record has no usable field"
    elif case == "no-config":
        (tmp_path / "m").mkdir()
        args[1], message = str(tmp_path / "m"), "no config.json"
    elif case == "seq-len":
        args += ["--max-seq-len", "33"]
        message = "--max-seq-len 33 exceeds the model's limit (max_position_embeddings = 32)"
    else:
        args, message = ["--model", str(tiny / "base"), "--out", str(out)], "--model and --data go together"
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_out_dir_holding_another_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(tiny_args(tiny, out, "--max-steps", 1)) == 0
    # Same arguments: start over. Different ones: refused unless --force; --resume needs the same.
    assert check_out_dir(tiny_config(tiny, out, max_steps=1, log_every=10, save_every=200)) == "restart"
    capsys.readouterr()
    assert train_cli.main(tiny_args(tiny, out, "--max-steps", 1, "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "holds a different run (lr: 0.01 there, 0.5 now)" in err and err.count("\n") == 1
    assert train_cli.main(tiny_args(tiny, out, "--max-steps", 1, "--lr", "0.5", "--resume")) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_cli.main(tiny_args(tiny, out, "--max-steps", 1, "--lr", "0.5", "--force")) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(LoRAError, match="not empty and holds no training run"):
        check_out_dir(tiny_config(tiny, tmp_path / "other"))


def test_resume_refuses_data_or_a_model_that_changed(tiny, tmp_path, capsys):
    """run.json keeps digests of the files behind --data and --model (lora/training/fingerprint.py): the same
    arguments over other contents are another run."""
    import shutil

    from safetensors.torch import load_file, save_file
    data, model, out = tmp_path / "train.jsonl", tmp_path / "base", tmp_path / "run"
    shutil.copy(tiny / "train.jsonl", data)
    shutil.copytree(tiny / "base", model)
    args = lambda *extra: ["--model", str(model), "--data", str(data), "--out", str(out), "--max-seq-len", "12",
                           "--batch-size", "8", "--max-steps", "2", "--no-progress", *extra]
    assert train_cli.main(args()) == 0
    record = json.loads((out / "run.json").read_text())
    assert len(record["data_sha256"]) == 64 and len(record["model_digest"]) == 64
    assert train_cli.main(args("--resume")) == 0                         # nothing changed: resumes
    capsys.readouterr()
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")              # same examples, another order
    assert train_cli.main(args("--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: --data {data} changed since the run in {out} began (digest ")
    assert err.count("\n") == 1
    assert train_cli.main(args()) == 2 and "pass --force to start over" in capsys.readouterr().err
    data.write_text("\n".join(rows) + "\n")
    # one weight scaled in the model's file: another model
    (weights,) = model.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("down_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert train_cli.main(args("--resume")) == 2
    assert f"--model {model} (weights, config or tokenizer) changed since" in capsys.readouterr().err
    assert train_cli.main(args("--force")) == 0                         # start over on the new model
    # a run.json from before the digests: the arguments alone decide
    for k in ("data_sha256", "eval_data_sha256", "model_digest"):
        record.pop(k)
    (out / "run.json").write_text(json.dumps(record))
    assert check_out_dir(tiny_config(tiny, out, model=str(model), data=str(data), max_steps=2, lr=2e-4,
                                     batch_size=8, log_every=10, resume=True)) == "resume"


def test_cli_flags_build_the_config(capsys):
    cfg, demo = train_cli.build_config(train_cli.parse_args([]))
    assert demo and (cfg.lr, cfg.max_steps, cfg.lora.r, cfg.lora.lora_alpha) == (5e-3, 60, 16, 32)
    cfg, demo = train_cli.build_config(train_cli.parse_args(["--lr", "1e-3", "--r", "4"]))
    assert demo and (cfg.lr, cfg.lora.r) == (1e-3, 4)                       # a given flag wins
    assert train_cli.build_config(train_cli.parse_args(["--lora-r", "4"]))[0].lora.r == 4
    # no flag given: the dataclasses' own defaults, the device flags' (lora/cli.py) included
    assert train_cli.build_config(train_cli.parse_args(["--model", "m", "--data", "d"]))[0] == TrainConfig("m", "d")
    assert cfg.keep_freed_memory
    assert not train_cli.build_config(train_cli.parse_args(["--no-keep-freed-memory"]))[0].keep_freed_memory
    cfg, demo = train_cli.build_config(train_cli.parse_args([
        "--model", "m", "--data", "d.jsonl", "--target-modules", "q_proj, v_proj", "--layers-to-transform", "0,2",
        "--exclude-modules", "v_proj", "--rank-pattern", '{"q_proj": 4}', "--alpha-pattern", '{"q_proj": 2}',
        "--init-lora-weights", "gaussian", "--lora-dropout", "0.1", "--use-rslora"]))
    assert not demo and (cfg.lr, cfg.max_steps, cfg.batch_size, cfg.max_seq_len) == (2e-4, None, 4, 512)
    assert cfg.lora == LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                  use_rslora=True, layers_to_transform=[0, 2], exclude_modules=["v_proj"],
                                  rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2}, init_lora_weights="gaussian")
    cfg = train_cli.build_config(train_cli.parse_args(["--model", "m", "--data", "d", "--target-modules", "all-linear",
                                                       "--adam-betas", "0.8,0.99", "--no-progress"]))[0]
    assert (cfg.lora.target_modules, cfg.adam_betas, cfg.progress) == ("all-linear", (0.8, 0.99), False)
    capsys.readouterr()
    for argv, message in ((["--rank-pattern", "{q: 4}"], "argument --rank-pattern: not valid JSON"),
                          (["--layers-to-transform", "0,x"], "comma-separated integers expected"),
                          (["--adam-betas", "0.9"], "two comma-separated numbers expected"),
                          (["--init-lora-weights", "yes"], "choose from true, false, gaussian")):
        with pytest.raises(SystemExit) as e:
            train_cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_explains_every_flag_and_its_default():
    parser = train_cli.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    help_of = lambda flag: parser._option_string_actions[flag].help % {}
    assert help_of("--lr") == "peak learning rate of AdamW (default 0.0002; demo 0.005)"
    assert help_of("--warmup-steps").endswith("(default 5% of the steps; demo 3)")
    assert help_of("--init-lora-weights").endswith("(default true)") and help_of("--pack").endswith("(default off)")


def test_cpu_training_keeps_freed_memory_unless_told_not_to(tiny, tmp_path, monkeypatch):
    import lora.training.loop
    calls = []
    monkeypatch.setattr(lora.training.loop, "keep_freed_memory", lambda: calls.append(1))
    train(tiny_config(tiny, tmp_path / "a", max_steps=1, device="cpu"))
    assert calls == [1]
    train(tiny_config(tiny, tmp_path / "b", max_steps=1, device="cpu", keep_freed_memory=False))
    assert calls == [1]
    assert "keep_freed_memory" not in tiny_config(tiny, tmp_path).fingerprint()   # a resumed run may differ


def test_too_few_examples_for_one_step(tiny, tmp_path):
    with pytest.raises(LoRAError, match="one step needs 128"):
        train(tiny_config(tiny, tmp_path / "x", batch_size=64, grad_accum=2))
    assert not (tmp_path / "x").exists()


# -- the demo -------------------------------------------------------------------------------------
def test_demo_learns_the_task(tmp_path, capsys):
    """The demo's code path (`python train.py` with no model/data) with 40 steps instead of 60 and a
    bar of exact match >= 0.5 instead of 0.9 (40 steps reach 0.825 on this seed). The full demo's
    result is in docs/train.md."""
    out = tmp_path / "demo"
    assert train_cli.main(["--out", str(out), "--max-steps", "40", "--no-progress"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["exact_match_before"] <= 0.1
    assert ev["exact_match"] >= 0.5
    assert ev["eval_loss"] < 1.0
    for path in ("base/config.json", "base/tokenizer.json", "base/model.safetensors", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "metrics.jsonl", "data/train.jsonl", "data/eval.jsonl"):
        assert (out / path).is_file(), path
    assert "held-out exact match" in capsys.readouterr().out
