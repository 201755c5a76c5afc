"""Fold LoRA adapter(s) into a Hugging Face checkpoint: W' = round(fp32(W) + scaling · B @ A), streaming.

    python merge.py --base DIR --adapter DIR --out DIR [--verify]
    python merge.py --adapter A --adapter B --weights 0.7 0.3 --out DIR     # weighted sum of adapters
    python merge.py                                                          # the demo run (runs/demo)

The work is in lora/merging/ (`lora.merge_checkpoint`). Exit status: 0 done, 2 bad input (nothing
written), 1 the merge failed (--verify above tolerance: nothing written), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from lora.cli import OneLineParser, run_main
from lora.storage.safetensors_stream import DTYPE_ARG

DEMO = "runs/demo"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Merge LoRA adapter(s) in PEFT format into a safetensors Hugging Face checkpoint, tensor "
                    "by tensor (memory does not grow with the model), exactly (fp32 sum, one rounding per "
                    "weight; every other tensor copied bit for bit) and crash-safely (written beside --out, "
                    "renamed into place at the end).")
    p.add_argument("--base", metavar="DIR", default=f"{DEMO}/base",
                   help="base checkpoint: model.safetensors or model.safetensors.index.json + shards, "
                        "config.json, tokenizer files; a bitsandbytes 4-bit NF4 checkpoint is written dequantized "
                        f"(bf16, or --dtype) with the adapter folded in fp32 (default {DEMO}/base)")
    p.add_argument("--adapter", metavar="DIR", action="append",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors, ours or PEFT's); "
                        f"repeat for several adapters (default {DEMO}/adapter)")
    p.add_argument("--weights", metavar="w", type=float, nargs="+",
                   help="one weight per --adapter: merges W + Σ w_i·scaling_i·B_i A_i (default 1 each)")
    p.add_argument("--out", metavar="DIR", default=f"{DEMO}/merged",
                   help=f"output checkpoint directory; must differ from --base (default {DEMO}/merged)")
    p.add_argument("--dtype", choices=tuple(DTYPE_ARG), metavar="DTYPE",
                   help="convert every float tensor of the output to float32, float16 or bfloat16 (also "
                        "spelled fp32, fp16/half, bf16) and set config.json's dtype (default: keep each "
                        "tensor's dtype); merged weights are still rounded once, from fp32")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (the old one is removed only after the new one is complete)")
    p.add_argument("--verify", action="store_true",
                   help="before moving the output into place, compare the logits of base+adapter (unmerged) "
                        "and of the merged model on a few token sequences; fail (exit 1, nothing written) "
                        "above a tolerance suited to the dtype. Loads the model twice in fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def merge(args: argparse.Namespace) -> None:
    from lora import merge_checkpoint

    adapters = args.adapter or [f"{DEMO}/adapter"]
    report = merge_checkpoint(args.base, adapters, args.out, weights=args.weights, dtype=args.dtype,
                              force=args.force, verify=args.verify, progress=not args.no_progress)
    print(f"merged {report.n_merged} of {report.n_tensors} tensors from {len(adapters)} adapter(s) into "
          f"{report.out_dir} ({report.bytes_written / 1e6:.1f} MB in {report.seconds:.1f} s)")
    if report.max_abs_diff is not None:
        print(f"verify: max |logit difference| {report.max_abs_diff:.3g} <= tolerance {report.tolerance:.3g} "
              f"(the adapter itself moves logits by up to {report.adapter_effect:.3g}; {report.verify_seconds:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: merge(args))


if __name__ == "__main__":
    sys.exit(main())
