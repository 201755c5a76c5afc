"""The adapter's GEMMs at their best on this machine: each product of one decoder layer's training step
timed alone (hot caches, median of --rounds), beside the base GEMMs of the same layer, at the shapes
of bench_train.py's preset.

Per projection group (q/k/v and gate/up share their input, as lora/core/op.py runs them):

    base      x Wᵢᵀ (forward) and dYᵢ Wᵢ (backward, dX), for each member
    adapter   shrink x Aᵀ, expand Sᵢ Bᵢᵀ, dSᵢ = dYᵢ Bᵢ, dBᵢ = (Sᵢᵀ dYᵢ)ᵀ, dA = dSᵀ x, dX += dS A

The last line is what the adapter's products cost at these rates as a share of the base GEMMs' time,
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


def measure(name: str, inp: int, outs: list[int], M: int, r: int, rounds: int) -> dict:
    n = len(outs)
    x, A = torch.randn(M, inp), torch.randn(n * r, inp)
    Ws, Bs = [torch.randn(o, inp) for o in outs], [torch.randn(o, r) for o in outs]
    dYs = [torch.randn(M, o) for o in outs]
    S, dS = torch.randn(M, n * r), torch.randn(M, n * r)
    cols = [S[:, i * r:(i + 1) * r] for i in range(n)]
    t = lambda fn: timed(fn, rounds)
    base = sum(t(lambda W=W: torch.mm(x, W.t())) + t(lambda d=d, W=W: torch.mm(d, W)) for d, W in zip(dYs, Ws))
    parts = dict(shrink=t(lambda: torch.mm(x, A.t())),
                 expand=sum(t(lambda c=c, B=B: torch.mm(c, B.t())) for c, B in zip(cols, Bs)),
                 dS=sum(t(lambda d=d, B=B: torch.mm(d, B)) for d, B in zip(dYs, Bs)),
                 dB=sum(t(lambda c=c, d=d: torch.mm(c.t(), d).t()) for c, d in zip(cols, dYs)),
                 dA=t(lambda: torch.mm(dS.t(), x)),
                 dX=t(lambda: torch.mm(dS, A)))
    base_flops = 4 * M * inp * sum(outs)
    adapter_flops = 6 * M * r * (n * inp + sum(outs))
    adapter = sum(parts.values())
    return dict(group=name, base_s=base, adapter_s=adapter, parts=parts,
                base_gflops=base_flops / base / 1e9, adapter_gflops=adapter_flops / adapter / 1e9,
                flop_share=adapter_flops / base_flops)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(name, inp, outs, args.tokens, args.r, args.rounds) for name, inp, outs in groups(PRESETS[args.preset])]
    print(f"{args.preset}: one decoder layer, M = {args.tokens}, r = {args.r}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.rounds} calls each, hot caches\n")
    print("| group | base GEMMs ms | base GFLOP/s | adapter GEMMs ms | adapter GFLOP/s | adapter ÷ base time "
          "(÷ FLOPs) | shrink, expand, dS, dB, dA, dX ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {1e3 * r['base_s']:.2f} | {r['base_gflops']:.0f} | {1e3 * r['adapter_s']:.2f} | "
              f"{r['adapter_gflops']:.0f} | {r['adapter_s'] / r['base_s']:.3f} ({r['flop_share']:.3f}) | "
              + ", ".join(f"{1e3 * v:.2f}" for v in r["parts"].values()) + " |")
    base, adapter = sum(r["base_s"] for r in rows), sum(r["adapter_s"] for r in rows)
    line = (f"\nLayer: adapter GEMMs {1e3 * adapter:.2f} ms against base GEMMs {1e3 * base:.2f} ms: "
            f"{adapter / base:.3f} of their time")
    if args.base_share:
        line += (f"; with the base GEMMs {args.base_share:.0%} of the floor's step, the adapter's products at "
                 f"these rates would cost {1 + args.base_share * adapter / base:.3f} × the floor")
    print(line + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
