"""Adapters written by PEFT itself load here and give PEFT's logits; ours load in PEFT."""
import pytest
import torch

import lora
from test_adapter import fresh_model

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "rslora_patterns", "subset_regex"])
def test_peft_written_adapter_gives_peft_logits(tmp_path, token_ids, dtype, kind):
    kwargs = dict(
        plain=dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        rslora_patterns=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={"up_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3}),
        subset_regex=dict(r=3, lora_alpha=5, target_modules=r".*\.(1|2)\.self_attn\.(q|k)_proj"),
    )[kind]
    pmodel = peft.get_peft_model(fresh_model(), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if "lora_" in name:                  # make the tensors exactly representable in `dtype`
                p.copy_(p.to(dtype).float())
    expected = pmodel(token_ids).logits
    pmodel.save_pretrained(tmp_path)
    if dtype != torch.float32:                  # PEFT writes fp32; re-save its tensors in half precision
        from safetensors.torch import load_file, save_file
        f = tmp_path / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    ours = lora.load_adapter(fresh_model(), tmp_path)
    torch.testing.assert_close(ours(token_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_our_adapter_loads_in_peft(tmp_path, token_ids):
    model = lora.apply_lora(fresh_model(), lora.LoRAConfig(r=4, lora_alpha=7, rank_pattern={"v_proj": 2}))
    from test_inject import randomize_B
    randomize_B(model)
    lora.save_adapter(model, tmp_path)
    pmodel = peft.PeftModel.from_pretrained(fresh_model(), tmp_path)
    torch.testing.assert_close(pmodel(token_ids).logits, model(token_ids).logits, rtol=1e-5, atol=1e-5)
