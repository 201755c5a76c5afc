"""Generate text with a base model, a LoRA adapter on it, or the two merged.

    python infer.py --model DIR [--adapter DIR [--merge]] --prompt "TEXT"     # streams the reply
    python infer.py --model DIR --adapter DIR --prompt-file prompts.txt      # one reply per line
    python infer.py --model DIR --adapter sql=DIR1 --adapter chat=DIR2 --prompt-file p.jsonl --jsonl
                                        # each line {"prompt", "adapter"}: adapters mixed in one batch
    python infer.py                                                          # the demo run (runs/demo)

The work is in lora/inference/ (load.py, prompts.py, complete.py; generate.py: the KV-cache loop).
Exit status: 0 done, 2 bad input, 1 a failure, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path

from lora.cli import OneLineParser, add_device_flags, run_main, set_hpu_mode_first
from lora.inference.load import STATIC_BUCKET

DEMO_DIR = Path("runs/demo")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Generate with a KV cache from a saved causal LM, optionally with a LoRA adapter. "
                    "Without --model it uses the demo run (runs/demo/base + runs/demo/adapter) and, "
                    "without a prompt, checks the demo's held-out task examples.")
    p.add_argument("--model", metavar="DIR", help="saved model directory (config.json, safetensors weights, tokenizer)")
    p.add_argument("--adapter", metavar="DIR|NAME=DIR", action="append",
                   help="LoRA adapter directory in PEFT format, made for this model. NAME=DIR, repeated, loads "
                        "several named adapters that rows of a .jsonl prompt file choose from (all served in "
                        "the same batches, unmerged); a directory whose name holds '=' needs a '/' in it, e.g. ./a=b")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights in memory before generating (faster; same tokens)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="nf4: quantize the base's Linears (all but the output head) to 4-bit NF4 while reading "
                        "the checkpoint, as QLoRA trains on (docs/qlora.md); a bitsandbytes 4-bit checkpoint is "
                        "read as 4-bit without it. Not with --merge (default: the checkpoint as it is)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="one prompt; its reply is streamed to stdout as it is generated")
    src.add_argument("--prompt-file", metavar="PATH",
                     help="a text file with one prompt per line; replies are printed one per line, in order. "
                          "A file ending in .jsonl holds one {\"prompt\": TEXT, \"adapter\": NAME} object per line "
                          "(adapter missing or null: the base alone)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="most tokens to generate per prompt; generation stops earlier at end-of-sequence "
                        "(default 64; in the demo, one more than the longest expected answer)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (the default); > 0 samples from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="when sampling, keep only the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="when sampling, keep the most likely tokens holding probability P (1 = off)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling, so a run can be repeated")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="prompts generated together from --prompt-file (left-padded; default 8)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt with the tokenizer's chat template (an error if it has none)")
    p.add_argument("--format", choices=("plain", "guanaco"), default="plain",
                   help="plain: the prompt as given; guanaco: '### Human: PROMPT ### Assistant:'")
    p.add_argument("--bucket", type=int, default=0, metavar="N",
                   help="pad prompts and the KV cache to multiples of N tokens, so decode steps have one "
                        "static shape (for graph-compiling devices such as HPU); 0 = off. Same tokens either way. "
                        f"On HPU, shapes are static: --bucket defaults to {STATIC_BUCKET} and 0 is refused")
    p.add_argument("--jsonl", action="store_true",
                   help="with --prompt-file: print one JSON object per line ({prompt, reply}; {prompt, adapter, "
                        "reply} for a .jsonl prompt file) instead of the reply text")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code to run (off: only built-in architectures)")
    add_device_flags(p, dtype_help="dtype of the base weights (auto: as saved in the checkpoint; the adapter "
                                   "stays fp32)")
    return p


def split_adapters(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """--adapter values → (the unnamed adapter's directory or None, {name: directory} of named ones)."""
    from lora import LoRAError
    unnamed, named = [], {}
    for v in values or []:
        name, eq, path = v.partition("=")
        if not eq or "/" in name or os.sep in name:
            unnamed.append(v)
            continue
        if not name or not path:
            raise LoRAError(f"--adapter {v!r}: expected NAME=DIR or DIR")
        if name in named:
            raise LoRAError(f"--adapter: name {name!r} given twice")
        named[name] = path
    if unnamed and (named or len(unnamed) > 1):
        raise LoRAError("several --adapter flags need a name each (--adapter NAME=DIR)")
    return (unnamed[0] if unnamed else None), named


def read_rows(path: str, named: dict[str, str]) -> tuple[list[str], list[str | None] | None]:
    """(prompts, each prompt's adapter name or None) from --prompt-file; adapters None for a plain-text file.
    Every name is checked against the --adapter names here, before anything is loaded."""
    from lora import LoRAError
    from lora.inference.prompts import read_prompt_rows, read_prompts
    if not path.endswith(".jsonl"):
        if named:
            raise LoRAError("named adapters need a .jsonl prompt file naming each row's adapter")
        return read_prompts(path), None
    rows = read_prompt_rows(path)
    for i, (_, name) in enumerate(rows, 1):
        if name is not None and name not in named:
            loaded = f"loaded: {', '.join(named)}" if named else "no named adapters given (--adapter NAME=DIR)"
            raise LoRAError(f"{path}:{i}: unknown adapter {name!r} ({loaded})")
    return [t for t, _ in rows], ([a for _, a in rows] if named else None)


def one_line(text: str) -> str:
    """A reply on one output line: backslashes, newlines and carriage returns escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


@contextlib.contextmanager
def hf_bars_on_a_terminal_only():
    """transformers' progress bars are for a terminal; in a log or a pipe stderr keeps only timing and errors."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def run(args: argparse.Namespace) -> None:
    from lora import LoRAError
    from lora.inference.complete import TextStream, complete
    from lora.inference.generate import Sampling
    from lora.inference.load import load_for_generation, resolve_inference_device

    if args.jsonl and args.prompt_file is None:
        raise LoRAError("--jsonl applies to --prompt-file output only")
    args.adapter, named = split_adapters(args.adapter)
    if named and args.prompt_file is None:
        raise LoRAError("named adapters need a .jsonl prompt file naming each row's adapter (--prompt-file)")
    if named and args.merge:
        raise LoRAError("named adapters are served unmerged: drop --merge")
    args.device, args.bucket = resolve_inference_device(args.device, args.hpu_mode, args.hpu_graphs, args.bucket,
                                                        args.bucket_given)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if not sampling.greedy and args.seed is None:
        # A fresh seed per run, reported with the timing so that the run can be repeated.
        sampling = Sampling(args.temperature, args.top_k, args.top_p, secrets.randbits(62))
    if args.model is None:
        if args.adapter or named:
            raise LoRAError("--adapter needs --model (without --model the demo run's adapter is used)")
        if not (DEMO_DIR / "base").is_dir() or not (DEMO_DIR / "adapter").is_dir():
            raise LoRAError(f"no --model given and no demo run at {DEMO_DIR} (run `python train.py` first)")
        if args.prompt is None and args.prompt_file is None:
            if args.chat_template or args.format != "plain":
                raise LoRAError("the demo's prompts are plain text: --chat-template/--format need --prompt or --prompt-file")
            from lora.demo.infer_demo import run_infer_demo
            return run_infer_demo(DEMO_DIR, args, sampling)
        args.model, args.adapter = str(DEMO_DIR / "base"), str(DEMO_DIR / "adapter")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64
    texts, rows = read_rows(args.prompt_file, named) if args.prompt_file else ([args.prompt or ""], None)
    if args.prompt is not None and not args.prompt.strip():
        raise LoRAError("empty prompt")
    model, tokenizer = load_for_generation(args.model, args.adapter, args.merge, args.device, args.dtype,
                                           args.trust_remote_code, args.quantize, adapters=named or None)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, batch_size=args.batch_size,
                  chat_template=args.chat_template, fmt=args.format, bucket=args.bucket, warmup=True)
    if args.prompt is not None:
        stream = TextStream(tokenizer, sys.stdout)
        _, timing = complete(model, tokenizer, texts, on_token=stream, **common)
        print(flush=True)
    else:
        replies, timing = complete(model, tokenizer, texts, progress=True, adapters=rows, **common)
        jsonl_in = args.prompt_file.endswith(".jsonl")
        for i, (text, reply) in enumerate(zip(texts, replies)):
            row = {"prompt": text, "adapter": rows[i] if rows else None, "reply": reply} if jsonl_in else \
                {"prompt": text, "reply": reply}
            print(json.dumps(row) if args.jsonl else one_line(reply))
        sys.stdout.flush()
    seed = f", seed {sampling.seed}" if not sampling.greedy else ""
    print(timing.line() + seed, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.bucket_given = any(a == "--bucket" or a.startswith("--bucket=") for a in (sys.argv[1:] if argv is None else argv))

    def body() -> None:
        set_hpu_mode_first(args)        # before anything (transformers included) can import habana_frameworks
        with hf_bars_on_a_terminal_only():
            run(args)
    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
