"""PEFT's on-disk adapter format, read and written without importing peft.

    <dir>/adapter_config.json        LoRAConfig fields + peft_type "LORA" (sorted keys, indent 2)
    <dir>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                                     base_model.model.<module>.lora_B.weight  (out, r)
                                     base_model.model.<module>.lora_magnitude_vector  (out,)  DoRA only
                                     (PEFT writes the magnitude without a ".weight" suffix)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic import atomic_dir, write_bytes
from ..core.config import LoRAConfig
from ..core.delta import all_finite
from ..errors import LoRAError
from ..core.inject import apply_lora, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_key(module_name: str, which: str) -> str:
    """'model.layers.0.self_attn.q_proj', 'A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
    which = 'magnitude' -> '….q_proj.lora_magnitude_vector' (DoRA's m)."""
    if which == "magnitude":
        return f"{PREFIX}{module_name}.lora_magnitude_vector"
    return f"{PREFIX}{module_name}.lora_{which}.weight"


def layer_tensors(name: str, layer) -> dict[str, torch.Tensor]:
    """{PEFT key: parameter} of one LoRALinear: A and B, and m with DoRA."""
    out = {peft_key(name, "A"): layer.lora_A, peft_key(name, "B"): layer.lora_B}
    if layer.use_dora:
        out[peft_key(name, "magnitude")] = layer.lora_magnitude_vector
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (views of the live parameters)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out.update({k: p.detach() for k, p in layer_tensors(name, layer).items()})
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, config: LoRAConfig | None = None) -> None:
    """Write `model`'s adapter to `out_dir` in PEFT's format, atomically (temp dir + rename)."""
    config = config or getattr(model, "lora_config", None)
    if config is None:
        raise LoRAError("model has no lora_config; pass config= or build it with apply_lora")
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise LoRAError("model has no LoRA layers to save")
    cfg = config.to_peft_dict()
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with atomic_dir(out_dir) as tmp:
        write_bytes(tmp / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise LoRAError(f"{adapter_dir}: no {CONFIG_NAME} (not an adapter directory)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LoRAError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft_dict(d, source=str(path))


def weights_path(adapter_dir: str | os.PathLike) -> Path:
    """<dir>/adapter_model.safetensors; a one-line error when it is missing (or only a pickle is there)."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise LoRAError(f"{adapter_dir}: only adapter_model.bin (pickle) found; we read safetensors only")
        raise LoRAError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    return path


def read_adapter_tensors(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = weights_path(adapter_dir)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoRAError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply the saved adapter to `model` and load its weights.

    A plain model gets LoRA layers built from the saved config; a model that already has LoRA layers
    (same config) just gets the weights. Every key must be present and expected, every shape exact.
    """
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    if not lora_layers(model):
        apply_lora(model, config)
    else:
        model.lora_config = config
    load_adapter_tensors(model, tensors, source=str(adapter_dir))
    return model


def check_finite(t: torch.Tensor, key: str, source: str) -> None:
    """A one-line error when `t` holds NaN or ±inf: such an adapter poisons every output it touches."""
    if all_finite(t):
        return
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise LoRAError(f"{source}: {key} holds {bad} non-finite value(s) (NaN or ±inf); refusing a poisoned adapter")


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    params = {}
    for name, layer in lora_layers(model).items():
        params.update(layer_tensors(name, layer))
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise LoRAError(f"{source}: {len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        raise LoRAError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    for key, p in params.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(p.shape):
            raise LoRAError(f"{source}: {key} has shape {tuple(t.shape)} but the model needs {tuple(p.shape)}")
        if not t.is_floating_point():
            raise LoRAError(f"{source}: {key} has dtype {t.dtype}, expected a float tensor")
        check_finite(t, key, source)
    for key, p in params.items():
        p.copy_(tensors[key])
