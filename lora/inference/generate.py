"""Text generation with a KV cache, written over the model's own forward (not `model.generate`).

    prefill:  logits = model(prompt (B, T), mask (B, T), positions)       -> first new token
    decode:   logits = model(last token (B, 1), mask (B, T + t), position) -> next token, t = 1, 2, …

Prompts of different lengths are left-padded into one batch: the attention mask hides the pads and
position ids count only real tokens (`cumsum(mask) - 1`), so each row computes what it would alone
(up to float rounding: the matrix shapes differ).
Greedy (argmax) by default; `Sampling(temperature>0, top_k, top_p, seed)` draws from the filtered
softmax. A row stops at an end-of-sequence id; the loop stops when every row has.

Static-shape mode (HPU graphs compile one graph per input shape): `pad_to_multiple=k` left-pads the
prompt to a multiple of k, and `static_cache=True` preallocates the cache and the attention mask at
one bucketed length, so every decode step has the same shapes. Both add only masked padding: the
same math up to float rounding (tests check the chosen tokens are identical).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
from transformers import DynamicCache, StaticCache

from ..errors import LoRAError
from ..runtime.seed import new_seed


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 → greedy (argmax); top_k 0 and top_p 1 → no filter."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise LoRAError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LoRAError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LoRAError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise LoRAError("top_k/top_p apply only when sampling: set a temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generated:
    """New tokens per prompt (end-of-sequence id not included) and how long each phase took."""
    tokens: list[list[int]]
    stopped: list[bool]           # row ended at an end-of-sequence id (else: hit max_new_tokens)
    prefill_s: float = 0.0        # prompt forward + first token
    decode_s: float = 0.0         # every later step
    decode_steps: int = 0         # forwards after the prefill
    prompt_tokens: int = 0        # real (unpadded) prompt tokens, all rows
    shapes: set = field(default_factory=set)   # distinct (input_ids, attention_mask) shapes fed to the model

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps (all rows; the first token belongs to the prefill)."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: list[list[int]], pad_token_id: int, pad_to_multiple: int = 1,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → input_ids (B, T) and attention_mask (B, T), pads on the left, T a multiple of pad_to_multiple."""
    T = round_up(max(len(p) for p in prompts), pad_to_multiple)
    input_ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            input_ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, T - len(p):] = 1
    return input_ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask → positions counting real tokens only: 0, 1, … from each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]            # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the fewest most-likely tokens holding at least top_p of the mass: drop a token when
        # the tokens ranked above it already hold top_p. The most likely token is never dropped.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position → (B,) token ids on the CPU."""
    if sampling.greedy:
        return logits.argmax(-1).cpu()
    # The draw runs on the CPU with a CPU generator, so a seed gives the same tokens on any device.
    logits = logits.float().cpu() / sampling.temperature
    probs = filter_logits(logits, sampling.top_k, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock times are real (no-op where there is none)."""
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def eos_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """Every id that ends a reply: the model's generation_config and config EOS (Llama 3 has several)
    and the tokenizer's, when given."""
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int, prompt: str = "prompt") -> None:
    """A one-line error when `prompt` (prompt_tokens long) + max_new_tokens do not fit the longest
    sequence the model was built for (config.max_position_embeddings, when it says)."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx is not None and prompt_tokens + max_new_tokens > ctx:
        raise LoRAError(f"{prompt} ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {ctx} tokens")


def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
             eos_token_id: int | Iterable[int] | None = None, pad_token_id: int = 0,
             sampling: Sampling = Sampling(), pad_to_multiple: int = 1, static_cache: bool = False,
             on_token: Callable[[int, int], None] | None = None, adapters=None) -> Generated:
    """Generate up to `max_new_tokens` tokens after each prompt (lists of token ids).

    eos_token_id None means the model's own (eos_ids: generation_config and config); pass () to never stop
    early. on_token(row, token_id) is called for each new token as soon as it is chosen (not for the
    end-of-sequence id), e.g. to stream text. See the module docstring for the static-shape mode.
    `adapters`: on a model holding named adapters (lora.serving.load_adapters), each prompt's adapter
    (a name, an index, or None for the base alone); all rows share one forward per step.
    """
    if adapters is None:
        return _generate(model, prompts, max_new_tokens, eos_token_id, pad_token_id, sampling,
                         pad_to_multiple, static_cache, on_token)
    if len(adapters) != len(prompts):
        raise LoRAError(f"{len(adapters)} adapters for {len(prompts)} prompts: one per prompt")
    from ..serving.rows import adapter_rows
    with adapter_rows(model, adapters):
        return _generate(model, prompts, max_new_tokens, eos_token_id, pad_token_id, sampling,
                         pad_to_multiple, static_cache, on_token)


@torch.no_grad()
def _generate(model, prompts, max_new_tokens, eos_token_id, pad_token_id, sampling, pad_to_multiple,
              static_cache, on_token) -> Generated:
    if not prompts:
        raise LoRAError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise LoRAError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise LoRAError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if pad_to_multiple < 1:
        raise LoRAError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    check_context(model, max(len(p) for p in prompts), max_new_tokens)
    if eos_token_id is None:
        eos_token_id = eos_ids(model)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)

    device = next(model.parameters()).device
    model.eval()
    B = len(prompts)
    input_ids, mask = left_pad(prompts, pad_token_id, pad_to_multiple, device)   # (B, T)
    T = input_ids.shape[1]
    if static_cache:
        # One cache length for the whole run: the mask is (B, L) at every step, zeros where nothing
        # is written yet, so the decode forward never changes shape.
        L = round_up(T + max_new_tokens, pad_to_multiple)
        cache = StaticCache(config=model.config, max_cache_len=L)
        full_mask = torch.zeros((B, L), dtype=torch.long, device=device)
        full_mask[:, :T] = mask
        step_mask = full_mask
    else:
        cache = DynamicCache(config=model.config)
        step_mask = mask
    positions = position_ids_from_mask(mask)                                     # (B, T)
    next_position = positions[:, -1:] + 1                                        # (B, 1)
    generator = None
    if not sampling.greedy:
        # No seed: one drawn from torch's global generator, so torch.manual_seed still governs the run.
        seed = sampling.seed if sampling.seed is not None else new_seed()
        generator = torch.Generator().manual_seed(seed)

    out = Generated(tokens=[[] for _ in range(B)], stopped=[False] * B,
                    prompt_tokens=sum(len(p) for p in prompts))
    done = [False] * B
    _sync(device)
    t0 = time.perf_counter()
    step_ids = input_ids
    step_positions = positions
    for step in range(max_new_tokens):
        out.shapes.add((tuple(step_ids.shape), tuple(step_mask.shape)))
        logits = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions,
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]     # (B, V)
        chosen = next_tokens(logits, sampling, generator).tolist()               # host sync
        for i, tok in enumerate(chosen):
            if done[i]:
                continue
            if tok in eos:
                done[i] = out.stopped[i] = True
                continue
            out.tokens[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
        now = time.perf_counter()
        if step == 0:
            out.prefill_s, t0 = now - t0, now
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep running on a pad token (their output is already cut): one batch shape.
        feed = [pad_token_id if done[i] else tok for i, tok in enumerate(chosen)]
        step_ids = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(-1)   # (B, 1)
        step_positions = next_position
        next_position = next_position + 1
        if static_cache:
            full_mask[:, T + step] = 1
        else:
            step_mask = torch.cat([step_mask, step_mask.new_ones((B, 1))], dim=-1)   # (B, T + step + 1)
        out.decode_steps += 1
    _sync(device)
    out.decode_s = time.perf_counter() - t0 if out.decode_steps else 0.0
    return out
