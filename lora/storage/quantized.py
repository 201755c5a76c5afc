"""4-bit bases read from disk, tensor by tensor, without bitsandbytes:

    checkpoint_quantization(config)   "nf4" for a bitsandbytes 4-bit NF4 checkpoint, None for a plain one;
                                      one-line errors for the storage types we do not read
    load_quantized(dir, dtype, quantize)   the causal LM with every Linear but the output head in NF4
    dequantized_layout(shards), read_nf4   a 4-bit checkpoint seen as the full-precision one (merge.py)

A full-precision checkpoint (`quantize="nf4"`) is quantized while it is read: the model is built on
the meta device, and each weight is read, cast to the load dtype and quantized before the next one is
read, so at most one full-precision weight is held at a time. A checkpoint transformers saved with
bitsandbytes in 4-bit NF4 is read as it is: `…weight` (the packed bytes), `…weight.absmax`,
`…weight.nested_absmax`, `…weight.nested_quant_map`, `…weight.quant_map` and
`…weight.quant_state.bitsandbytes__nf4` (a JSON of shape, dtype, blocksize, nested offset) become an
NF4Weight. transformers never sees the quantization config (its loader would import bitsandbytes).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..core.delta import Workspace
from ..core.inject import output_head_names
from ..errors import LoRAError
from ..quant.linear import NF4Linear
from ..quant.nf4 import NF4Weight, quantize_nf4
from .safetensors_stream import Entry, Shard, read_checkpoint, read_tensor

SUPPORTED = ("bitsandbytes 4-bit NF4 checkpoints (quant_method bitsandbytes, load_in_4bit, bnb_4bit_quant_type nf4), "
             "or full-precision ones quantized on load (--quantize nf4)")
QUANT_STATE = "quant_state.bitsandbytes__"
STATS = ("absmax", "nested_absmax", "nested_quant_map", "quant_map")      # …weight.<stat>


def checkpoint_quantization(config: dict, where: str = "config.json") -> str | None:
    """None for a full-precision checkpoint, "nf4" for a bitsandbytes 4-bit NF4 one; one line naming
    what is supported for any other quantization_config."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "bitsandbytes" and qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "fp4") == "nf4":
        return "nf4"
    kind = ("8-bit" if qc.get("load_in_8bit") else f"4-bit {qc.get('bnb_4bit_quant_type', 'fp4').upper()}") \
        if method == "bitsandbytes" else repr(method)
    raise LoRAError(f"{where}: quantization {kind} is not supported; supported: {SUPPORTED}")


def _plain_config(model_dir: Path, trust_remote_code: bool):
    """The model's config without its quantization_config, so transformers builds plain Linears."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _set(model: nn.Module, name: str, value) -> None:
    """model.<name> = value: a frozen Parameter, a buffer, or an NF4Weight submodule."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(value, NF4Weight):
        setattr(module, attr, value)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise LoRAError(f"checkpoint tensor {name} has no place in the model")


def quant_state(state: torch.Tensor, name: str) -> dict:
    """The JSON bitsandbytes packs into `…weight.quant_state.bitsandbytes__nf4` (shape, dtype, blocksize, …)."""
    try:
        qs = json.loads(bytes(state.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoRAError(f"{name}.{QUANT_STATE}nf4: not a bitsandbytes quant state") from None
    if qs.get("quant_type") != "nf4":
        raise LoRAError(f"{name}: quant_type {qs.get('quant_type')!r} is not supported; supported: {SUPPORTED}")
    return qs


def _bnb_weight(stats: dict[str, torch.Tensor], packed: torch.Tensor, state: torch.Tensor, name: str) -> NF4Weight:
    """An NF4Weight from a bitsandbytes checkpoint's tensors for `name` (…weight)."""
    qs = quant_state(state, name)
    dtype = getattr(torch, qs["dtype"])
    nested = "nested_absmax" in stats
    return NF4Weight(packed.reshape(-1).view(torch.uint8).reshape(-1, 1), stats["absmax"], stats["quant_map"],
                     qs["shape"], dtype, int(qs["blocksize"]),
                     nested_absmax=stats.get("nested_absmax"), nested_quant_map=stats.get("nested_quant_map"),
                     offset=qs.get("nested_offset") if nested else None,
                     nested_block_size=int(qs.get("nested_blocksize", 256)))


def load_quantized(model_dir: str | os.PathLike, dtype: torch.dtype | str = "auto", quantize: str | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The causal LM in `model_dir` on the CPU with its Linears (not the output head) in NF4: read as
    they are from a bitsandbytes 4-bit checkpoint, or quantized while read (`quantize="nf4"`).
    `dtype` ("auto": the checkpoint's) is the one of every other tensor and the dequantized weights'."""
    from transformers import AutoModelForCausalLM
    model_dir = Path(model_dir)
    config = _plain_config(model_dir, trust_remote_code)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    heads = output_head_names(model)
    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if type(m) is nn.Linear and n not in heads}
    shards, _ = read_checkpoint(model_dir)
    by_name = {e.name: (shard, e) for shard in shards for e in shard.entries}
    state_suffix = f".{QUANT_STATE}nf4"
    prequantized = {n[:-len(state_suffix)] for n in by_name if n.endswith(state_suffix)}
    if not prequantized and quantize != "nf4":
        raise LoRAError(f"{model_dir}: no 4-bit weights in the checkpoint and no --quantize nf4")
    fds, ws = {}, Workspace()
    try:
        def read(name, reuse=False):
            """The tensor `name`; `reuse`: into the one read buffer (consumed before the next read)."""
            shard, entry = by_name[name]
            if shard.path not in fds:
                fds[shard.path] = os.open(shard.path, os.O_RDONLY)
            buf = ws.get("read", (entry.nbytes,), torch.uint8) if reuse else None
            return read_tensor(fds[shard.path], entry, shard.path, buf)

        for name in by_name:
            if name in prequantized:
                stats = {s: read(f"{name}.{s}") for s in STATS if f"{name}.{s}" in by_name}
                value = _bnb_weight(stats, read(name), read(name + state_suffix), name)
            elif name.rpartition(".weight.")[0] + ".weight" in prequantized:
                continue                                             # read with its weight
            elif name in linears and quantize == "nf4":
                value = quantize_nf4(read(name, reuse=True).to(dtype))   # one full-precision weight at a time
            else:
                t = read(name)
                value = t.to(dtype) if t.is_floating_point() else t
            if name in linears and isinstance(value, NF4Weight):
                module = linears[name]
                owner = name[:-len(".weight")]
                if tuple(value.shape) != (module.out_features, module.in_features):
                    raise LoRAError(f"{name}: shape {tuple(value.shape)} does not fit the model's "
                                    f"{(module.out_features, module.in_features)}")
                quantized = NF4Linear(value, None)
                quantized.bias = module.bias
                model.set_submodule(owner, quantized)
                linears[name] = quantized
            else:
                _set(model, name, value)
    finally:
        for fd in fds.values():
            os.close(fd)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialize_missing(model, model_dir)
    return model


def _materialize_missing(model: nn.Module, model_dir: Path) -> None:
    """Non-persistent buffers (the rotary frequencies) computed on the CPU by transformers' own
    initializer; a one-line error for a parameter the checkpoint did not hold."""
    for name, p in model.named_parameters():
        if p.is_meta:
            raise LoRAError(f"{model_dir}: the checkpoint has no tensor {name}")
    for module in model.modules():
        metas = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if metas:
            for b in metas:
                module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
            model._init_weights(module)


# -- a bitsandbytes 4-bit checkpoint as the full-precision one it stands for (merge.py) -------------
def dequantized_layout(shards: list[Shard], dtype: str = "BF16") -> tuple[list[Shard], dict[str, dict[str, Entry]]]:
    """(shards as if each 4-bit weight were one `dtype` tensor of its original shape, its statistics
    gone; {weight name: its stored entries by role: "" the packed bytes, "absmax", …, "state"}).
    Both unchanged and empty for a full-precision checkpoint."""
    state_suffix = f".{QUANT_STATE}nf4"
    parts: dict[str, dict[str, Entry]] = {}
    for shard in shards:
        by_name = {e.name: e for e in shard.entries}
        for e in shard.entries:
            if e.name.endswith(state_suffix):
                name = e.name[:-len(state_suffix)]
                roles = {"": name, **{s: f"{name}.{s}" for s in STATS}, "state": e.name}
                if name not in by_name or f"{name}.absmax" not in by_name:
                    raise LoRAError(f"{shard.path}: 4-bit weight {name} and its statistics are not in one shard")
                parts[name] = {role: by_name[n] for role, n in roles.items() if n in by_name}
    if not parts:
        return shards, parts
    stats = {e.name for p in parts.values() for role, e in p.items() if role}
    out = []
    for shard in shards:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            entries = []
            for e in shard.entries:
                if e.name in parts:
                    qs = quant_state(read_tensor(fd, parts[e.name]["state"], shard.path), e.name)
                    e = Entry(e.name, dtype, tuple(qs["shape"]), e.begin, sum(p.nbytes for p in parts[e.name].values()))
                elif e.name in stats:
                    continue
                entries.append(e)
        finally:
            os.close(fd)
        out.append(Shard(shard.path, entries, shard.metadata))
    return out, parts


def read_nf4(fd: int, parts: dict[str, Entry], path) -> NF4Weight:
    """The NF4Weight of one 4-bit weight from its entries (dequantized_layout's parts) in the open shard."""
    stats = {role: read_tensor(fd, e, path) for role, e in parts.items() if role in STATS}
    return _bnb_weight(stats, read_tensor(fd, parts[""], path), read_tensor(fd, parts["state"], path), parts[""].name)
