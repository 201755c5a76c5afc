"""PEFT's on-disk format: exact keys and config, bit-exact round trips, and every bad input."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
from lora import LoRAConfig, LoRAError
from conftest import tiny_llama_config
from test_inject import randomize_B


def fresh_model():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def saved(tmp_path, token_ids):
    model = lora.apply_lora(fresh_model(), LoRAConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      rank_pattern={"down_proj": 6}))
    randomize_B(model)
    out = tmp_path / "adapter"
    lora.save_adapter(model, out)
    return out, model, model(token_ids).logits


def test_files_keys_shapes_and_config(saved):
    out, model, _ = saved
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    expected = set()
    for i in range(3):
        for mod, r, width_out in (("self_attn.q_proj", 4, 48), ("self_attn.v_proj", 4, 16), ("mlp.down_proj", 6, 48)):
            expected |= {f"base_model.model.model.layers.{i}.{mod}.lora_A.weight",
                         f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"}
    assert keys == expected
    t = load_file(str(out / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (6, 84)
    assert t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert all(v.dtype == torch.float32 for v in t.values())
    text = (out / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["bias"]) == (4, 12, {"down_proj": 6}, "none")
    assert cfg["use_dora"] is False and cfg["fan_in_fan_out"] is False


def test_save_load_round_trip_is_bit_exact(saved, token_ids, tmp_path):
    out, model, logits = saved
    model2 = lora.load_adapter(fresh_model(), out)
    assert torch.equal(model2(token_ids).logits, logits)
    a = lora.lora_layers(model)
    for name, layer in lora.lora_layers(model2).items():
        assert torch.equal(layer.lora_A, a[name].lora_A) and torch.equal(layer.lora_B, a[name].lora_B)
    lora.save_adapter(model2, tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_save_overwrites_atomically(saved, token_ids):
    out, model, _ = saved
    for layer in lora.lora_layers(model).values():
        layer.lora_B.data.mul_(2)
    lora.save_adapter(model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]       # no temporaries left
    assert torch.equal(lora.load_adapter(fresh_model(), out)(token_ids).logits, model(token_ids).logits)


def _rewrite(out, key_fn=None, cfg_update=None):
    if key_fn:
        t = load_file(str(out / "adapter_model.safetensors"))
        save_file(key_fn(t), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if cfg_update:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(cfg_update)
        (out / "adapter_config.json").write_text(json.dumps(cfg))


K = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("mutate, message", [
    (lambda out: _rewrite(out, key_fn=lambda t: {k: v for k, v in t.items() if k != K}), "1 missing key.*q_proj.lora_A"),
    (lambda out: _rewrite(out, key_fn=lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}),
     "unexpected key.*lm_head"),
    (lambda out: _rewrite(out, key_fn=lambda t: {**t, K: torch.zeros(4, 50)}), r"q_proj.lora_A.weight has shape \(4, 50\) but the model needs \(4, 48\)"),
    (lambda out: _rewrite(out, cfg_update={"use_dora": True}), "missing key.*lora_magnitude_vector"),
    (lambda out: _rewrite(out, cfg_update={"bias": "all"}), "bias='all' is not supported"),
    (lambda out: _rewrite(out, cfg_update={"fan_in_fan_out": True}), "fan_in_fan_out=True is not supported"),
    (lambda out: _rewrite(out, cfg_update={"target_modules": ["q_prj"]}), "'q_prj' matches no module"),
    (lambda out: (out / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda out: (out / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda out: (out / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda out: (out / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes()[:300]),
     "unreadable safetensors"),
])
def test_bad_adapters_are_one_line_errors(saved, mutate, message):
    out, _, _ = saved
    mutate(out)
    with pytest.raises(LoRAError, match=message) as e:
        lora.load_adapter(fresh_model(), out)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapter_files_load_exactly(saved, dtype, token_ids):
    out, _, _ = saved
    _rewrite(out, key_fn=lambda t: {k: v.to(dtype) for k, v in t.items()})
    model = lora.load_adapter(fresh_model(), out)
    files = load_file(str(out / "adapter_model.safetensors"))
    layer = model.model.layers[2].mlp.down_proj
    assert layer.lora_A.dtype == torch.float32
    assert torch.equal(layer.lora_A, files["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"].float())
