import pytest

from lora import LoRAConfig, LoRAError


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(r=2.5), "r must be an integer >= 1"),
    (dict(lora_alpha=0), "lora_alpha must be > 0"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be > 0"),
    (dict(lora_dropout=1.0), "0 <= p < 1"),
    (dict(lora_dropout=-0.1), "0 <= p < 1"),
    (dict(target_modules=[]), "non-empty list"),
    (dict(target_modules="(unclosed"), "does not compile"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "needs target_modules as a list"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\]"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(init_lora_weights=1), "init_lora_weights must be True, False or 'gaussian', got 1"),
    (dict(bias="all"), "bias='all' is not supported"),
])
def test_validation_messages_are_one_line(kwargs, message):
    with pytest.raises(LoRAError, match=message) as e:
        LoRAConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_defaults_and_scaling():
    c = LoRAConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias) == (8, 16, 0.0, "none")
    assert c.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert c.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("x.q_proj") == 2.0
    assert LoRAConfig(layers_to_transform=3).layers_to_transform == [3]


def test_peft_dict_round_trip_and_rejections():
    c = LoRAConfig(r=4, lora_alpha=9, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 5}, use_rslora=True)
    d = c.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM"
    assert LoRAConfig.from_peft_dict(d) == c
    assert LoRAConfig.from_peft_dict({"r": 4, "target_modules": ["q_proj"]}).lora_alpha == 8   # PEFT's default
    for key, value in [("use_dora", "yes"), ("fan_in_fan_out", True), ("bias", "lora_only"),
                       ("modules_to_save", ["lm_head"]), ("peft_type", "IA3")]:
        with pytest.raises(LoRAError, match=key if key != "bias" else "bias="):
            LoRAConfig.from_peft_dict({**d, key: value})
    with pytest.raises(LoRAError, match="unknown field"):
        LoRAConfig.from_peft_dict({**d, "lora_rank": 3})


def test_fingerprint_without_dora_is_the_one_runs_recorded_before_dora():
    """A run begun before DoRA existed has no use_dora in run.json: it must still resume."""
    from lora.training.config import TrainConfig
    plain = TrainConfig(model="m", data="d").fingerprint()["lora"]
    assert "use_dora" not in plain
    assert TrainConfig(model="m", data="d", lora=LoRAConfig(use_dora=True)).fingerprint()["lora"]["use_dora"] is True
