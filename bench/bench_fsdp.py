"""--fsdp's memory and speed: per-rank peak memory and step time of train.py's loop at 1 and 2 processes.

The same run (the same global batch) under torchrun at each process count: 1 process holds the whole
base (the floor, --fsdp with one process is the plain run), 2 processes each hold half of it (--fsdp).
A synthetic Llama-shaped bf16 checkpoint (PRESETS["llama-1b"]'s layers, 32000 tokens, untied head) is
written once under --work. Per rank:
  base_mb       its shard of the base, as lora/training/fsdp.py reports it (the whole base at 1 process)
  bare_mb       RSS of the interpreter with torch, transformers, lora and the model's code imported (the
                model built on the meta device), before any work
  peak_mb       the process's peak RSS (ru_maxrss) over loading, the steps and the final checkpoint
  rise_mb       peak_mb - bare_mb: what the run itself costs the rank
  bytes/param   rise / the base's parameter count: the per-rank cost of one base parameter, all included
and the run's median step time (steps after the first). Writes bench/results/fsdp-<device>.json and
prints a markdown table with the ratio of each rank's rise to the one-process rise.

    python bench/bench_fsdp.py                       # 1 and 2 processes, gloo on CPU
    python bench/bench_fsdp.py --layers 4 --steps 2  # smaller and quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the run itself, shared with profile_fsdp.py (`train_config` reads them)."""
    p.add_argument("--layers", type=int, default=10, help="decoder layers of the synthetic base (default 10: 1.48 GB)")
    p.add_argument("--seq", type=int, default=32, help="tokens per example (default 32)")
    p.add_argument("--batch", type=int, default=4, help="global batch: examples per step over all ranks (default 4)")
    p.add_argument("--work", default="/tmp/bench-fsdp",
                   help="where the base, data and runs go; a base already there is reused (default /tmp/bench-fsdp)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3; at least 2: the first is not timed)")
    p.add_argument("--procs", default="1,2", help="process counts to run (default 1,2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp-cpu.json"), help="JSON path")
    p.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the step time is the median of the steps after the first)")
    return args


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_inputs(work: Path, layers: int) -> tuple[Path, Path, int]:
    """(base dir, data file, base parameter count); the base is written once and reused."""
    import torch
    from transformers import LlamaForCausalLM

    from bench_train import PRESETS
    from lora.demo.task import demo_config, make_task_examples
    from lora.demo.tokenizer import build_char_tokenizer
    base, data = work / "base", work / "train.jsonl"
    shape = {**PRESETS["llama-1b"], "num_hidden_layers": layers, "vocab_size": 32000}
    config = demo_config(**shape, tie_word_embeddings=False, max_position_embeddings=2048)
    if not (base / "config.json").is_file():
        torch.set_default_dtype(torch.bfloat16)         # built in bf16: half the memory, no cast
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(base)
        build_char_tokenizer().save_pretrained(base)
        del model
    if not data.is_file():
        data.write_text("".join(json.dumps(r) + "\n" for r in make_task_examples(2000, seed=1, word_len=8)))
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return base, data, n


def train_config(args, out: Path, world: int):
    """The benchmark's run: train.py's settings for the base in --work, --fsdp, bf16, r = 16 on every Linear."""
    from lora import LoRAConfig
    from lora.training import TrainConfig
    return TrainConfig(model=str(Path(args.work) / "base"), data=str(Path(args.work) / "train.jsonl"), out=str(out),
                       max_seq_len=args.seq, pack=True, batch_size=args.batch // world, max_steps=args.steps,
                       log_every=1, dtype="bf16", device="cpu", fsdp=True, force=True, progress=False,
                       lora=LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def worker(args) -> None:
    """One rank of a run: train.py's loop, then this rank's figures into <out>/rank-<r>.json."""
    from lora.storage.model_dir import skeleton
    from lora.training import train
    skeleton(Path(args.work) / "base")          # the modelling code imported (~200 MB), nothing allocated
    bare = rss_mb()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.work) / f"run-{world}"
    train(train_config(args, out, world))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "bare_mb": bare, "peak_mb": peak}))


def run(args, world: int, n_params: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, os.cpu_count() // world))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), __file__, "--_worker", *sys.argv[1:]], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    out = Path(args.work) / f"run-{world}"
    held = {int(m[1]): int(m[2].replace(",", "")) for m in
            re.finditer(r"fsdp: rank (\d+) of \d+ holds ([\d,]+) of", proc.stderr)}
    base_bytes = 2 * n_params
    rows = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
    for r in rows:
        r["base_mb"] = held.get(r["rank"], base_bytes) / 2**20
        r["rise_mb"] = r["peak_mb"] - r["bare_mb"]
        r["bytes_per_param"] = r["rise_mb"] * 2**20 / n_params
    tokens = args.batch * args.seq
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(tokens / m["tokens_per_s"] for m in metrics[1:])
    return {"world": world, "step_s": step_s, "ranks": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    _, _, n_params = build_inputs(work, args.layers)
    runs = [run(args, int(w), n_params) for w in args.procs.split(",")]
    floor = max(r["rise_mb"] for r in runs[0]["ranks"])
    device = f"cpu ({cpu_model()}, {os.cpu_count()} cores), torch {torch.__version__}, gloo"
    result = {"device": device, "params": n_params, "base_gb": 2 * n_params / 1e9, "layers": args.layers,
              "seq": args.seq, "global_batch": args.batch, "steps": args.steps, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{device}; base {n_params / 1e6:.0f}M params, {2 * n_params / 1e9:.2f} GB bf16; global batch "
          f"{args.batch} x {args.seq} tokens\n")
    print("| processes | rank | base shard MB | bare MB | peak MB | rise MB | rise / 1-process rise | bytes/param "
          "| step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for k in r["ranks"]:
            print(f"| {r['world']} | {k['rank']} | {k['base_mb']:.0f} | {k['bare_mb']:.0f} | {k['peak_mb']:.0f} | "
                  f"{k['rise_mb']:.0f} | {k['rise_mb'] / floor:.2f} | {k['bytes_per_param']:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
