"""Where a LoRA training step's time goes, op by op, against the floor's: torch.profiler over
alternating steps of two providers of bench_train.py, on the same model and batch.

    python bench/profile_train.py                         # floor vs ours, the default CPU config
    python bench/profile_train.py --dropout 0.05 --rounds 6
    python bench/profile_train.py --providers floor,peft --layers 2
    python bench/profile_train.py --by-shape              # the GEMMs by operand shapes, too

Prints, per aten op (self time, per step): the first provider's time, the second's, the difference,
and the call counts, largest differences first; then each provider's wall time per step and the
minor page faults per step (fresh pages from the C allocator: a cost that lands on whichever op
touches them first, e.g. the loss's 131 MB logits gradient). The profiler adds overhead to every op,
so use it to see where time goes, and bench_train.py for ratios.
"""
from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lora.runtime.malloc import keep_freed_memory  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--providers", default="floor,ours", help="two of bench_train.py's providers (default floor,ours)")
    p.add_argument("--rounds", type=int, default=4, help="profiled steps per provider, alternating (default 4)")
    p.add_argument("--top", type=int, default=25, help="ops listed (default 25)")
    p.add_argument("--preset", default="cpu-llama-6x1024", help="bench_train.py's model preset (default cpu-llama-6x1024)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--no-keep-freed-memory", action="store_true", help="glibc's defaults instead of lora.runtime.malloc")
    p.add_argument("--by-shape", action="store_true",
                   help="also list the GEMMs (mm, addmm, addmm_) by operand shapes, per step, for both providers")
    args = p.parse_args(argv)
    names = args.providers.split(",")
    if len(names) != 2:
        p.error(f"--providers takes two names, got {args.providers!r}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args, names


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    args, names = parse_args(argv)
    if not args.no_keep_freed_memory:
        keep_freed_memory()
    bargv = ["--preset", args.preset, "--dropout", str(args.dropout), "--batch", str(args.batch), "--seq", str(args.seq)]
    bargv += ["--layers", str(args.layers)] if args.layers else []
    bargs = bench_train.parse_args(bargv)
    base = bench_train.build_base(bargs)
    ids = bench_train.make_batch(base, bargs)
    models = {n: bench_train.make_provider(n, base, bargs) for n in names}
    del base
    for _ in range(2):                               # warm-up: the heap reaches its size
        for n in names:
            bench_train.step(*models[n], ids, bargs)
    self_us = {n: collections.Counter() for n in names}
    calls = {n: collections.Counter() for n in names}
    wall = {n: 0.0 for n in names}
    faults = {n: 0 for n in names}
    gemms = {n: collections.Counter() for n in names}
    for _ in range(args.rounds):
        for n in names:
            f0 = minor_faults()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
                t0 = time.perf_counter()
                bench_train.step(*models[n], ids, bargs)
                wall[n] += time.perf_counter() - t0
            faults[n] += minor_faults() - f0
            for e in prof.key_averages():
                self_us[n][e.key] += e.self_cpu_time_total
                calls[n][e.key] += e.count
            if args.by_shape:
                for e in prof.key_averages(group_by_input_shape=True):
                    if e.key in GEMMS:
                        gemms[n][(e.key, str(e.input_shapes[:3]))] += e.self_cpu_time_total
    a, b = names
    R = args.rounds
    keys = sorted(set(self_us[a]) | set(self_us[b]), key=lambda k: -abs(self_us[b][k] - self_us[a][k]))
    print(f"ms per step, self time, {R} profiled steps each, dropout {args.dropout}\n")
    print(f"| op | {a} | {b} | {b} − {a} | calls {a} | calls {b} |")
    print("|---|---|---|---|---|---|")
    for k in keys[:args.top]:
        print(f"| {k} | {self_us[a][k] / 1e3 / R:.1f} | {self_us[b][k] / 1e3 / R:.1f} | "
              f"{(self_us[b][k] - self_us[a][k]) / 1e3 / R:+.1f} | {calls[a][k] // R} | {calls[b][k] // R} |")
    print()
    for n in names:
        print(f"{n}: {1e3 * wall[n] / R:.0f} ms per step (profiled), {sum(self_us[n].values()) / 1e3 / R:.0f} ms "
              f"in ops, {faults[n] / R:.0f} minor page faults per step")
    if args.by_shape:
        for n in names:
            print(f"\n{n}: GEMMs by operand shapes (self ms per step)\n")
            for (op, shapes), us in gemms[n].most_common(args.top):
                print(f"{us / 1e3 / R:8.1f}  {op} {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
