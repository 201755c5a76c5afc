"""Generation: our KV-cache loop against transformers' generate, batching, buckets, sampling, EOS,
adapter ≡ merged, and infer.py end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lora import LoRAConfig, LoRAError, apply_lora, save_adapter
from lora.inference.generate import Sampling, filter_logits, generate, left_pad, position_ids_from_mask
from lora.inference.complete import TextStream, complete
from lora.inference.load import load_for_generation
from lora.inference.prompts import encode, format_prompt
from lora.demo.tokenizer import save_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import infer  # noqa: E402

EOS = 2
PROMPTS = ["The cat", "a", "Once upon a time, far away", "xyz 123!"]   # lengths 8, 2, 27, 9 with <s>


def tiny_config(**kw):
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved random tiny Llama with the char tokenizer, an adapter with random B for it, and an
    adapter for a wider model (another base)."""
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    model.save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    apply_lora(model, cfg)          # init False: A and B random, so the adapter changes the output
    save_adapter(model, root / "adapter")
    other = LlamaForCausalLM(tiny_config(hidden_size=60, num_attention_heads=6))
    save_adapter(apply_lora(other, cfg), root / "other_adapter")
    return root


@pytest.fixture(scope="module")
def adapted(dirs):
    return load_for_generation(dirs / "base", dirs / "adapter")


def ids(tokenizer, texts):
    return [encode(tokenizer, t) for t in texts]


def hf_greedy(model, prompts, n):
    """transformers' own generate, left-padded batch, new tokens cut at the first EOS."""
    input_ids, mask = left_pad(prompts, 0)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)
    rows = []
    for row in out[:, input_ids.shape[1]:].tolist():
        rows.append(row[:row.index(EOS)] if EOS in row else row)
    return rows


def test_left_pad_and_positions():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0, pad_to_multiple=4)
    assert input_ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]


def test_greedy_matches_transformers_generate(adapted):
    model, tok = adapted                 # unmerged LoRA layers in the forward
    prompts = ids(tok, PROMPTS)
    ours = generate(model, prompts, 12, eos_token_id=EOS).tokens
    assert ours == hf_greedy(model, prompts, 12)
    assert [generate(model, [p], 12, eos_token_id=EOS).tokens[0] for p in prompts[:2]] == \
        [hf_greedy(model, [p], 12)[0] for p in prompts[:2]]


def test_batched_equals_one_at_a_time_and_buckets_change_nothing(adapted):
    model, tok = adapted
    prompts = ids(tok, PROMPTS)
    singles = [generate(model, [p], 10, eos_token_id=()).tokens[0] for p in prompts]
    assert all(len(s) == 10 for s in singles)
    assert generate(model, prompts, 10, eos_token_id=()).tokens == singles
    static = generate(model, prompts, 10, eos_token_id=(), pad_to_multiple=16, static_cache=True)
    assert static.tokens == singles
    # Static shapes: prompt padded to 32, cache to 48; one prefill shape and one decode shape.
    assert static.shapes == {((4, 32), (4, 48)), ((4, 1), (4, 48))}
    assert generate(model, prompts, 10, eos_token_id=(), pad_to_multiple=7).tokens == singles


def test_eos_stops_each_row(adapted):
    model, tok = adapted
    prompts = ids(tok, PROMPTS[:2])
    free = generate(model, prompts, 10, eos_token_id=()).tokens
    # Pick as EOS a token row 0 emits at step k (first occurrence): row 0 must stop right there.
    k = next(i for i in range(2, 10) if free[0][i] not in free[0][:i])
    stop = free[0][k]
    g = generate(model, prompts, 10, eos_token_id=stop)
    assert g.tokens[0] == free[0][:k] and g.stopped[0]
    cut = free[1].index(stop) if stop in free[1] else 10
    assert g.tokens[1] == free[1][:cut] and g.stopped[1] == (stop in free[1])


def test_filter_logits_matches_transformers_warpers():
    torch.manual_seed(3)
    logits = torch.randn(5, 37) * 3
    for k in (1, 5, 36):
        ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(filter_logits(logits, k, 1.0), ref)
    for p in (0.05, 0.5, 0.9, 0.999):
        ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, 0, p).isinf(), ref.isinf())


def test_sampling_seeded_and_top_k_1_is_greedy(adapted):
    model, tok = adapted
    prompts = ids(tok, PROMPTS[:3])
    draw = lambda **kw: generate(model, prompts, 12, eos_token_id=(), sampling=Sampling(**kw)).tokens
    a = draw(temperature=1.5, seed=7)
    assert draw(temperature=1.5, seed=7) == a
    assert draw(temperature=1.5, seed=8) != a
    assert draw(temperature=1.5, top_p=0.9, seed=7) == draw(temperature=1.5, top_p=0.9, seed=7)
    greedy = generate(model, prompts, 12, eos_token_id=()).tokens
    assert draw(temperature=0.7, top_k=1, seed=1) == greedy


def test_sampling_flags_are_checked():
    with pytest.raises(LoRAError, match="temperature > 0"):
        Sampling(top_k=5)
    with pytest.raises(LoRAError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_adapter_equals_merge_and_merged_checkpoint(dirs, adapted, tmp_path):
    from lora.merging.streaming import merge_checkpoint
    model, tok = adapted
    prompts = ids(tok, PROMPTS)
    want = generate(model, prompts, 12, eos_token_id=()).tokens
    base, _ = load_for_generation(dirs / "base")
    assert generate(base, prompts, 12, eos_token_id=()).tokens != want       # the adapter matters
    merged_here, _ = load_for_generation(dirs / "base", dirs / "adapter", merge=True)
    assert generate(merged_here, prompts, 12, eos_token_id=()).tokens == want
    merge_checkpoint(dirs / "base", dirs / "adapter", tmp_path / "merged", progress=False)
    merged_saved, _ = load_for_generation(tmp_path / "merged")
    assert generate(merged_saved, prompts, 12, eos_token_id=()).tokens == want


def test_prompt_formats(dirs, tmp_path):
    _, tok = load_for_generation(dirs / "base")
    assert format_prompt(tok, "hi", fmt="guanaco") == "### Human: hi ### Assistant:"
    with pytest.raises(LoRAError, match="no chat template"):
        format_prompt(tok, "hi", chat_template=True)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert format_prompt(tok, "hi", chat_template=True) == "<user>hi<assistant>"
    assert encode(tok, "hi", chat_template=True) == tok("<user>hi<assistant>", add_special_tokens=False)["input_ids"]
    with pytest.raises(LoRAError, match="empty prompt"):
        encode(tok, "  ")


class _ByteTokenizer:
    """Decodes token ids as UTF-8 bytes, so one character can take several tokens."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_stream_writes_whole_characters():
    import io
    out = io.StringIO()
    stream, seen = TextStream(_ByteTokenizer(), out), []
    for b in "a€b".encode():                 # '€' is 3 bytes
        stream(0, b)
        seen.append(out.getvalue())
    stream(1, 65)                             # another row: not this stream's
    assert seen == ["a", "a", "a", "a€", "a€b"] and out.getvalue() == "a€b"


def test_complete_batches_in_input_order(adapted):
    model, tok = adapted
    one, _ = complete(model, tok, PROMPTS, 8, batch_size=1)
    two, timing = complete(model, tok, PROMPTS, 8, batch_size=3, bucket=8)
    assert one == two and timing.batches == 2 and timing.prompt_tokens == sum(map(len, ids(tok, PROMPTS)))


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_single_prompt_streams_reply(dirs, adapted):
    model, tok = adapted
    want, _ = complete(model, tok, ["The cat"], 10)
    r = _cli("--model", dirs / "base", "--adapter", dirs / "adapter", "--prompt", "The cat",
             "--max-new-tokens", 10)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want[0] + "\n"
    assert "prefill" in r.stderr and "tokens/s" in r.stderr


def test_cli_prompt_file_with_merged_checkpoint(dirs, adapted, tmp_path):
    model, tok = adapted
    want, _ = complete(model, tok, PROMPTS, 6)
    from lora.merging.streaming import merge_checkpoint
    merge_checkpoint(dirs / "base", dirs / "adapter", tmp_path / "merged", progress=False)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    r = _cli("--model", tmp_path / "merged", "--prompt-file", tmp_path / "p.txt", "--batch-size", 3,
             "--max-new-tokens", 6, "--jsonl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS and [row["reply"] for row in rows] == want


@pytest.mark.parametrize("case, needle", [
    ("missing_model", "nope: no such model directory"),
    ("other_adapter", "shape"),
    ("empty_prompt", "empty prompt"),
    ("too_long", "context of 64 tokens"),
    ("blank_line", "p.txt:2: empty prompt"),
    ("no_template", "no chat template"),
    ("top_k_greedy", "temperature > 0"),
    ("bad_flag_value", "invalid int value"),
])
def test_cli_bad_input_is_one_line_error(dirs, tmp_path, capsys, case, needle):
    (tmp_path / "p.txt").write_text("ok\n\nfine\n")
    base = ["--model", str(dirs / "base")]
    argv = {
        "missing_model": ["--model", str(tmp_path / "nope"), "--prompt", "hi"],
        "other_adapter": base + ["--adapter", str(dirs / "other_adapter"), "--prompt", "hi"],
        "empty_prompt": base + ["--prompt", ""],
        "too_long": base + ["--prompt", "hi", "--max-new-tokens", "62"],
        "blank_line": base + ["--prompt-file", str(tmp_path / "p.txt")],
        "no_template": base + ["--prompt", "hi", "--chat-template"],
        "top_k_greedy": base + ["--prompt", "hi", "--top-k", "3"],
        "bad_flag_value": base + ["--prompt", "hi", "--max-new-tokens", "many"],
    }[case]
    try:
        status = infer.main(argv)
    except SystemExit as e:          # argparse's own errors exit from parse_args
        status = e.code
    assert status == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_no_arguments_runs_the_demo(dirs, tmp_path, monkeypatch, capsys):
    from lora.demo.task import heldout_examples
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    for name, src in (("base", "base"), ("adapter", "adapter")):
        (tmp_path / "runs" / "demo" / name).symlink_to(dirs / src)
    monkeypatch.chdir(tmp_path)
    assert infer.main([]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    shown = heldout_examples(8)
    rows = [line.split() for line in lines[2:2 + len(shown)]]
    assert [r[0] for r in rows] == [e["prompt"] for e in shown]
    assert [r[-2:] for r in rows] == [[e["completion"], "no"] for e in shown]   # a random adapter: no matches
    assert lines[-1] == f"0/{len(shown)} exact matches with the adapter, 0/{len(shown)} without"
    assert "prefill" in err
