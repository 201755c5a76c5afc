"""`python infer.py` with no arguments: the demo adapter on held-out examples of its task.

Each held-out prompt (never trained on, from lora/demo/task.py) is completed twice with the same model:
once with the adapter switched off (the random base: it cannot do the task) and once with it on
(merged first when --merge is given). Prints the expected answer and whether the adapter's reply
matches it exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..core.inject import disable_adapter, merge_lora
from ..inference.complete import complete
from ..inference.generate import Sampling
from ..inference.load import load_for_generation
from .task import heldout_examples

N_SHOWN = 8


def run_infer_demo(demo_dir: Path, args, sampling: Sampling) -> None:
    model, tokenizer = load_for_generation(demo_dir / "base", demo_dir / "adapter", merge=False, device=args.device,
                                           dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                           quantize=args.quantize)
    examples = heldout_examples(N_SHOWN)
    prompts = [e["prompt"] for e in examples]
    # Enough for the longest expected answer and its </s>: the random base never stops by itself.
    longest = max(len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) for e in examples)
    common = dict(max_new_tokens=args.max_new_tokens or longest + 1, sampling=sampling, batch_size=args.batch_size,
                  bucket=args.bucket)
    with disable_adapter(model):
        base_replies, _ = complete(model, tokenizer, prompts, **common)
    if args.merge:
        merge_lora(model)
    replies, timing = complete(model, tokenizer, prompts, warmup=True, **common)

    how = "merged" if args.merge else "unmerged"
    print(f"{demo_dir}: held-out task prompts, base alone vs base + adapter ({how}), "
          f"{'greedy' if sampling.greedy else f'sampled, temperature {sampling.temperature}'}")
    width = max(len(p) for p in prompts)
    print(f"  {'prompt':<{width}}  {'base alone':<12} {'with adapter':<12} {'expected':<12} match")
    for p, b, r, e in zip(prompts, base_replies, replies, examples):
        print(f"  {p:<{width}}  {_cell(b):<12} {_cell(r):<12} {e['completion']:<12} "
              f"{'yes' if r == e['completion'] else 'no'}")
    hits = sum(r == e["completion"] for r, e in zip(replies, examples))
    print(f"{hits}/{len(examples)} exact matches with the adapter, "
          f"{sum(b == e['completion'] for b, e in zip(base_replies, examples))}/{len(examples)} without")
    print(timing.line() + " (with the adapter)", file=sys.stderr)


def _cell(text: str) -> str:
    """A reply in one table cell: escaped, cut to 12 characters."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text if len(text) <= 12 else text[:11] + "…"
