"""4-bit bases from disk (lora/storage/quantized.py): a full-precision checkpoint quantized while read,
a transformers + bitsandbytes 4-bit checkpoint read as it is without importing bitsandbytes, training
and inference on them, and PEFT + bitsandbytes agreeing on our adapters both ways."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

import lora
from lora import LoRAConfig, LoRAError, apply_lora, load_adapter, quantize_nf4, save_adapter
from lora.demo.tokenizer import save_char_tokenizer
from lora.quant.linear import NF4Linear
from lora.quant.nf4 import NF4Weight
from lora.storage.model_dir import check_model_dir, load_model
from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import infer  # noqa: E402
import train as train_cli  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama saved in bf16 (untied head: it stays dense), with the char tokenizer. Every
    in_features a multiple of 64: bitsandbytes' AVX-512 CPU dequantizer (0.50) reads the scales per row
    and is wrong otherwise when in_features is a multiple of 16."""
    root = tmp_path_factory.mktemp("qbase")
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=101, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root)
    save_char_tokenizer(root)
    return root


@pytest.fixture(scope="module")
def bnb_dir(base, tmp_path_factory):
    """The base quantized and saved by transformers + bitsandbytes (4-bit NF4, double quantization)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[test])")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    root = tmp_path_factory.mktemp("bnb")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model.save_pretrained(root)
    for f in base.glob("tokenizer*"):
        shutil.copy(f, root)
    return root


def bnb_model(path):
    """The checkpoint loaded by transformers + bitsandbytes, on bitsandbytes' plain CPU path (its
    AVX512-BF16 path repacks the weights and needs out_features divisible by 32)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def nf4_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def test_quantized_while_read(base):
    dense = load_model(base)
    quant = load_model(base, quantize="nf4")
    names = {n for n, m in dense.named_modules() if type(m) is nn.Linear}
    assert set(nf4_modules(quant)) == names - {"lm_head"} and type(quant.lm_head) is nn.Linear
    dense_modules = dict(dense.named_modules())
    for name, m in nf4_modules(quant).items():
        ref = quantize_nf4(dense_modules[name].weight)
        assert torch.equal(m.weight.packed, ref.packed) and torch.equal(m.weight.absmax, ref.absmax)
        assert m.weight.dtype == torch.bfloat16
        dense_modules[name].weight.data.copy_(m.weight.dequantize())
    dense_params = dict(dense.named_parameters())
    for n, q in quant.named_parameters():
        assert torch.equal(dense_params[n], q), n                     # embeddings, norms, head: as saved
    assert torch.equal(quant.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        assert torch.equal(quant(ids).logits, dense(ids).logits)    # ≡ the dequantized dense model


def test_bitsandbytes_checkpoint_read_without_bitsandbytes(base, bnb_dir, tmp_path):
    # A fresh process: our loader must not import bitsandbytes even though it is installed.
    script = f"""
import sys, torch
from lora.storage.model_dir import load_model
ours = load_model({str(bnb_dir)!r})
assert 'bitsandbytes' not in sys.modules
requant = load_model({str(base)!r}, quantize='nf4')
a, b = dict(ours.named_buffers()), dict(requant.named_buffers())
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'not the bytes we write'
assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), requant.parameters()))
torch.save(ours(torch.tensor([[1, 5, 9, 33, 7]])).logits, {str(tmp_path / 'logits.pt')!r})
assert 'bitsandbytes' not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = bnb_model(bnb_dir)
    with torch.no_grad():
        expected = theirs(torch.tensor([[1, 5, 9, 33, 7]])).logits
    assert_close_bf16(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize("qc, named", [
    (dict(quant_method="bitsandbytes", load_in_8bit=True), "8-bit"),
    (dict(quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type="fp4"), "4-bit FP4"),
    (dict(quant_method="gptq", bits=4), "'gptq'"),
])
def test_other_storage_types_are_one_line(base, tmp_path, qc, named):
    shutil.copytree(base, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(LoRAError, match=f"quantization {named} is not supported; supported: bitsandbytes 4-bit NF4"):
        check_model_dir(tmp_path / "m")


def test_quantized_demo_learns_the_task(tmp_path, capsys):
    """`train.py --quantize nf4` on the demo: the 4-bit base still learns it (held-out exact match)."""
    out = tmp_path / "demo"
    assert train_cli.main(["--out", str(out), "--quantize", "nf4", "--no-progress"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["exact_match_before"] <= 0.1 and ev["exact_match"] >= 0.9
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "quantization" not in json.dumps(config)
    # infer.py --quantize nf4 reads the same base 4-bit and completes a held-out example
    from lora.demo.task import heldout_examples
    e = heldout_examples()[0]
    capsys.readouterr()
    assert infer.main(["--model", str(out / "base"), "--adapter", str(out / "adapter"), "--quantize", "nf4",
                       "--prompt", e["prompt"], "--max-new-tokens", str(len(e["completion"]))]) == 0
    assert e["completion"] in capsys.readouterr().out


# -- PEFT + bitsandbytes ---------------------------------------------------------------------------

def _peft():
    return pytest.importorskip("peft", reason="peft is not installed (pip install -e .[test])")


def _randomize_B(named_params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def assert_close_bf16(got, expected):
    """Within bf16 compute: PEFT runs the LoRA branch in the adapter's fp32 and we in bf16, so the logits
    differ by a few bf16 roundings (2⁻⁸ relative each) of the largest ones."""
    assert (got.float() - expected.float()).abs().max() <= 2 ** -8 * 16 * expected.float().abs().max()


def _greedy(model, ids, n=6):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_our_4bit_adapter_in_peft_and_bitsandbytes(bnb_dir, tmp_path):
    peft = _peft()
    torch.manual_seed(0)
    ours = apply_lora(load_model(bnb_dir), LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_B(ours.named_parameters())
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(bnb_model(bnb_dir), tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 7], [1, 40, 2, 8, 8]])
    with torch.no_grad():
        assert_close_bf16(ours(ids).logits, theirs(ids).logits)
    assert torch.equal(_greedy(ours, ids), _greedy(theirs, ids))


def test_peft_4bit_adapter_here(bnb_dir, tmp_path):
    peft = _peft()
    torch.manual_seed(0)                                          # PEFT draws A from the global generator
    theirs = peft.get_peft_model(bnb_model(bnb_dir),
                                 peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_B(theirs.named_parameters())
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(load_model(bnb_dir), tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 7], [1, 40, 2, 8, 8]])
    with torch.no_grad():
        assert_close_bf16(ours(ids).logits, theirs(ids).logits)
    assert torch.equal(_greedy(ours, ids), _greedy(theirs, ids))


# -- merge.py --------------------------------------------------------------------------------------

def test_merge_into_a_4bit_base(bnb_dir, tmp_path):
    from lora.core.delta import Term, merged_weight
    from lora.storage.safetensors_stream import read_checkpoint
    torch.manual_seed(0)
    ours = apply_lora(load_model(bnb_dir), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    _randomize_B(ours.named_parameters())
    save_adapter(ours, tmp_path / "adapter")
    lora.merge_checkpoint(bnb_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    shards, _ = read_checkpoint(tmp_path / "merged")
    names = {e.name: e for e in shards[0].entries}
    assert not any(".weight." in n for n in names)                    # no statistics left
    merged = load_model(tmp_path / "merged")
    assert not nf4_modules(merged) and merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    layers = dict(ours.named_modules())
    for name, m in merged.named_modules():
        if name.endswith(("q_proj", "down_proj")):                    # W' = round(deq(W) + s·B A), one rounding
            lay = layers[name]
            ref = merged_weight(lay.weight.dequantize(torch.float32),
                                [Term(lay.lora_A.detach(), lay.lora_B.detach(), lay.scaling, 1.0)], torch.bfloat16)
            assert torch.equal(m.weight, ref), name
        elif name.endswith("up_proj"):
            assert torch.equal(m.weight, layers[name].weight.dequantize(torch.bfloat16))
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        assert_close_bf16(merged(ids).logits, ours(ids).logits)
