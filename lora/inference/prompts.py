"""Prompts as the model sees them: read from a file, formatted (plain, chat template, guanaco), encoded.

    read_prompts(path)               -> one prompt per line; a blank line is an error naming it
    read_prompt_rows(path)           -> [(prompt, adapter name or None)] from a .jsonl file
    format_prompt(tok, text, ...)    -> the text the model sees
    encode(tok, text, ...)           -> its token ids
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoRAError

FORMATS = ("plain", "guanaco")


def read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LoRAError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoRAError(f"{path}: cannot read ({e})") from None
    if not lines:
        raise LoRAError(f"{path}: no prompts (the file is empty)")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise LoRAError(f"{path}:{i}: empty prompt")
    return lines


def read_prompt_rows(path: str) -> list[tuple[str, str | None]]:
    """A `.jsonl` prompt file: one `{"prompt": TEXT, "adapter": NAME}` object per line, `adapter`
    missing or null for the base alone. Any other key, or a line that is not such an object, is an
    error naming the line."""
    rows = []
    for i, line in enumerate(read_prompts(path), 1):
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoRAError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise LoRAError(f"{path}:{i}: expected a JSON object {{\"prompt\": ..., \"adapter\": ...}}")
        unknown = sorted(set(d) - {"prompt", "adapter"})
        if unknown:
            raise LoRAError(f"{path}:{i}: unknown key(s) {', '.join(map(repr, unknown))} (only prompt, adapter)")
        prompt, adapter = d.get("prompt"), d.get("adapter")
        if not isinstance(prompt, str) or not prompt.strip():
            raise LoRAError(f"{path}:{i}: \"prompt\" must be a non-empty string")
        if adapter is not None and not isinstance(adapter, str):
            raise LoRAError(f"{path}:{i}: \"adapter\" must be a name or null, got {adapter!r}")
        rows.append((prompt, adapter))
    return rows


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
