"""--fsdp: the frozen base sharded over the processes with PyTorch's FSDP2 (`fully_shard`), the adapter
replicated.

    sharded(cfg)                            --fsdp with more than one process
    check_fsdp(cfg, device)                 one-line errors for what --fsdp does not support
    load_sharded_base_with_lora(cfg, ...)   the model with its adapter: built on the meta device, each
                                            decoder layer (and an untied embedding and head) then the
                                            root `fully_shard`-ed, each rank reading from the
                                            safetensors files only the rows it keeps

What is sharded: every base parameter, on dim 0 over a 1-D mesh of all the processes (a rank keeps
rows [rank·⌈n/N⌉, (rank+1)·⌈n/N⌉) of an n-row tensor, torch.chunk's split). Each unit's weights (a
decoder layer, an untied embedding, the head, the final norm) are all-gathered for its forward and
again for its backward, and freed after each: a rank holds its shard plus a few units whole
(docs/fsdp.md has what that costs, measured).

What stays replicated: the adapter (`ignored_params`). It is ~0.1–1% of the base, so sharding it saves
little memory and would make it DTensors; replicated, the loop is the data-parallel one unchanged: one
flat all-reduce of the LoRA grads (lora/training/distributed.py), the fused AdamW and clip-norm on plain
tensors, and rank 0 writes the adapter and checkpoints from its own copy, nothing gathered.

The arithmetic is the data-parallel run's: the all-gathered weights are the checkpoint's values, so a
--fsdp run computes what the same run without it computes (docs/fsdp.md).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ..core.inject import apply_lora, lora_layers
from ..errors import LoRAError
from ..runtime.device import Device
from ..storage.model_dir import skeleton
from ..storage.sharded_load import read_rows
from . import distributed
from .config import TrainConfig


def sharded(cfg: TrainConfig) -> bool:
    """Whether the run shards its base: --fsdp with more than one process (one process's one shard is
    the whole base, loaded as without --fsdp)."""
    return cfg.fsdp and distributed.world()[1] > 1


def check_fsdp(cfg: TrainConfig, device: Device) -> None:
    """One-line errors for --fsdp on a device it does not support, before any work (a 4-bit base is
    refused by TrainConfig.validate)."""
    if not cfg.fsdp:
        return
    if device.name == "hpu":
        raise LoRAError("--fsdp is not supported on HPU; use torchrun without --fsdp (data parallel)")


def load_sharded_base_with_lora(cfg: TrainConfig, device: Device, dtype: torch.dtype) -> nn.Module:
    """The model with its adapter as loop.load_base_with_lora builds it, the base sharded over the
    processes: no rank ever holds the whole base (at load time its shard, in a step its shard and the
    units it computes). Prints each rank's share of the base and the bytes it read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world, _ = distributed.world()
    model = skeleton(cfg.model).to(dtype)                  # meta: names and shapes only
    apply_lora(model, cfg.lora)
    adapter = {p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    # The CPU mesh is named explicitly: gloo on a machine with GPUs would otherwise move the model there.
    mesh = init_device_mesh(device.name, (world,))
    # Units: each decoder layer whole. Smaller ones (a projection) would leave q/k/v, which one op
    # computes together (lora/core/group.py), whole one at a time: it falls back to one op each.
    units = list(model.model.layers)
    if not model.config.tie_word_embeddings:             # a tied pair is one parameter: it stays in the root's
        units += [model.model.embed_tokens, model.lm_head]
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=adapter)
    # The root too is resharded after its forward (FSDP2 keeps a root's weights whole by default).
    fully_shard(model, mesh=mesh, ignored_params=adapter, reshard_after_forward=True)
    model.to_empty(device=device.torch_device)
    rebuild_rotary(model, device)

    base = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    wanted = {name: (min(rank * -(-p.shape[0] // world), p.shape[0]), p.to_local()) for name, p in base.items()}
    with torch.no_grad():
        read = read_rows(cfg.model, wanted)
    held = sum(local.nbytes for _, local in wanted.values())
    total = sum(p.numel() * p.element_size() for p in base.values())
    print(f"fsdp: rank {rank} of {world} holds {held:,d} of the base's {total:,d} bytes "
          f"(read {read:,d} bytes of its safetensors files)", file=sys.stderr)

    device.manual_seed(cfg.seed)                        # the adapter drawn as apply_lora draws it on a real base
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters(cfg.lora.init_lora_weights)
    return model


def rebuild_rotary(model: nn.Module, device: Device) -> None:
    """The rotary embedding's inv_freq is a buffer computed from the config, not a checkpoint tensor:
    to_empty left it uninitialised, so it is built again on the device."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device.torch_device)
