"""Dataset formats, loss masks (exact label tensors), padding, packing, splits and bad input."""
import json

import pytest
import torch

from lora import LoRAError
from lora.training.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE, epoch_order, load_dataset,
                       pack_examples, pad_examples, read_records, split_eval, tokenize_segments)
from lora.demo.tokenizer import build_char_tokenizer, char_vocab

BOS, EOS, PAD = 1, 2, 0
M = IGNORE


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def ids(text):
    v = char_vocab()
    return [v[c] for c in text]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab=", "completion": "xy"}])
    d = load_dataset(path, tok, max_seq_len=10)
    assert d.input_ids.tolist() == [[BOS] + ids("ab=xy") + [EOS] + [PAD] * 3]
    assert d.labels.tolist() == [[M, M, M, M] + ids("xy") + [EOS] + [M] * 3]
    assert d.attention_mask.tolist() == [[True] * 7 + [False] * 3]


def test_text_record_trains_every_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi there"}])
    d = load_dataset(path, tok, max_seq_len=10)
    assert d.labels.tolist() == [[M] + ids("hi there") + [EOS]]


def test_alpaca_with_and_without_input(tmp_path, tok):
    recs = [{"instruction": "Add.", "input": "1 2", "output": "3"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    segs = read_records(write_jsonl(tmp_path / "a.jsonl", recs))
    assert segs[0] == [(ALPACA_PROMPT.format(instruction="Add.", input="1 2"), False), ("3", True)]
    assert segs[1] == [(ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), False), ("hi", True)]
    input_ids, labels = tokenize_segments(segs[1], tok)
    n_prompt = 1 + len(ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."))
    assert labels == [M] * n_prompt + ids("hi") + [EOS]
    assert input_ids[n_prompt:] == ids("hi") + [EOS]


def test_guanaco_trains_only_the_assistant_turns(tmp_path, tok):
    text = "### Human: hi### Assistant: yo### Human: q?### Assistant: ok"
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": text}])
    assert read_records(path)[0] == [("### Human: hi", False), ("### Assistant:", False), (" yo", True),
                                     ("### Human: q?", False), ("### Assistant:", False), (" ok", True)]
    d = load_dataset(path, tok, max_seq_len=64)
    labels = d.labels[0].tolist()
    expect = [M] * (1 + len("### Human: hi### Assistant:")) + ids(" yo") \
        + [M] * len("### Human: q?### Assistant:") + ids(" ok") + [EOS]
    assert labels[:len(expect)] == expect and set(labels[len(expect):]) == {M}
    assert tok.decode([t for t in d.input_ids[0].tolist() if t > 3]) == text


def test_txt_paragraphs_and_guanaco_text(tmp_path):
    (tmp_path / "p.txt").write_text("first para\nline two\n\n  \nsecond\n\n\n### Human: a### Assistant: b\n")
    assert read_records(tmp_path / "p.txt") == [
        [("first para\nline two", True)], [("second", True)],
        [("### Human: a", False), ("### Assistant:", False), (" b\n", True)]]


def test_json_list_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    assert read_records(tmp_path / "a.json")[0][1] == ("o", True)


def test_truncation_and_dropping_in_pad_mode():
    examples = [([1, 10, 11, 12, 13, 2], [M, M, 11, 12, 13, 2]),   # cut to 4
                ([1, 10, 11, 12, 13, 2], [M, M, M, M, 13, 2])]     # nothing trained within 4: dropped
    d = pad_examples(examples, max_seq_len=4, pad_id=0)
    assert d.input_ids.tolist() == [[1, 10, 11, 12]]
    assert d.labels.tolist() == [[M, M, 11, 12]]
    assert (d.truncated, d.dropped) == (2, 1)


def test_packing_into_fixed_blocks():
    examples = [([1, 10, 11, 2], [M, M, 11, 2]),
                ([1, 20, 21, 22, 2], [M, 20, 21, 22, 2]),
                ([1, 30, 2], [M, M, M])]
    d = pack_examples(examples, block_len=3)
    # stream: 1 10 11 2 1 20 21 22 2 1 30 2 -> blocks of 3, the last one (1 30 2) has no target
    assert d.input_ids.tolist() == [[1, 10, 11], [2, 1, 20], [21, 22, 2]]
    assert d.labels.tolist() == [[M, M, 11], [2, M, 20], [21, 22, 2]]
    assert d.attention_mask.all()
    d = pack_examples(examples, block_len=5)                  # 12 tokens -> 2 blocks, 2 dropped
    assert d.input_ids.shape == (2, 5)
    assert d.input_ids.flatten().tolist() == [1, 10, 11, 2, 1, 20, 21, 22, 2, 1]


def test_pack_flag_uses_the_token_stream(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdef"}] * 5)       # 8 tokens each
    d = load_dataset(path, tok, max_seq_len=16, pack=True)
    assert d.input_ids.shape == (2, 16)
    assert d.input_ids[0].tolist() == [BOS] + ids("abcdef") + [EOS] + [BOS] + ids("abcdef") + [EOS]


def test_batches_have_one_shape(tmp_path, tok):
    recs = [{"prompt": "p" * n, "completion": "c"} for n in range(1, 9)]
    d = load_dataset(write_jsonl(tmp_path / "d.jsonl", recs), tok, max_seq_len=12)
    b = d.batch(torch.tensor([0, 7]), torch.device("cpu"))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 12)
    assert b["input_ids"].dtype == torch.long


def test_split_and_epoch_order_are_seeded(tmp_path, tok):
    recs = [{"text": f"r{i}"} for i in range(20)]
    d = load_dataset(write_jsonl(tmp_path / "d.jsonl", recs), tok, max_seq_len=8)
    train, ev = split_eval(d, 0.25, seed=3)
    assert (len(train), len(ev)) == (15, 5)
    rows = {tuple(r) for r in train.input_ids.tolist()} | {tuple(r) for r in ev.input_ids.tolist()}
    assert len(rows) == 20                                     # a partition
    assert torch.equal(split_eval(d, 0.25, seed=3)[1].input_ids, ev.input_ids)
    assert torch.equal(epoch_order(20, 0, 1), epoch_order(20, 0, 1))
    assert not torch.equal(epoch_order(20, 0, 1), epoch_order(20, 0, 2))
    assert sorted(epoch_order(20, 0, 1).tolist()) == list(range(20))


@pytest.mark.parametrize("content,suffix,message", [
    (None, ".jsonl", "no such file"),
    ("", ".jsonl", "empty"),
    ("\n\n", ".jsonl", "empty"),
    ('{"text": "ok"}\n{"question": "q", "answer": "a"}\n', ".jsonl", "d.jsonl:2: record has no usable field"),
    ('{"text": "ok"}\n{"prompt": "p"}\n', ".jsonl", "d.jsonl:2: record has no usable field"),
    ('{"text": "ok"}\n{not json\n', ".jsonl", "d.jsonl:2: not valid JSON"),
    ('{"text": 3}\n', ".jsonl", "field 'text' must be a string"),
    ('[1, 2]\n', ".jsonl", "expected a JSON object"),
    ('{"text": "a"}', ".json", "must be a list of records"),
    ("a,b\n", ".csv", "unknown data format"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"d{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LoRAError, match=message) as e:
        read_records(path)
    assert "\n" not in str(e.value)


def test_nothing_trainable_within_max_seq_len(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a long prompt", "completion": "x"}])
    with pytest.raises(LoRAError, match="no usable examples"):
        load_dataset(path, tok, max_seq_len=8)
    with pytest.raises(LoRAError, match="no usable examples"):
        load_dataset(path, tok, max_seq_len=64, pack=True)
