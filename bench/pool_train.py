"""Pool the rounds of several bench_train.py runs: each run's per-round ratios (every round runs each
provider once, back to back), put together, their median and 95% bootstrap interval, as bench_train.py
computes them for one run.

    python bench/pool_train.py bench/results/train-cpu-llama-onednn.json bench/results/train-cpu-llama-onednn-run2.json

Prints, for each provider against the floor and PEFT against each provider (where the runs have them),
the pooled ratio and how many rounds went into it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import bootstrap_ci  # noqa: E402


def pooled_ratios(runs: list[dict]) -> dict[tuple[str, str], list[float]]:
    """{(a, b): [a's time ÷ b's time, per round, over every run that has both]}."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        steps = {r["provider"]: r["steps"] for r in run["results"]}
        pairs = [(n, "floor") for n in steps if n != "floor"] + [("peft", n) for n in steps if n not in ("peft", "floor")]
        for a, b in pairs:
            if a in steps and b in steps:
                ratios.setdefault((a, b), []).extend(x / y for x, y in zip(steps[a], steps[b]))
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_train.py's JSON files (the same preset and settings)")
    args = p.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    configs = {json.dumps({k: v for k, v in r["config"].items() if k not in ("providers", "out")}, sort_keys=True)
               for r in runs}
    if len(configs) > 1:
        p.error("the runs differ in more than their providers and output file: their rounds do not pool")
    for (a, b), v in pooled_ratios(runs).items():
        lo, hi = bootstrap_ci(v)
        print(f"{a} ÷ {b}: {statistics.median(v):.3f} ({lo:.3f}–{hi:.3f}) over {len(v)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
