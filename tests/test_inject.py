"""apply_lora / merge_lora / trainable_parameters on real Hugging Face models."""
import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRAError, LoRALinear
from conftest import tiny_llama_config

ALL7 = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def randomize_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_default_targets_all_seven_with_gqa_shapes(tiny_llama):
    lora.apply_lora(tiny_llama, LoRAConfig(r=4))
    layers = lora.lora_layers(tiny_llama)
    assert len(layers) == 3 * 7
    assert {n.split(".")[-1] for n in layers} == ALL7
    k = tiny_llama.model.layers[0].self_attn.k_proj
    assert k.lora_A.shape == (4, 48) and k.lora_B.shape == (16, 4)     # 2 kv heads × head_dim 8
    assert not isinstance(tiny_llama.lm_head, LoRALinear)


def test_zero_B_model_is_bit_identical_to_base(tiny_llama, token_ids):
    expected = tiny_llama(token_ids).logits
    lora.apply_lora(tiny_llama, LoRAConfig(r=8, lora_dropout=0.1))
    assert torch.equal(tiny_llama(token_ids).logits, expected)


def test_only_lora_parameters_train_and_get_gradients(tiny_llama, token_ids):
    lora.apply_lora(tiny_llama, LoRAConfig(r=4, init_lora_weights=False))
    tiny_llama.train()
    tiny_llama(token_ids, labels=token_ids).loss.backward()
    for name, p in tiny_llama.named_parameters():
        is_lora = name.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name


def test_parameter_count_matches_closed_form(tiny_llama):
    total_before = sum(p.numel() for p in tiny_llama.parameters())
    r, L, h, i, kv = 6, 3, 48, 84, 16
    lora.apply_lora(tiny_llama, LoRAConfig(r=r))
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    trainable = L * per_layer
    report = lora.trainable_parameters(tiny_llama)
    total = total_before + trainable
    assert report == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                      f"trainable%: {100 * trainable / total:.4f}")


def test_target_forms_list_suffix_regex_all_linear():
    from transformers import LlamaForCausalLM
    def names(cfg):
        torch.manual_seed(0)
        m = LlamaForCausalLM(tiny_llama_config())
        return set(lora.lora_layers(lora.apply_lora(m, cfg)))
    assert names(LoRAConfig(target_modules=["self_attn.q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")}
    assert names(LoRAConfig(target_modules=r".*layers\.1\..*_proj")) == {
        f"model.layers.1.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}" for p in ALL7}
    assert {n.split(".")[-1] for n in names(LoRAConfig(target_modules="all-linear"))} == ALL7
    assert names(LoRAConfig(target_modules=["q_proj"], layers_to_transform=[0, 2])) == {
        "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"}
    assert names(LoRAConfig(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"])) == {
        f"model.layers.{i}.self_attn.q_proj" for i in range(3)}


def test_rank_and_alpha_patterns(tiny_llama):
    cfg = LoRAConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 12},
                     alpha_pattern={"o_proj": 3})
    layers = lora.lora_layers(lora.apply_lora(tiny_llama, cfg))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.1.mlp.down_proj"].r == 12
    assert layers["model.layers.0.mlp.down_proj"].r == 4
    assert layers["model.layers.2.self_attn.o_proj"].scaling == 3 / 4
    assert layers["model.layers.2.self_attn.q_proj"].scaling == 2.0


def test_unmatched_target_lists_candidates(tiny_llama):
    with pytest.raises(LoRAError, match=r"'qproj' matches no module; candidates: down_proj, gate_proj, k_proj, lm_head"):
        lora.apply_lora(tiny_llama, LoRAConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(LoRAError, match="not an nn.Linear"):
        lora.apply_lora(tiny_llama, LoRAConfig(target_modules=["self_attn"]))
    with pytest.raises(LoRAError, match="match no nn.Linear"):
        lora.apply_lora(tiny_llama, LoRAConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert not lora.lora_layers(tiny_llama)          # nothing half-applied
    lora.apply_lora(tiny_llama, LoRAConfig())
    with pytest.raises(LoRAError, match="already has LoRA"):
        lora.apply_lora(tiny_llama, LoRAConfig())


def test_merge_lora_equals_unmerged_and_leaves_plain_linears(tiny_llama, token_ids):
    lora.apply_lora(tiny_llama, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_B(tiny_llama)
    expected = tiny_llama(token_ids).logits
    with lora.disable_adapter(tiny_llama):
        base = tiny_llama(token_ids).logits
    assert (expected - base).abs().max() > 1e-3
    lora.merge_lora(tiny_llama)
    assert not any("lora_" in n for n, _ in tiny_llama.named_parameters())
    assert all(type(m) is not LoRALinear for m in tiny_llama.modules())
    assert type(tiny_llama.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(tiny_llama(token_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2(arch, token_ids):
    import transformers
    cfg_cls, model_cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(vocab_size=97, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=2)).eval()
    base = model(token_ids).logits
    lora.apply_lora(model, LoRAConfig(r=4))
    assert len(lora.lora_layers(model)) == 14
    assert torch.equal(model(token_ids).logits, base)
    if arch == "qwen2":     # q/k/v carry a bias there: it must stay frozen and in place
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert not model.model.layers[0].self_attn.q_proj.bias.requires_grad
