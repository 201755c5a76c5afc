"""`LoRAConfig`: the adapter's hyper-parameters, with PEFT's field names and meanings.

The same object is written to and read from `adapter_config.json`, so a saved adapter carries
everything needed to rebuild it (r, alpha, targets, per-module patterns).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

from ..errors import LoRAError

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The initialisations of A and B we implement (PEFT's `init_lora_weights` values; see LoRAConfig).
INIT_MODES = (True, False, "gaussian")

# PEFT config fields that change the math or the module set. We accept them only at their
# "off" value; anything else is a one-line error naming the field.
_UNSUPPORTED_UNLESS = {
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
    "monteclora_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
}
# PEFT fields that only matter at initialisation or for bookkeeping: safe to ignore when loading.
_IGNORED_PEFT_FIELDS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
    "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "qalora_group_size", "ensure_weight_tying",
}


@dataclass
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (PEFT's `LoraConfig` names).

    r:                rank of the update (≥ 1)
    lora_alpha:       scale numerator; scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r), `lora_scaling`)
    lora_dropout:     dropout on the LoRA branch's input, 0 ≤ p < 1
    target_modules:   list of exact names / dotted suffixes, a regex (full match), or "all-linear"
    use_rslora:       rank-stabilised scaling alpha / sqrt(r)
    use_dora:         DoRA: a trainable magnitude per output feature, W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row
                      (lora/core/dora.py); PEFT's forward and on-disk key lora_magnitude_vector
    rank_pattern:     {pattern: r} per-module override (pattern matches a name suffix, regex allowed)
    alpha_pattern:    {pattern: alpha} likewise
    layers_to_transform: int or list of layer indices (".layers.<i>.") to adapt; None = all
    layers_pattern:   name of the layer list ("layers"); None = any
    exclude_modules:  names / suffixes (or a regex) never adapted
    init_lora_weights: True = kaiming-uniform A, zero B; "gaussian" = A ~ N(0, 1/r), zero B;
                      False = both random (not an identity at step 0; for tests)
    bias:             only "none" is supported
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"
    base_model_name_or_path: Union[str, None] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise LoRAError(f"LoRAConfig: {msg}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            bad(f"r must be an integer >= 1, got {self.r!r}")
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            bad(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            bad(f"lora_dropout must satisfy 0 <= p < 1, got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    bad(f"target_modules regex {self.target_modules!r} does not compile: {e}")
            if self.layers_to_transform is not None:
                bad("layers_to_transform needs target_modules as a list, not a regex string")
        elif isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                bad(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        else:
            bad(f"target_modules must be a list of names, a regex string or 'all-linear', got {self.target_modules!r}")
        for name, pattern, check in (("rank_pattern", self.rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                                     ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0)):
            if not isinstance(pattern, dict):
                bad(f"{name} must be a dict {{pattern: value}}, got {pattern!r}")
            for k, v in pattern.items():
                if not check(v):
                    bad(f"{name}[{k!r}] = {v!r} is not valid")
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform
            ):
                bad(f"layers_to_transform must be an int or a list of ints >= 0, got {self.layers_to_transform!r}")
        check_init_mode(self.init_lora_weights, "LoRAConfig")
        if not isinstance(self.use_dora, bool):
            bad(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.bias != "none":
            bad(f"bias={self.bias!r} is not supported (only 'none': base biases stay frozen)")

    # -- per-module values ------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # -- PEFT's adapter_config.json ---------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            peft_type="LORA", task_type="CAUSAL_LM", inference_mode=True,
            fan_in_fan_out=False, modules_to_save=None, lora_bias=False,
        )
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> "LoRAConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if key in d and d[key] not in allowed:
                raise LoRAError(f"{source}: {key}={d[key]!r} is not supported")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - set(_UNSUPPORTED_UNLESS) - _IGNORED_PEFT_FIELDS)
        if unknown:
            raise LoRAError(f"{source}: unknown field(s) {', '.join(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        # PEFT's own default alpha is 8; a missing field must not silently become ours (16).
        kwargs.setdefault("lora_alpha", 8)
        for k in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(k) is None:
                kwargs[k] = {}
        if kwargs.get("use_dora", False) is None:
            kwargs["use_dora"] = False
        try:
            return cls(**kwargs)
        except LoRAError as e:
            raise LoRAError(f"{source}: {e}") from None


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s of the update s · B A: alpha / r (the paper), or alpha / sqrt(r) (rsLoRA, which keeps
    the update's scale stable as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_init_mode(init: Any, owner: str) -> None:
    """A LoRAError naming `owner` unless `init` is one of INIT_MODES. The bools are matched by identity:
    1 == True, but 1 is no init mode."""
    if not any(init is mode if isinstance(mode, bool) else init == mode for mode in INIT_MODES):
        *first, last = map(repr, INIT_MODES)
        raise LoRAError(f"{owner}: init_lora_weights must be {', '.join(first)} or {last}, got {init!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_key(pattern: dict, module_name: str) -> str | None:
    """PEFT's rule: a pattern matches when it matches a dotted suffix of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
