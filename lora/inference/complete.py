"""Replies to a list of prompts: encoded and checked up front, generated in batches, decoded, timed.

    complete(model, tok, texts, ...) -> (replies, Timing)     in input order
    TextStream(tok, out)             an on_token callback that writes one row's text as it grows

Loading is lora/inference/load.py, prompt formats lora/inference/prompts.py, the KV-cache loop
lora/inference/generate.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, TextIO

import torch.nn as nn

from ..errors import LoRAError
from ..runtime.progress import Progress
from .generate import Generated, Sampling, check_context, eos_ids, generate
from .prompts import encode


def pad_id(tokenizer, eos: set[int]) -> int:
    """Any id works for a pad (pads are masked); prefer the tokenizer's own."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(eos) if eos else 0


class TextStream:
    """An `on_token` callback that writes the text of one row as it grows.

    Decodes the whole reply each time and writes the new suffix, so a character spread over several
    byte-level tokens is written once it is complete (a trailing U+FFFD means: not yet)."""

    def __init__(self, tokenizer, out: TextIO = sys.stdout, row: int = 0):
        self.tokenizer, self.out, self.row = tokenizer, out, row
        self.tokens: list[int] = []
        self.written = 0

    def __call__(self, row: int, token: int) -> None:
        if row != self.row:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


@dataclass
class Timing:
    """Summed over batches."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0
    batches: int = 0

    def add(self, g: Generated) -> None:
        self.prefill_s += g.prefill_s
        self.decode_s += g.decode_s
        self.prompt_tokens += g.prompt_tokens
        self.new_tokens += g.new_tokens
        self.decode_tokens += sum(max(len(t) - 1, 0) for t in g.tokens)
        self.batches += 1

    def line(self) -> str:
        rate = self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        return (f"prefill {1000 * self.prefill_s:.1f} ms ({self.prompt_tokens} prompt tokens, "
                f"{self.batches} batch{'es' if self.batches != 1 else ''}), decode {rate:.1f} tokens/s "
                f"({self.new_tokens} new tokens)")


def complete(model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), batch_size: int = 8, chat_template: bool = False,
             fmt: str = "plain", bucket: int = 0, on_token: Callable[[int, int], None] | None = None,
             progress: bool = False, warmup: bool = False, adapters: list | None = None) -> tuple[list[str], Timing]:
    """Replies to `texts` in input order, generated `batch_size` prompts at a time.

    Every prompt is encoded and checked against the context before any is generated, so a bad line
    fails fast. `bucket` > 0 pads prompt and cache to multiples of `bucket`, and a short last batch
    to `batch_size` rows (static shapes).
    `on_token(row, id)` sees rows of the first batch only (meant for streaming a single prompt).
    `warmup` first runs the first batch for 2 tokens, untimed, so that one-time costs (CUDA context,
    kernel compiles and autotuning, graph captures) stay out of the reported prefill and decode times.
    `progress` shows prompts done on stderr when there are several batches and stderr is a terminal.
    `adapters`: one per text (a name, or None for the base alone) on a model holding named adapters
    (lora.serving): rows of different adapters share each batch.
    """
    if batch_size < 1:
        raise LoRAError(f"batch size must be >= 1, got {batch_size}")
    if bucket < 0:
        raise LoRAError(f"bucket must be >= 0 (0 = off), got {bucket}")
    if adapters is not None and len(adapters) != len(texts):
        raise LoRAError(f"{len(adapters)} adapters for {len(texts)} prompts: one per prompt")
    rows = adapters if adapters is not None else [None] * len(texts)
    if adapters is not None:
        from ..serving.rows import row_index
        row_index(model, adapters)                  # an unknown name fails here, before any generation
    prompts = [encode(tokenizer, t, chat_template, fmt) for t in texts]
    for i, p in enumerate(prompts):
        check_context(model, len(p), max_new_tokens, f"prompt {i + 1}")
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    starts = range(0, len(prompts), batch_size)
    if warmup:
        generate(model, prompts[:batch_size], min(2, max_new_tokens), eos_token_id=(), pad_token_id=pad,
                 sampling=sampling, pad_to_multiple=max(bucket, 1), static_cache=bucket > 0,
                 adapters=None if adapters is None else rows[:batch_size])
    # Prompts done, rate and ETA, for a terminal only: in a log or a pipe stderr keeps timing and errors.
    bar = Progress(len(prompts), "generate", "prompt", enabled=progress and len(starts) > 1 and sys.stderr.isatty())
    replies, timing = [], Timing()
    for n, start in enumerate(starts):
        batch, batch_rows = prompts[start:start + batch_size], rows[start:start + batch_size]
        real = len(batch)
        if bucket and len(starts) > 1:
            # Static shapes: a short last batch is filled up with copies of its first prompt (their
            # replies are dropped) so that it runs the same compiled graphs as the others.
            batch = batch + [batch[0]] * (batch_size - real)
            batch_rows = batch_rows + [batch_rows[0]] * (batch_size - real)
        g = generate(model, batch, max_new_tokens, eos_token_id=eos, pad_token_id=pad, sampling=sampling,
                     pad_to_multiple=max(bucket, 1), static_cache=bucket > 0,
                     on_token=on_token if n == 0 else None, adapters=None if adapters is None else batch_rows)
        g.tokens, g.stopped = g.tokens[:real], g.stopped[:real]
        g.prompt_tokens = sum(len(p) for p in batch[:real])
        timing.add(g)
        replies += [tokenizer.decode(t, skip_special_tokens=True) for t in g.tokens]
        bar.update(real)
    bar.close()
    return replies, timing
