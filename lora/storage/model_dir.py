"""A Hugging Face model directory, read the one way every script reads it.

    check_model_dir(dir)        config.json as a dict; one-line errors for what cannot be loaded
    skeleton(dir or config)     the model's modules on the meta device: names and shapes, no weights
    load_tokenizer(dir)         the directory's own tokenizer, nothing downloaded
    load_model(dir, dtype)      the causal LM from *.safetensors only, no remote code unless asked;
                                a 4-bit base (quantized.py) when the checkpoint is one or `quantize` asks

setup.py pins transformers to the range CI tests, so nothing here (or anywhere) asks which version
it runs on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LoRAError
from .quantized import checkpoint_quantization, load_quantized


def check_model_dir(model_dir: str | os.PathLike, flag: str = "--model", need_tokenizer: bool = True) -> dict:
    """config.json of a local model directory; one-line errors naming `flag` for what we cannot load."""
    p = Path(model_dir)
    if not p.is_dir():
        raise LoRAError(f"{flag} {model_dir}: no such directory (a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise LoRAError(f"{flag} {model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{p / 'config.json'}: expected a JSON object")
    if not any(p.glob("*.safetensors")):
        raise LoRAError(f"{flag} {model_dir}: no *.safetensors weights (pickle .bin files are not loaded)")
    if need_tokenizer and not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise LoRAError(f"{flag} {model_dir}: no tokenizer (tokenizer.json) in the model directory")
    checkpoint_quantization(config, f"{flag} {model_dir}")
    return config


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise LoRAError(f"{model_dir}: cannot load its tokenizer ({first_line(e)})") from None


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto",
               trust_remote_code: bool = False, quantize: str | None = None) -> nn.Module:
    """The causal LM in `model_dir` on the CPU, from safetensors only; `dtype` "auto" keeps the
    checkpoint's own. Nothing is downloaded, and no code from the directory runs unless asked.
    A bitsandbytes 4-bit checkpoint, or `quantize="nf4"`, gives a 4-bit base (lora/storage/quantized.py)."""
    from transformers import AutoModelForCausalLM
    if quantize is not None or checkpoint_quantization(check_model_dir(model_dir, need_tokenizer=False)):
        if quantize not in (None, "nf4"):
            raise LoRAError(f"--quantize {quantize}: not supported; supported: nf4")
        return load_quantized(model_dir, dtype, quantize, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                    local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoRAError(f"{model_dir}: cannot load the model ({first_line(e)})") from None


def skeleton(model_dir_or_config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM's module tree on the meta device (no memory, no weights read): enough to check
    an adapter's targets against the model before anything is loaded or written."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = model_dir_or_config
    if isinstance(config, (str, os.PathLike)):
        try:
            config = AutoConfig.from_pretrained(str(config), local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise LoRAError(f"{model_dir_or_config}: cannot read its config ({first_line(e)})") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config         # the module tree only: transformers must not quantize
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing, non-reentrant: it restores the RNG state before recomputing, so LoRA
    dropout draws the same masks twice."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
