"""The character tokenizer: one token per character, lossless decode, HF save/load."""
import random

import pytest

from lora.demo.tokenizer import CHARS, build_char_tokenizer, char_vocab, save_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def random_texts(n: int, seed: int):
    rng = random.Random(seed)
    # Runs of spaces, tabs and newlines next to punctuation: the cases a space-inserting or
    # whitespace-normalising decoder would get wrong.
    weights = [8 if c in " \t\n" else 1 for c in CHARS]
    return [""] + ["".join(rng.choices(CHARS, weights, k=rng.randint(1, 120))) for _ in range(n)]


def test_vocab_layout(tok):
    assert len(tok) == 101
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert char_vocab()["a"] == 4 + CHARS.index("a")


def test_round_trip_on_arbitrary_printable_text(tok):
    for text in random_texts(200, seed=0):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)                        # one token per character
        assert tok.decode(ids) == text
        with_bos = tok(text)["input_ids"]
        assert with_bos == [tok.bos_token_id] + ids         # like Llama: <s> first
        assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_edge_whitespace_and_punctuation_survive(tok):
    for text in ["  leading", "trailing  ", "a , b . c ' d", "x\n\n\ty", " ", "\n", "don't ."]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_unknown_characters_become_unk(tok):
    ids = tok("a\u00e9b", add_special_tokens=False)["input_ids"]
    assert ids == [char_vocab()["a"], tok.unk_token_id, char_vocab()["b"]]


def test_offsets_are_per_character(tok):
    enc = tok("ab =c", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_save_and_load_in_hf_format(tmp_path):
    from transformers import AutoTokenizer
    save_char_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ref = build_char_tokenizer()
    assert loaded.is_fast and len(loaded) == len(ref)
    for text in random_texts(30, seed=1):
        assert loaded(text)["input_ids"] == ref(text)["input_ids"]
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
