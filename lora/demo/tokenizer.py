"""A character-level tokenizer over printable ASCII, built with `tokenizers` and saved in HF format.

One token per character: the 95 printable characters ' '…'~' plus '\\t' and '\\n', and four special
tokens (<pad>, <s>, </s>, <unk>). Any other character encodes as <unk>. It is what the demo base
model uses, so a typed prompt always encodes and `decode` gives back the text unchanged: the
`Fuse` decoder joins tokens with no separator and `clean_up_tokenization_spaces` is off.

Like Llama's tokenizers, `tokenizer(text)` prepends <s>; `add_special_tokens=False` does not. As in
every HF tokenizer, the literal text of a special token (e.g. "</s>") in the input encodes as that
special token; it still decodes back to the same text.
"""
from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)                       # ids 0, 1, 2, 3
CHARS = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F))  # 97 characters, ids 4 … 100


def char_vocab() -> dict[str, int]:
    """{token: id}: the special tokens first, then one entry per character."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer as a `PreTrainedTokenizerFast` (vocab size 101)."""
    vocab = char_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own piece ([\s\S] also matches newlines, which '.' would not).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def save_char_tokenizer(out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the tokenizer and write it to `out_dir` (tokenizer.json + tokenizer_config.json)."""
    tok = build_char_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
