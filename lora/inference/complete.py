"""Inference around the generation loop: load a model (+ adapter), format and encode prompts,
generate in batches, decode, stream text.

    load_model(dir, adapter, merge)  -> (model, tokenizer)   safetensors weights, no remote code by default
    format_prompt(tok, text, ...)    -> the text the model sees (plain, chat template or guanaco)
    complete(model, tok, texts, ...) -> completions (strings) and timing
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch
import torch.nn as nn

from ..storage.adapter import load_adapter
from ..runtime.device import Device, resolve_device
from ..errors import LoRAError
from .generate import Generated, Sampling, context_length, generate
from ..core.inject import merge_lora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # train.py's names
FORMATS = ("plain", "guanaco")


def load_model(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, merge: bool = False,
               device: str | Device = "cpu", dtype: str = "auto", trust_remote_code: bool = False):
    """The causal LM and tokenizer saved in `model_dir`, with the adapter applied (and folded in
    when `merge`), in eval mode on `device` ("auto", "cpu", "cuda": lora.runtime.device). dtype "auto" keeps
    the checkpoint's own dtype; "fp32", "bf16", "fp16" convert the base (the adapter stays fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoRAError(f"{model_dir}: no such model directory")
    if not (model_dir / "config.json").is_file():
        raise LoRAError(f"{model_dir}: no config.json (not a saved model directory)")
    if dtype != "auto" and dtype not in DTYPES:
        raise LoRAError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if merge and adapter_dir is None:
        raise LoRAError("--merge needs an adapter (--adapter DIR)")
    device = device if isinstance(device, Device) else resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise LoRAError(f"{model_dir}: cannot load its tokenizer ({_first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code,
            use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoRAError(f"{model_dir}: cannot load the model ({_first_line(e)})") from None
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        if merge:
            merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return device.prepare_inference(model.to(device.torch_device).eval()), tokenizer


def resolve_inference_device(name: str, hpu_mode: str = "lazy", hpu_graphs: bool | None = None,
                             bucket: int = 0, bucket_given: bool = False) -> tuple[Device, int]:
    """The device and the static-shape bucket to generate with. Graph-compiling devices (HPU) compile
    one graph per new shape, so there the prompt and cache are always padded to buckets (default 32)."""
    device = resolve_device(name, hpu_mode=hpu_mode, hpu_graphs=hpu_graphs)
    if device.static_shapes():
        if bucket == 0 and bucket_given:
            raise LoRAError(f"--bucket 0 (dynamic shapes) is not possible on {device.name}: every new shape "
                            "is a graph compile")
        bucket = bucket or 32
    return device, bucket


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def format_prompt(tokenizer, text: str, chat_template: bool = False, fmt: str = "plain") -> str:
    """The prompt as the model sees it: the tokenizer's chat template (one user turn, then the
    assistant's turn opened), guanaco's `### Human: … ### Assistant:`, or the text itself."""
    if fmt not in FORMATS:
        raise LoRAError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if chat_template and fmt != "plain":
        raise LoRAError("use either the chat template or --format, not both")
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise LoRAError("the tokenizer has no chat template (drop --chat-template, or use --format guanaco)")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    if fmt == "guanaco":
        return f"### Human: {text} ### Assistant:"
    return text


def encode(tokenizer, text: str, chat_template: bool = False, fmt: str = "plain") -> list[int]:
    """Token ids of the formatted prompt. A chat template writes its own special tokens (BOS
    included), so the tokenizer adds none then."""
    if not text.strip():
        raise LoRAError("empty prompt")
    formatted = format_prompt(tokenizer, text, chat_template, fmt)
    ids = tokenizer(formatted, add_special_tokens=not chat_template)["input_ids"]
    if not ids:
        raise LoRAError(f"prompt {text[:40]!r} encodes to no tokens")
    return list(ids)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's generation_config EOS (Llama 3 has several)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


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
             progress: bool = False, warmup: bool = False) -> tuple[list[str], Timing]:
    """Replies to `texts` in input order, generated `batch_size` prompts at a time.

    Every prompt is encoded and checked against the context before any is generated, so a bad line
    fails fast. `bucket` > 0 pads prompt and cache to multiples of `bucket`, and a short last batch
    to `batch_size` rows (static shapes).
    `on_token(row, id)` sees rows of the first batch only (meant for streaming a single prompt).
    `warmup` first runs the first batch for 2 tokens, untimed, so that one-time costs (CUDA context,
    kernel compiles and autotuning, graph captures) stay out of the reported prefill and decode times.
    """
    if batch_size < 1:
        raise LoRAError(f"batch size must be >= 1, got {batch_size}")
    if bucket < 0:
        raise LoRAError(f"bucket must be >= 0 (0 = off), got {bucket}")
    prompts = [encode(tokenizer, t, chat_template, fmt) for t in texts]
    ctx = context_length(model)
    for i, p in enumerate(prompts):
        if ctx is not None and len(p) + max_new_tokens > ctx:
            raise LoRAError(f"prompt {i + 1} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {ctx} tokens")
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    starts = range(0, len(prompts), batch_size)
    if warmup:
        generate(model, prompts[:batch_size], min(2, max_new_tokens), eos_token_id=(), pad_token_id=pad,
                 sampling=sampling, pad_to_multiple=max(bucket, 1), static_cache=bucket > 0)
    bar = _progress(len(prompts)) if progress and len(starts) > 1 else None
    replies, timing = [], Timing()
    for n, start in enumerate(starts):
        batch = prompts[start:start + batch_size]
        real = len(batch)
        if bucket and len(starts) > 1:
            # Static shapes: a short last batch is filled up with copies of its first prompt (their
            # replies are dropped) so that it runs the same compiled graphs as the others.
            batch = batch + [batch[0]] * (batch_size - real)
        g = generate(model, batch, max_new_tokens, eos_token_id=eos, pad_token_id=pad, sampling=sampling,
                     pad_to_multiple=max(bucket, 1), static_cache=bucket > 0,
                     on_token=on_token if n == 0 else None)
        g.tokens, g.stopped = g.tokens[:real], g.stopped[:real]
        g.prompt_tokens = sum(len(p) for p in batch[:real])
        timing.add(g)
        replies += [tokenizer.decode(t, skip_special_tokens=True) for t in g.tokens]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return replies, timing


def _progress(total: int):
    """A tqdm bar on stderr (prompts done, rate, ETA), or a plain counting line without tqdm;
    shown only when stderr is a terminal."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="prompt", file=sys.stderr, disable=None)   # None: off unless a terminal
    except ImportError:
        return _PlainProgress(total) if sys.stderr.isatty() else None


class _PlainProgress:
    def __init__(self, total: int):
        import time
        self.total, self.done, self.t0, self.clock = total, 0, time.perf_counter(), time.perf_counter

    def update(self, n: int) -> None:
        self.done += n
        rate = self.done / max(self.clock() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate
        print(f"\r{self.done}/{self.total} prompts, {rate:.2f} prompt/s, ETA {eta:.0f} s", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)
