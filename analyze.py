"""What a LoRA adapter learned: ΔW's spectra and ranks, its size against the base and the directions
it amplifies, its subspace similarity to another adapter, and a training run's curves.

    python analyze.py ADAPTER [--base DIR] [--compare ADAPTER2] [--out DIR]
    python analyze.py --run RUN_DIR                  # a training run's curves (metrics.jsonl)
    python analyze.py                                # the demo run: runs/demo (adapter, base and curves)

The work is in lora/analysis/. Exit status: 0 done, 2 bad input (nothing written), 1 a failure.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lora.cli import OneLineParser, run_main

DEMO = Path("runs/demo")


def build_parser() -> OneLineParser:
    p = OneLineParser(
        description="Analyse a LoRA adapter in PEFT format (ours or anyone's), module by module: the Frobenius "
                    "norm and singular values of ΔW = scaling · B A (from the factors; the out × in matrix is "
                    "never formed), its stable and effective rank; with --base, ‖ΔW‖/‖W‖ and the LoRA paper's "
                    "Table 7 amplification; with --compare, the paper's subspace similarity φ. Writes "
                    "report.json, report.md and PNG figures (with matplotlib) to --out, and prints a summary "
                    "table. With no ADAPTER and no --run: the demo run in runs/demo (python train.py makes it).")
    p.add_argument("adapter", metavar="ADAPTER", nargs="?",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", metavar="DIR",
                   help="the base model the adapter was trained on (safetensors checkpoint, one file or sharded): "
                        "adds ‖ΔW‖_F / ‖W‖_F and Table 7 (‖Uᵀ W V‖_F for ΔW's, W's own top-r and random "
                        "directions, and the amplification ‖ΔW‖_F / ‖Uᵀ W V‖_F). Read one tensor at a time")
    p.add_argument("--compare", metavar="ADAPTER2",
                   help="a second adapter on the same modules (another rank or seed): adds φ(i, j) for every "
                        "i ≤ r₁, j ≤ r₂, for lora_A (row spaces) and lora_B (column spaces)")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="a training run directory (train.py --out): plots loss, eval loss, learning rate and "
                        "tokens/s from its metrics.jsonl; alone, or beside an ADAPTER")
    p.add_argument("--out", metavar="DIR",
                   help="output directory, written whole (an earlier analysis there is replaced); never inside "
                        "an input (default: beside the adapter, ADAPTER-analysis; with --run only, RUN_DIR-analysis)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lora.errors import LoRAError

    def body():
        adapter, base, compare, run = args.adapter, args.base, args.compare, args.run
        if adapter is None and (base or compare):
            raise LoRAError("--base and --compare analyse an ADAPTER; give its directory first")
        if adapter is None and run is None:
            adapter, base, run = DEMO / "adapter", DEMO / "base", DEMO
            if not DEMO.is_dir():
                raise LoRAError(f"no ADAPTER given and no demo run in {DEMO} (make it with: python train.py)")
        from lora.analysis import (analyze_adapter, check_out, curves_table, default_out, read_curves,
                                   summary_table, write_report)

        out = Path(args.out) if args.out else default_out(adapter if adapter is not None else run)
        check_out(out, [p for p in (adapter, base, compare) if p is not None], run)      # before any work
        curves = read_curves(run) if run is not None else None
        analysis, t0 = None, time.perf_counter()
        if adapter is not None:
            analysis = analyze_adapter(adapter, base, compare, progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        names, note = write_report(out, analysis, curves)
        if analysis is not None:
            print(summary_table(analysis))
            print(f"({len(analysis.modules)} modules in {seconds:.2f} s; means over layers; per module: report.md)")
        if curves is not None:
            print(f"\ntraining curves of {run}:")
            print(curves_table(curves))
        print(f"\nwrote {', '.join(names)} to {out}")
        if note:
            print(note)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
