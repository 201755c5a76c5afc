"""The adapter's GEMMs at their best on this machine: each product of one decoder layer's training step
timed alone (hot caches, median of --rounds), beside the base GEMMs of the same layer, at the shapes
of bench_train.py's preset.

Per projection group (q/k/v and gate/up share their input, as lora/core/op.py runs them):

    base      x Wᵢᵀ (forward) and dYᵢ Wᵢ (backward, dX), for each member
    adapter   shrink x Aᵀ, expand Sᵢ Bᵢᵀ, dSᵢ = dYᵢ Bᵢ, dBᵢ = (Sᵢᵀ dYᵢ)ᵀ, dA = dSᵀ x, dX += dS A

The adapter's products are timed twice: with `torch.mm` (MKL's sgemm on x86) and with lora.core.thin's
`mm`, which the op uses (oneDNN's fp32 matmul where PyTorch has it). The base GEMMs are timed with
`torch.mm`, the frozen base's own, and once more through oneDNN: what the floor itself would run at
on a library that picks this CPU's widest vector path (the op never does that to the base GEMMs).
The last lines are what the adapter's products cost at these rates as a share of the base GEMMs' time,
and the ratio to the frozen floor that share implies when the base GEMMs are --base-share of the
floor's step (bench/profile_train.py measures that share). It is an estimate, not a bound: with hot
caches each product reads operands a training step would bring from memory (inside a step they run
slower: `profile_train.py --by-shape`), and a product whose output a base GEMM then accumulates onto
(the expand, dS·A) can hide part of its cost in that GEMM's pass.

    python bench/thin_gemms.py                    # the default preset, torch's threads
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PRESETS  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora.core import thin  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-llama-6x1024", choices=PRESETS, help="bench_train.py's model shape")
    p.add_argument("--tokens", type=int, default=1024, help="rows M of every product: batch × seq (default 1024)")
    p.add_argument("--r", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per product; the median is kept (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--base-share", type=float, default=None,
                   help="the base GEMMs' share of the floor's step time, for the implied ratio (from profile_train.py)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or args.r < 1:
        p.error("--rounds, --tokens and --r must be at least 1")
    return args


def timed(fn, rounds: int) -> float:
    """Median seconds of fn() over `rounds` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def groups(shape: dict) -> list[tuple[str, int, list[int]]]:
    """(name, in, [out of each member]) of one Llama decoder layer's projection groups."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    kv = H // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [("q/k/v", H, [H, kv, kv]), ("o", H, [H]), ("gate/up", H, [I, I]), ("down", I, [H])]


def adapter_products(mm, x, A, Bs, dYs, cols, dS, t) -> dict:
    """Seconds of each of the adapter's products of one group, `mm` doing every product."""
    return dict(shrink=t(lambda: mm(x, A.t())),
                expand=sum(t(lambda c=c, B=B: mm(c, B.t())) for c, B in zip(cols, Bs)),
                dS=sum(t(lambda d=d, B=B: mm(d, B)) for d, B in zip(dYs, Bs)),
                dB=sum(t(lambda c=c, d=d: mm(c.t(), d).t()) for c, d in zip(cols, dYs)),
                dA=t(lambda: mm(dS.t(), x)),
                dX=t(lambda: mm(dS, A)))


def measure(name: str, inp: int, outs: list[int], M: int, r: int, rounds: int) -> dict:
    n = len(outs)
    x, A = torch.randn(M, inp), torch.randn(n * r, inp)
    Ws, Bs = [torch.randn(o, inp) for o in outs], [torch.randn(o, r) for o in outs]
    dYs = [torch.randn(M, o) for o in outs]
    S, dS = torch.randn(M, n * r), torch.randn(M, n * r)
    cols = [S[:, i * r:(i + 1) * r] for i in range(n)]
    t = lambda fn: timed(fn, rounds)
    base_with = lambda mm: sum(t(lambda W=W: mm(x, W.t())) + t(lambda d=d, W=W: mm(d, W)) for d, W in zip(dYs, Ws))
    base, base_onednn = base_with(torch.mm), base_with(thin.mm)
    parts = {lib: adapter_products(mm, x, A, Bs, dYs, cols, dS, t) for lib, mm in (("torch", torch.mm), ("thin", thin.mm))}
    base_flops = 4 * M * inp * sum(outs)
    adapter_flops = 6 * M * r * (n * inp + sum(outs))
    adapter = {lib: sum(p.values()) for lib, p in parts.items()}
    return dict(group=name, base_s=base, base_onednn_s=base_onednn, adapter_s=adapter, parts=parts,
                base_flops=base_flops, adapter_flops=adapter_flops, flop_share=adapter_flops / base_flops)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(name, inp, outs, args.tokens, args.r, args.rounds) for name, inp, outs in groups(PRESETS[args.preset])]
    onednn = "oneDNN" if thin._onednn_works() else "torch.mm: this PyTorch has no oneDNN linear"
    print(f"{args.preset}: one decoder layer, M = {args.tokens}, r = {args.r}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.rounds} calls each, hot caches; thin.mm: {onednn}\n")
    gf = lambda flops, s: f"{flops / s / 1e9:.0f}"
    print("| group | base GEMMs ms (torch.mm) | GFLOP/s | adapter ms, torch.mm | GFLOP/s | adapter ms, thin.mm | "
          "GFLOP/s | adapter ÷ base time, torch.mm / thin.mm (÷ FLOPs) | thin.mm: shrink, expand, dS, dB, dA, dX ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["adapter_s"]
        print(f"| {r['group']} | {1e3 * r['base_s']:.2f} | {gf(r['base_flops'], r['base_s'])} | {1e3 * a['torch']:.2f} | "
              f"{gf(r['adapter_flops'], a['torch'])} | {1e3 * a['thin']:.2f} | {gf(r['adapter_flops'], a['thin'])} | "
              f"{a['torch'] / r['base_s']:.3f} / {a['thin'] / r['base_s']:.3f} ({r['flop_share']:.3f}) | "
              + ", ".join(f"{1e3 * v:.2f}" for v in r["parts"]["thin"].values()) + " |")
    base = sum(r["base_s"] for r in rows)
    print()
    for lib in ("torch", "thin"):
        adapter = sum(r["adapter_s"][lib] for r in rows)
        line = (f"Layer, adapter products with {lib}.mm: {1e3 * adapter:.2f} ms against base GEMMs {1e3 * base:.2f} ms: "
                f"{adapter / base:.3f} of their time")
        if args.base_share:
            line += (f"; with the base GEMMs {args.base_share:.0%} of the floor's step, the adapter's products at "
                     f"these rates would cost {1 + args.base_share * adapter / base:.3f} × the floor")
        print(line + ".")
    base_onednn, flops = sum(r["base_onednn_s"] for r in rows), sum(r["base_flops"] for r in rows)
    print(f"The base GEMMs themselves through thin.mm: {1e3 * base_onednn:.2f} ms ({gf(flops, base_onednn)} GFLOP/s) "
          f"against torch.mm's {1e3 * base:.2f} ms ({gf(flops, base)} GFLOP/s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
