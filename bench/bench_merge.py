"""Merging a LoRA adapter into a checkpoint: ours (merge.py) vs transformers + PEFT, beside the I/O floor.

For each size, a synthetic Llama-shaped sharded bf16 checkpoint (random weights written directly with
safetensors, no model init) and a rank-16 fp32 adapter on all seven projections. Three providers, each
in a fresh subprocess: wall time taken from outside, peak RSS as the process's own VmHWM at exit
(not the parent's rusage: on Linux a child's ru_maxrss starts from the parent's RSS at fork):

  floor  python + `import torch`, then copy every checkpoint file and fsync it: the least any merge
         must spend (read and write every byte) and the least RSS a torch process has
  ours   python merge.py --base … --adapter … --out … (streaming; output fsynced before the rename)
  peft   AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload +
         save_pretrained (only when peft is installed)

Files are read from the page cache (the checkpoint was just written), so times are CPU + write bound.
Each provider runs --repeats times, in alternating rounds; the table shows its fastest run and its
largest peak RSS (all runs are in the JSON). PEFT's save_pretrained does not fsync; ours and the
floor do (a crash-safe rename needs the data on disk first).
Writes bench/results/merge-<device>.{json,md} and prints the table.

    python bench/bench_merge.py                          # 1, 4, 12 layers: 0.38, 0.75, 1.72 GB bf16
    python bench/bench_merge.py --layers 2 --no-peft
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Llama-3.2-1B-shaped layers (GQA 32/8) with a 32k vocabulary and an untied head.
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=32000, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 12],
                   help="checkpoint sizes as numbers of decoder layers (default 1 4 12; 12 ≈ 1.72 GB bf16)")
    p.add_argument("--r", type=int, default=16, help="adapter rank on all seven projections (default 16)")
    p.add_argument("--shard-mb", type=int, default=500, help="maximum shard size in MB (default 500)")
    p.add_argument("--workdir", default="/tmp/bench_merge", help="where checkpoints and outputs are written")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over the providers per size; the table keeps each one's fastest (default 2)")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT baseline")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/merge-cpu)")
    p.add_argument("--worker", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- synthetic inputs ---------------------------------------------------------------------------
def llama_tensors(layers: int):
    """(name, shape) in HF Llama order."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        for proj, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield f"{p}self_attn.{proj}.weight", shape
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            yield f"{p}mlp.{proj}.weight", shape
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def build_checkpoint(path: Path, layers: int, shard_bytes: int) -> int:
    """A sharded bf16 checkpoint with index and config.json; returns its tensor bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE).save_pretrained(path)
    g = torch.Generator().manual_seed(layers)
    shards, current, size = [], {}, 0
    for name, shape in llama_tensors(layers):
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
        if current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + t.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def build_adapter(path: Path, layers: int, r: int) -> None:
    """A PEFT-format fp32 adapter with random A and B (a trained adapter's B is not zero)."""
    import torch
    from safetensors.torch import save_file

    from lora import LoRAConfig

    g = torch.Generator().manual_seed(100 + layers)
    tensors = {}
    for name, shape in llama_tensors(layers):
        module = name.removesuffix(".weight")
        if module.split(".")[-1] in TARGETS:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)).to_peft_dict()
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- workers (each runs in its own measured subprocess) ------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), which starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(kind: str, base: str, adapter: str, out: str) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the floor's RSS includes torch, like every other provider's)
    if kind == "ours":                 # exactly `python merge.py …`, run in this process to read its VmHWM
        import runpy
        sys.argv = ["merge.py", "--base", base, "--adapter", adapter, "--out", out, "--no-progress"]
        try:
            runpy.run_path(str(ROOT / "merge.py"), run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    elif kind == "floor":
        Path(out).mkdir()
        for f in Path(base).iterdir():
            shutil.copyfile(f, Path(out) / f.name)
            with open(Path(out) / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    elif kind == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps({"work_s": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}))


def measure(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    """Wall time of one worker subprocess (start to exit, imports included) and its peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(base), str(adapter), str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_rss_bytes": report["peak_rss_bytes"]}


def run_size(layers: int, args, work: Path) -> dict:
    base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
    for p in (base, adapter):
        shutil.rmtree(p, ignore_errors=True)
    ckpt_bytes = build_checkpoint(base, layers, args.shard_mb * 10**6)
    build_adapter(adapter, layers, args.r)
    row = {"layers": layers, "checkpoint_bytes": ckpt_bytes,
           "shards": len(list(base.glob("*.safetensors"))), "r": args.r}
    # Rounds alternate the providers so that drifting load on a shared machine hits each alike.
    for round_ in range(args.repeats):
        for name in ("floor", "ours") + (() if args.no_peft else ("peft",)):
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            m = measure(name, base, adapter, out)
            if name == "floor" or round_ < args.repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
            best = row.setdefault(name, {"wall_s": math.inf, "peak_rss_bytes": 0, "runs_s": []})
            best["wall_s"] = min(best["wall_s"], m["wall_s"])
            best["peak_rss_bytes"] = max(best["peak_rss_bytes"], m["peak_rss_bytes"])
            best["runs_s"].append(m["wall_s"])
            print(f"  {layers} layers, {name}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
    row["finite_check_s"] = finite_check_seconds(layers)
    if not args.no_peft:
        row["ours_vs_peft"] = compare(work / "out-ours", work / "out-peft", base)
    for p in (base, adapter, work / "out-ours", work / "out-peft"):
        shutil.rmtree(p, ignore_errors=True)
    return row


def finite_check_seconds(layers: int) -> float:
    """What ours spends refusing non-finite merges: the check merge.py makes (lora.core.delta.all_finite,
    one reduction pass) over every merged (bf16) weight of the checkpoint, timed alone here; ours' wall
    time above includes it."""
    import torch

    from lora.core.delta import all_finite
    g = torch.Generator().manual_seed(0)
    shapes = [shape for name, shape in llama_tensors(layers) if name.split(".")[-2] in TARGETS]
    weights = {shape: torch.randn(shape, generator=g).to(torch.bfloat16) for shape in set(shapes)}
    t0 = time.perf_counter()
    for shape in shapes:
        assert all_finite(weights[shape])
    return round(time.perf_counter() - t0, 3)


def compare(ours: Path, peft: Path, base: Path) -> dict:
    """Ours vs PEFT's merged weights, over every merged tensor of the first layer: a check that both
    did the same work. (With an fp32 adapter, PEFT's in-place bf16 `W += delta` also computes in fp32
    and rounds once, so the two should agree bit for bit; a bf16 adapter would make PEFT round twice.)"""
    from safetensors import safe_open

    def find(d: Path, name: str):
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name).float()
        raise KeyError(name)

    equal = total = 0
    max_diff = 0.0
    for name, shape in llama_tensors(1):
        if name.split(".")[-2] in TARGETS:
            a, b, w = find(ours, name), find(peft, name), find(base, name)
            equal += int((a == b).sum())
            total += a.numel()
            max_diff = max(max_diff, float((a - b).abs().max() / w.abs().max()))
            assert not torch_equal(a, w), f"{name}: ours did not change the weight"
    return {"bit_equal_fraction": round(equal / total, 6), "max_abs_diff_over_max_abs_weight": max_diff}


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def table(rows: list[dict]) -> str:
    """Markdown: time against the I/O floor and PEFT, peak RSS as a fraction of the checkpoint's size."""
    head = ["layers", "checkpoint", "shards", "floor s", "ours s", "peft s", "ours / floor", "peft / ours",
            "floor RSS MiB", "ours RSS MiB", "ours RSS / ckpt", "peft RSS MiB", "peft RSS / ckpt",
            "finite check s (share of ours)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size, floor, ours, peft = r["checkpoint_bytes"], r["floor"], r["ours"], r.get("peft")
        cells = [r["layers"], f"{size / 1e9:.2f} GB", r["shards"], f"{floor['wall_s']:.1f}", f"{ours['wall_s']:.1f}",
                 f"{peft['wall_s']:.1f}" if peft else "–", f"{ours['wall_s'] / floor['wall_s']:.2f}",
                 f"{peft['wall_s'] / ours['wall_s']:.2f}" if peft else "–",
                 f"{floor['peak_rss_bytes'] / 2**20:.0f}", f"{ours['peak_rss_bytes'] / 2**20:.0f}",
                 f"{ours['peak_rss_bytes'] / size:.2f}",
                 f"{peft['peak_rss_bytes'] / 2**20:.0f}" if peft else "–",
                 f"{peft['peak_rss_bytes'] / size:.2f}" if peft else "–",
                 f"{r['finite_check_s']:.2f} ({100 * r['finite_check_s'] / ours['wall_s']:.1f}%)"
                 if "finite_check_s" in r else "–"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    agree = [f"{r['layers']} layers: {100 * r['ours_vs_peft']['bit_equal_fraction']:.2f}% bit-equal, "
             f"max |ours − peft| / max |W| = {r['ours_vs_peft']['max_abs_diff_over_max_abs_weight']:.2g}"
             for r in rows if "ours_vs_peft" in r]
    if agree:
        lines += ["", "Same work? Layer 0's merged weights, ours vs PEFT's: " + "; ".join(agree)]
    return "\n".join(lines)


def device_name() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if not args.no_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed: measuring the floor and ours only", file=sys.stderr)
            args.no_peft = True
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_size(n, args, work) for n in args.layers]
    import torch
    import transformers
    result = {
        "device": device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": None if args.no_peft else __import__("peft").__version__,
        "shape": SHAPE, "dtype": "bfloat16 checkpoint, float32 adapter", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "merge-cpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = (f"Merge a rank-{args.r} adapter (all 7 projections) into a bf16 Llama-shaped checkpoint — "
            f"{result['device']}; torch {result['torch']}, transformers {result['transformers']}, "
            f"peft {result['peft']}; {result['date']}; best of {args.repeats} alternating runs, wall time "
            f"of the whole process (imports included); RSS = peak resident set (VmHWM)\n\n{table(rows)}\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
