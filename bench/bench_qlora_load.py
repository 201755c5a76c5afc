"""Peak memory of loading a bf16 Llama-shaped checkpoint quantized to NF4 while it is read
(`load_model(dir, quantize="nf4")`, what `train.py/infer.py --quantize nf4` run), beside two floors.

The checkpoint is bench_merge.py's synthetic one (random bf16 weights written with safetensors).
Each provider runs in a fresh subprocess that reports its own peak RSS (VmHWM) and load time:

  skeleton  python + the imports + the model built on the meta device (transformers' model code
            imported): the floor every load starts from
  bf16      load_model(dir) and every weight read once (transformers maps the file and reads a weight
            when it is first used): the model in full precision, as training or generation holds it
  nf4       load_model(dir, quantize="nf4"): every Linear but the head quantized tensor by tensor

The model's own bytes (parameters + buffers) are printed beside each. Writes
bench/results/qlora-load-<device>.{json,md}.

    python bench/bench_qlora_load.py                 # 8 layers: 1.24 GB bf16
    python bench/bench_qlora_load.py --layers 12
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import build_checkpoint, device_name, peak_rss_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("skeleton", "bf16", "nf4")


def worker(kind: str, base: str) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from lora.storage.model_dir import load_model, skeleton
    skeleton(base)
    t0 = time.perf_counter()
    model_bytes = 0
    if kind != "skeleton":
        model = load_model(base, quantize="nf4" if kind == "nf4" else None)
        model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        for p in model.parameters():
            p.detach().abs().max()                       # every weight read once
    print(json.dumps(dict(kind=kind, seconds=time.perf_counter() - t0, peak_rss=peak_rss_bytes(),
                          model_bytes=model_bytes)))


def measure(kind: str, base: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--base", str(base)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic checkpoint")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.base)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        ckpt = build_checkpoint(base, args.layers, 2 ** 30)
        rows = [measure(kind, base) for kind in KINDS]
    mib = 2 ** 20
    lines = [f"Load a {args.layers}-layer bf16 Llama-shaped checkpoint ({ckpt / 1e9:.2f} GB) — {device_name()} "
             f"(a shared VM); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; peak RSS = VmHWM of a fresh "
             "process, imports included\n",
             "| load | peak RSS MiB | above skeleton MiB | model MiB | seconds |", "|---|---|---|---|---|"]
    floor = rows[0]["peak_rss"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['peak_rss'] / mib:.0f} | {(r['peak_rss'] - floor) / mib:.0f} | "
                     f"{r['model_bytes'] / mib:.0f} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qlora-load-cpu.md").write_text(text)
    (RESULTS / "qlora-load-cpu.json").write_text(json.dumps(
        dict(device=device_name(), layers=args.layers, checkpoint_bytes=ckpt, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
