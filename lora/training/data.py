"""Training data: read records, tokenize with a loss mask, pack or pad to one fixed length.

Accepted files (one format per record, detected from its fields):
    .jsonl / .json   {"text": ...}                       every token is trained
                     {"prompt": ..., "completion": ...}  only the completion (and </s>) is trained
                     {"instruction", "input"?, "output"} Alpaca's prompt template; only the output
    .txt             plain text; records are separated by blank lines
A text containing "### Human:" / "### Assistant:" turns (guanaco) trains only the assistant replies.

Every example is <s> + tokens + </s>. `labels` has the token id where the token is trained and -100
(ignored by the loss) where it is not, aligned with `input_ids` as in Hugging Face: the model's
logits at t-1 predict labels[t]. Every batch has the same shape (B, max_seq_len): either records are
cut/padded to max_seq_len, or (`pack`) the token stream is cut into blocks of max_seq_len. The ragged
remainder is dropped, so a graph-compiling device sees one shape only.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoRAError

IGNORE = -100
Segments = list[tuple[str, bool]]      # (text, trained) in order

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_TURN = re.compile(r"(### Human:|### Assistant:)")


# -- records -> segments ----------------------------------------------------------------------
def guanaco_segments(text: str) -> Segments:
    """'### Human: q### Assistant: a…' -> the human turns and markers masked, the replies trained."""
    segments: Segments = []
    pieces = _TURN.split(text)                   # [before, marker, body, marker, body, ...]
    if pieces[0]:
        segments.append((pieces[0], False))
    for marker, body in zip(pieces[1::2], pieces[2::2]):
        if marker == "### Human:":
            segments.append((marker + body, False))
        else:
            segments += [(marker, False), (body, True)]
    return [s for s in segments if s[0]]


def text_segments(text: str) -> Segments:
    if "### Human:" in text and "### Assistant:" in text:
        return guanaco_segments(text)
    return [(text, True)]


def record_segments(record, where: str) -> Segments:
    """One JSON record -> segments; a one-line error naming `where` if no known field is usable."""
    if not isinstance(record, dict):
        raise LoRAError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def field(name: str) -> str | None:
        v = record.get(name)
        if v is not None and not isinstance(v, str):
            raise LoRAError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
        return v

    text, prompt, completion = field("text"), field("prompt"), field("completion")
    instruction, inp, output = field("instruction"), field("input"), field("output")
    if text:
        return text_segments(text)
    if prompt is not None and completion:
        return [(prompt, False), (completion, True)]
    if instruction and output:
        template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=inp), False), (output, True)]
    raise LoRAError(f"{where}: record has no usable field: need a non-empty \"text\", "
                    f"\"prompt\"+\"completion\", or \"instruction\"+\"output\" (got keys {sorted(record)})")


def read_records(path: str | os.PathLike) -> list[Segments]:
    """Read a .jsonl, .json (a list of records) or .txt file into segment lists."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoRAError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    records: list[Segments] = []
    if suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoRAError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            records.append(record_segments(obj, f"{path}:{n}"))
    elif suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LoRAError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(obj, list):
            raise LoRAError(f"{path}: a .json dataset must be a list of records")
        records = [record_segments(r, f"{path}: record {i}") for i, r in enumerate(obj)]
    elif suffix == ".txt":
        records = [text_segments(p) for p in re.split(r"\n\s*\n", raw) if p.strip()]
    else:
        raise LoRAError(f"{path}: unknown data format {suffix or '(no extension)'!r}; use .jsonl, .json or .txt")
    if not records:
        raise LoRAError(f"{path}: the dataset is empty")
    return records


# -- segments -> token ids + labels -----------------------------------------------------------
def tokenize_segments(segments: Segments, tokenizer) -> tuple[list[int], list[int]]:
    """<s> text </s> as ids, with labels = id where the character span is trained, else -100.

    The text is tokenized whole (as at inference) and each token takes the mask of the character
    it starts at, so masking never changes the tokenization. </s> is trained when the last segment is.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LoRAError("the tokenizer must be a fast (tokenizers-based) one with a tokenizer.json")
    text = "".join(s for s, _ in segments)
    trained = bytearray(len(text))
    pos = 0
    for s, t in segments:
        if t:
            trained[pos:pos + len(s)] = b"\x01" * len(s)
        pos += len(s)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        ids.append(bos)
        labels.append(IGNORE)
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tok)
        labels.append(tok if start < len(text) and trained[start] else IGNORE)
    if eos is not None:
        ids.append(eos)
        labels.append(eos if segments[-1][1] else IGNORE)
    return ids, labels


@dataclass
class TokenizedData:
    """Fixed-shape examples: (N, T) tensors. input_ids/labels int32 to halve memory; mask bool."""

    input_ids: torch.Tensor        # (N, T) int32
    labels: torch.Tensor           # (N, T) int32, -100 where not trained
    attention_mask: torch.Tensor   # (N, T) bool, False on padding
    truncated: int = 0             # records cut at max_seq_len (padding mode)
    dropped: int = 0               # records with no trained token left (padding mode)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: torch.Tensor) -> "TokenizedData":
        return TokenizedData(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def batch(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Rows `index` as int64/bool tensors on `device`, ready for the model."""
        return {
            "input_ids": self.input_ids[index].to(device=device, dtype=torch.long),
            "labels": self.labels[index].to(device=device, dtype=torch.long),
            "attention_mask": self.attention_mask[index].to(device=device, dtype=torch.long),
        }


def pad_examples(examples: list[tuple[list[int], list[int]]], max_seq_len: int, pad_id: int) -> TokenizedData:
    """Cut each example to max_seq_len and pad it on the right; drop those with nothing to train."""
    rows, truncated, dropped = [], 0, 0
    for ids, labels in examples:
        if len(ids) > max_seq_len:
            ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], truncated + 1
        # labels[0] is never a target (nothing precedes it), so it cannot make an example useful.
        if all(lab == IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        rows.append((ids, labels))
    n = len(rows)
    input_ids = torch.full((n, max_seq_len), pad_id, dtype=torch.int32)
    label_t = torch.full((n, max_seq_len), IGNORE, dtype=torch.int32)
    mask = torch.zeros((n, max_seq_len), dtype=torch.bool)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        label_t[i, :len(labels)] = torch.tensor(labels, dtype=torch.int32)
        mask[i, :len(ids)] = True
    return TokenizedData(input_ids, label_t, mask, truncated, dropped)


def pack_examples(examples: list[tuple[list[int], list[int]]], block_len: int) -> TokenizedData:
    """Concatenate all examples into one stream and cut it into blocks of block_len (no padding).

    The last partial block is dropped, and so is a block with no trained token.
    """
    ids = torch.tensor([t for e, _ in examples for t in e], dtype=torch.int32)
    labels = torch.tensor([t for _, lab in examples for t in lab], dtype=torch.int32)
    n = ids.numel() // block_len
    ids = ids[:n * block_len].view(n, block_len)
    labels = labels[:n * block_len].view(n, block_len)
    keep = (labels[:, 1:] != IGNORE).any(dim=1)
    return TokenizedData(ids[keep], labels[keep], torch.ones_like(ids[keep], dtype=torch.bool))


def load_dataset(path: str | os.PathLike, tokenizer, max_seq_len: int, pack: bool = False) -> TokenizedData:
    """Read, tokenize and shape a dataset file; a one-line error if nothing trainable is left."""
    records = read_records(path)
    examples = [tokenize_segments(segs, tokenizer) for segs in records]
    if pack:
        data = pack_examples(examples, max_seq_len)
    else:
        pad_id = tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
        data = pad_examples(examples, max_seq_len, pad_id)
    if len(data) == 0:
        how = (f"its {sum(len(e) for e, _ in examples)} tokens fill no block of {max_seq_len}" if pack
               else f"no record has a trained token within --max-seq-len {max_seq_len}")
        raise LoRAError(f"{path}: no usable examples ({how})")
    return data


def split_eval(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """A seeded random split: (train, eval) with round(fraction · N) ≥ 1 examples in eval."""
    if not 0 < fraction < 1:
        raise LoRAError(f"--eval-split must be between 0 and 1, got {fraction}")
    n_eval = max(1, round(fraction * len(data)))
    if n_eval >= len(data):
        raise LoRAError(f"--eval-split {fraction} leaves no training examples out of {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
