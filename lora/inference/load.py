"""A saved model made ready to generate: tokenizer, model, adapter (folded in on request), device.

    resolve_inference_device(name, …)          -> (device, bucket)   static-shape devices always bucket
    load_for_generation(dir, adapter, merge)   -> (model, tokenizer) in eval mode on the device

The directory is read as every script reads one (lora/storage/model_dir.py: safetensors only, nothing
downloaded, no remote code unless asked).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.inject import merge_lora
from ..errors import LoRAError
from ..runtime.device import Device, resolve_device
from ..serving.load import load_adapters
from ..storage.adapter import load_adapter
from ..storage.model_dir import check_model_dir, load_model, load_tokenizer

STATIC_BUCKET = 32       # --bucket on static-shape devices when none is given


def resolve_inference_device(name: str, hpu_mode: str = "lazy", hpu_graphs: bool | None = None,
                             bucket: int = 0, bucket_given: bool = False) -> tuple[Device, int]:
    """The device and the static-shape bucket to generate with. Graph-compiling devices (HPU) compile
    one graph per new shape, so there the prompt and cache are always padded to buckets."""
    device = resolve_device(name, hpu_mode=hpu_mode, hpu_graphs=hpu_graphs)
    if device.static_shapes():
        if bucket == 0 and bucket_given:
            raise LoRAError(f"--bucket 0 (dynamic shapes) is not possible on {device.name}: every new shape "
                            "is a graph compile")
        bucket = bucket or STATIC_BUCKET
    return device, bucket


def load_for_generation(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
                        merge: bool = False, device: str | Device = "cpu", dtype: str = "auto",
                        trust_remote_code: bool = False, quantize: str | None = None,
                        adapters: dict | None = None):
    """The causal LM and tokenizer saved in `model_dir`, with the adapter applied (and folded in
    when `merge`), frozen, in eval mode on `device` ("auto", "cpu", "cuda", "hpu": lora.runtime.device).
    dtype "auto" keeps the checkpoint's own dtype; a name of lora.runtime.device.DTYPES (fp32, bf16,
    fp16) converts the base (the adapter stays fp32). `quantize="nf4"`, or a bitsandbytes 4-bit
    checkpoint, gives a 4-bit base (lora/storage/quantized.py), which cannot be merged into.
    `adapters` {name: dir} instead of `adapter_dir`: several adapters stacked for mixed batches
    (lora/serving/), every one checked against the base before the model is changed."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoRAError(f"{model_dir}: no such model directory")
    check_model_dir(model_dir)
    if merge and adapter_dir is None:
        raise LoRAError("--merge needs an adapter (--adapter DIR)")
    if adapters and (adapter_dir is not None or merge):
        raise LoRAError("named adapters (--adapter NAME=DIR) are served unmerged, without an unnamed --adapter")
    device = device if isinstance(device, Device) else resolve_device(device)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_model(model_dir, "auto" if dtype == "auto" else device.resolve_dtype(dtype), trust_remote_code,
                       quantize)
    if adapters:
        load_adapters(model, adapters)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        if merge:
            merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return device.prepare_inference(model.to(device.torch_device).eval()), tokenizer
