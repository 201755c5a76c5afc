"""The demo's task and base: a task a random base cannot do, learned by LoRA (lora/demo/train_demo.py
trains it: `python train.py` with no arguments).

Base: a 2.9M-parameter Llama (4 layers, hidden 256, 8 query heads sharing 2 key/value heads, tied
embeddings) with random weights from a fixed seed, and the character tokenizer of `lora.demo.tokenizer`.
Its only non-default structure: the final RMSNorm gain is 4 instead of 1. With HF's init (std 0.02)
the final hidden state has norm ~16 and each tied embedding row ~0.32, so no token's logit can
exceed another's by more than ~5: against 100 other tokens even a perfect adapter would keep a loss
near 0.5. A gain of 4 lifts that ceiling to ~20. The base stays random and frozen: it never sees
the task.

Task: a fixed letter substitution (a random permutation of a–z) applied to 6-letter words:
    prompt "bcclfx=" -> completion "errnqd" (+ </s>)
Each output letter is the image of the input letter 7 positions before it, so the model has to
learn that attention offset and the mapping: the random base cannot (exact match 0), a rank-16
adapter learns both in 60 steps (lora/demo/train_demo.py's settings). Held-out words never appear in
training, so exact match measures the learned rule, not recall.

Reusable pieces: `build_demo_base`, `make_task_examples`, `heldout_examples`, `greedy_complete`,
`exact_match`.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from ..storage.atomic import atomic_dir, atomic_write_text
from ..errors import LoRAError

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
WORD_LEN = 6
TASK_SEED = 1234          # fixes the letter mapping
BASE_SEED = 0             # fixes the random base weights
N_TRAIN, N_HELDOUT = 4096, 200


# -- the task ---------------------------------------------------------------------------------
def substitution(seed: int = TASK_SEED) -> dict[str, str]:
    """The fixed letter mapping of the task: a random permutation of a–z."""
    shuffled = list(ALPHABET)
    random.Random(seed).shuffle(shuffled)
    return dict(zip(ALPHABET, shuffled))


def apply_task(word: str, mapping: dict[str, str] | None = None) -> str:
    """The correct completion for `word`: each letter substituted."""
    mapping = mapping or substitution()
    return "".join(mapping[c] for c in word)


def make_task_examples(n: int, seed: int, exclude: set[str] = frozenset(), word_len: int = WORD_LEN) -> list[dict]:
    """`n` distinct task examples {"prompt": "<word>=", "completion": "<mapped word>"}, none of whose
    words is in `exclude`; the same (n, seed, exclude) always gives the same list."""
    rng, mapping = random.Random(seed), substitution()
    words: list[str] = []
    seen = set(exclude)
    while len(words) < n:
        w = "".join(rng.choice(ALPHABET) for _ in range(word_len))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return [{"prompt": w + "=", "completion": apply_task(w, mapping)} for w in words]


def heldout_examples(n: int = N_HELDOUT) -> list[dict]:
    """The demo's held-out examples (never trained on): the first `n` of a fixed list."""
    return make_task_examples(N_HELDOUT, seed=2, exclude=_train_words())[:n]


def train_examples() -> list[dict]:
    return make_task_examples(N_TRAIN, seed=1)


def _train_words() -> set[str]:
    return {e["prompt"][:-1] for e in train_examples()}


# -- the base model ---------------------------------------------------------------------------
def demo_config(vocab_size: int, **overrides):
    """The demo base's LlamaConfig; `overrides` (e.g. hidden_size=32 for tests) replace fields."""
    from transformers import LlamaConfig
    fields = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**fields, **overrides})


def build_demo_base(out_dir: str | os.PathLike, seed: int = BASE_SEED, **config_overrides) -> Path:
    """Write the demo base model and its tokenizer to `out_dir` in HF format (atomically).

    Deterministic: the same seed gives bit-identical weights. `config_overrides` change the
    LlamaConfig (the tests build a smaller one). Returns the directory.
    """
    from transformers import LlamaForCausalLM

    from .tokenizer import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(demo_config(len(tokenizer), **config_overrides))
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)     # see the module docstring
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def write_task_data(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """train.jsonl (N_TRAIN examples) and eval.jsonl (the held-out ones) as prompt/completion records."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    for path, examples in zip(paths, (train_examples(), heldout_examples())):
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in examples))
    return paths


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions (up to </s> or max_new_tokens) of each prompt, as text.

    Plain and exact rather than fast: prompts of one token length are batched and every step reruns
    the whole sequence (no KV cache), so no padding or cache can change a result.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    encoded = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    results: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for group in by_len.values():
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in rows], device=device)     # (B, T)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            new = []
            for _ in range(max_new_tokens):
                nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)   # (B,)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                new.append(nxt)
                done |= nxt == eos
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                if done.all():
                    break
            gen = torch.stack(new, dim=1).tolist() if new else [[] for _ in rows]
            for i, toks in zip(rows, gen):
                toks = toks[:toks.index(eos)] if eos in toks else toks
                results[i] = tokenizer.decode(toks, skip_special_tokens=True)
    model.train(was_training)
    return results


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int | None = None) -> float:
    """Share of examples whose greedy completion equals example["completion"] exactly (ending at </s>)."""
    if not examples:
        raise LoRAError("exact_match needs at least one example")
    longest = max(len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"]) for e in examples)
    outs = greedy_complete(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens or longest + 1)
    return sum(o == e["completion"] for o, e in zip(outs, examples)) / len(examples)
