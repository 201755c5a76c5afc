"""--fsdp: the frozen base sharded over the processes with PyTorch's FSDP2 (`fully_shard`), the adapter
replicated.

    sharded(cfg)                            --fsdp with more than one process
    check_fsdp(cfg, device)                 one-line errors for what --fsdp does not support
    load_sharded_base_with_lora(cfg, ...)   the model with its adapter: built on the meta device, its
                                            units `fully_shard`-ed (shard_units), each rank reading from
                                            the safetensors files only the rows (or NF4 blocks) it keeps
    shard_units(model, mesh, ignored, dev)  the units: each decoder layer's attention, MLP and norms, the
                                            root; an untied embedding and head are row-sharded outside
                                            FSDP2 and gathered once when used (lora/training/gathered.py)

What is sharded: every base parameter, on dim 0 over a 1-D mesh of all the processes (a rank keeps
rows [rank·⌈n/N⌉, (rank+1)·⌈n/N⌉) of an n-row tensor, torch.chunk's split). A 4-bit base's Linears are
ShardedNF4Weights (lora/quant/sharded.py): packed bytes (n_blocks, 32) and float32 scales (n_blocks,),
one row per quantization block, so a rank keeps whole blocks. Each unit's weights are all-gathered for
its forward and again for its backward, and freed after each: a rank holds its shard plus one unit
whole (twice during FSDP2's copy-out; the embedding and head, gathered by lora/training/gathered.py,
once); docs/fsdp.md has what that costs, measured.

What stays replicated: the adapter (`ignored_params`). It is ~0.1–1% of the base, so sharding it saves
little memory and would make it DTensors; replicated, the loop is the data-parallel one unchanged: one
flat all-reduce of the LoRA grads (lora/training/distributed.py), the fused AdamW and clip-norm on plain
tensors, and rank 0 writes the adapter and checkpoints from its own copy, nothing gathered.

The arithmetic is the data-parallel run's: the all-gathered weights are the checkpoint's values (a
4-bit weight's bytes and the scales its unsharded NF4Weight dequantizes with), so a --fsdp run
computes what the same run without it computes (docs/fsdp.md).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..core.inject import apply_lora, lora_layers, output_head_names
from ..errors import LoRAError
from ..quant.linear import NF4Linear
from ..quant.nf4 import quantize_nf4
from ..quant.sharded import ShardedNF4Weight, double_quantized_scales
from ..runtime.device import Device
from ..runtime.malloc import return_freed_memory
from ..storage.model_dir import skeleton
from ..storage.quantized import QUANT_STATE, quant_state
from ..storage.safetensors_stream import read_checkpoint
from ..storage.sharded_load import read_elements, read_nf4_blocks, read_rows
from . import distributed
from .config import TrainConfig
from .gathered import RowShardedEmbedding, RowShardedHead, row_range


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
    units it computes). A 4-bit base (--quantize nf4, or a bitsandbytes 4-bit checkpoint) has its
    Linears (not the head) as ShardedNF4Weights, each rank quantizing or reading only its blocks.
    Prints each rank's share of the base and the bytes it read."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, _ = distributed.world()
    if device.name == "cpu":
        return_freed_memory()
    model = skeleton(cfg.model).to(dtype)                  # meta: names and shapes only
    nf4 = nf4_plan(cfg, model)
    for name, state in nf4.items():
        linear = model.get_submodule(name)
        block_size, weight_dtype = (int(state["blocksize"]), getattr(torch, state["dtype"])) if state else (64, dtype)
        weight = ShardedNF4Weight(linear.weight.shape, weight_dtype, block_size, device="meta")   # as load_quantized
        model.set_submodule(name, NF4Linear(weight, linear.bias))
    apply_lora(model, cfg.lora)
    if not model.config.tie_word_embeddings:             # a tied pair is one parameter: it stays in the root's
        emb, head = model.model.embed_tokens, model.lm_head
        if type(emb) is nn.Embedding and emb.max_norm is None:
            model.model.embed_tokens = RowShardedEmbedding(emb)
        if type(head) is nn.Linear and head.bias is None:
            model.lm_head = RowShardedHead(head)
    row_sharded = [m for m in model.modules() if isinstance(m, (RowShardedEmbedding, RowShardedHead))]
    adapter = {p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    # The CPU mesh is named explicitly: gloo on a machine with GPUs would otherwise move the model there.
    mesh = init_device_mesh(device.name, (world,))
    shard_units(model, mesh, adapter | {m.weight for m in row_sharded}, device)
    model.to_empty(device=device.torch_device)
    rebuild_rotary(model, device)
    gathered = {id(m.weight): m for m in row_sharded}    # by parameter (to_empty made new ones)

    quantized = {m: name for name, m in model.named_modules() if isinstance(m, ShardedNF4Weight)}
    base = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    local = lambda p: p if id(p) in gathered else p.to_local()
    first = lambda p: gathered[id(p)].first_row if id(p) in gathered else row_range(p.shape[0])[0]
    dense = {name: (first(p), local(p)) for name, p in base.items()
             if name.rpartition(".")[0] not in quantized.values()}
    with torch.no_grad():
        read = read_rows(cfg.model, dense)
        for weight, name in quantized.items():
            weight.reset_quant_map()
            read += load_nf4_blocks(cfg, name, weight, first(weight.packed), nf4[name.rpartition(".")[0]], device)
    held = sum(local(p).nbytes for p in base.values())
    total = sum((gathered[id(p)].n_rows * math.prod(p.shape[1:]) if id(p) in gathered else p.numel())
                * p.element_size() for p in base.values())
    packed = [(w.packed.to_local().nbytes, w.packed.numel()) for w in quantized]
    nf4_note = (f", NF4 packed {sum(h for h, _ in packed):,d} of {sum(t for _, t in packed):,d} bytes"
                if packed else "")
    print(f"fsdp: rank {rank} of {world} holds {held:,d} of the base's {total:,d} bytes "
          f"(read {read:,d} bytes of its safetensors files{nf4_note})", file=sys.stderr)

    device.manual_seed(cfg.seed)                        # the adapter drawn as apply_lora draws it on a real base
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters(cfg.lora.init_lora_weights)
    return model


def shard_units(model: nn.Module, mesh, ignored: set, device: Device) -> None:
    """`fully_shard` bottom-up: in each decoder layer the attention and the MLP a unit each (the
    grouped LoRA ops, q/k/v and gate/up, stay inside one unit; lora/core/group.py), the layer (its two
    norms) one, an untied embedding and head one each unless lora/training/gathered.py row-shards them
    (then they are in `ignored`, with the replicated adapter: held once when whole, not twice as
    FSDP2's copy-out holds a unit), then the root (the final norm, or a tied embedding and head). On
    the CPU a rank holds one unit whole at a time: FSDP2's backward prefetch (the next unit gathered
    while this one computes) is off, and the all-gather writes into FSDP2's output in place
    (InPlaceAllGather), which is freed right after its copy-out (docs/fsdp.md has what each of these
    saves, measured). On CUDA FSDP2's defaults stay: they overlap the gathers with compute."""
    from torch.distributed.fsdp import fully_shard
    shard = lambda unit, **kw: fully_shard(unit, mesh=mesh, ignored_params=ignored, **kw)
    units = []
    for layer in model.model.layers:
        units += [shard(m) for m in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)) if m is not None]
        units.append(shard(layer))
    if not model.config.tie_word_embeddings:             # a tied pair is one parameter: it stays in the root's
        units += [shard(m) for m in (model.model.embed_tokens, model.lm_head)
                  if not isinstance(m, (RowShardedEmbedding, RowShardedHead))]
    # The root too is resharded after its forward (FSDP2 keeps a root's weights whole by default).
    units.append(shard(model, reshard_after_forward=True))
    if device.name == "cpu":                   # gloo on the cores that compute: nothing to overlap
        for unit in units:
            unit.set_modules_to_backward_prefetch([])
            unit.set_custom_all_gather(InPlaceAllGather())


class InPlaceAllGather:
    """FSDP2's all-gather (its AllGather protocol: allocate, then gather into `output_tensor`, whose
    slot `rank` already holds this rank's part) for gloo, without a buffer of gloo's: its CPU
    collectives receive into a flat tensor of their own and copy out, one more whole unit per gather
    (docs/fsdp.md, measured). Here each rank's slot is broadcast from it, in place. The last
    broadcast's Work is returned so FSDP2 treats the gather as asynchronous: it then frees the output
    right after the copy-out instead of keeping it until the next unit's (a stream overlap that a CPU
    does not have)."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        import torch.distributed as dist
        world = group.size()
        slots = output_tensor.view(world, -1)                                  # (world, shard numel)
        for r in range(world - 1):
            dist.broadcast(slots[r], src=dist.get_global_rank(group, r), group=group)
        return dist.broadcast(slots[world - 1], src=dist.get_global_rank(group, world - 1), group=group,
                              async_op=True)


def nf4_plan(cfg: TrainConfig, model: nn.Module) -> dict[str, dict | None]:
    """{Linear's name: its bitsandbytes quant state (read as it is), or None (quantized while read,
    --quantize nf4)} for the Linears that are 4-bit in the run: what load_quantized makes 4-bit (every
    Linear but the output head). Empty for a full-precision base without --quantize."""
    shards, _ = read_checkpoint(Path(cfg.model))
    entries = {e.name: e for s in shards for e in s.entries}
    suffix = f".{QUANT_STATE}nf4"
    if not cfg.quantize and not any(n.endswith(suffix) for n in entries):
        return {}
    heads = output_head_names(model)
    plan = {}
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name in heads:
            continue
        weight = f"{name}.weight"
        if weight + suffix not in entries:
            plan[name] = None if cfg.quantize else _dense
            continue
        raw = torch.empty(entries[weight + suffix].nbytes, dtype=torch.uint8)
        read_elements(cfg.model, {weight + suffix: (0, raw)})
        state = quant_state(raw, weight)
        if tuple(state["shape"]) != tuple(m.weight.shape) or entries[weight].dtype != "U8":
            raise LoRAError(f"{cfg.model}: {weight} is stored as {entries[weight].dtype} of shape "
                            f"{state['shape']}; --fsdp reads uint8 packed weights of the model's "
                            f"{list(m.weight.shape)}")
        plan[name] = state
    return {name: state for name, state in plan.items() if state is not _dense}


_dense = object()        # nf4_plan: a Linear a bitsandbytes checkpoint keeps in full precision


def load_nf4_blocks(cfg: TrainConfig, name: str, weight: ShardedNF4Weight, first: int, state: dict | None,
                    device: Device) -> int:
    """This rank's blocks [first, first + len) of the 4-bit weight `name` into its shard: read as they
    are from a bitsandbytes checkpoint (`state`), or its elements read, cast to the run's dtype and
    quantized as load_quantized does, the double quantization's scales from every rank's absmax (one
    all-gather: its offset is their mean). Returns the bytes read."""
    packed, scales = weight.packed.to_local(), weight.absmax.to_local()          # (blocks, bs/2), (blocks,)
    if state is not None:
        cpu_packed, cpu_scales = torch.empty_like(packed, device="cpu"), torch.empty_like(scales, device="cpu")
        read = read_nf4_blocks(cfg.model, name, first, cpu_packed, cpu_scales, state)
    else:
        x = torch.empty(scales.shape[0] * weight.block_size, dtype=weight.dtype)
        read = read_elements(cfg.model, {name: (first * weight.block_size, x)})
        q = quantize_nf4(x, weight.block_size, double_quant=False)               # whole blocks: the tensor's bytes
        cpu_packed = q.packed.view(packed.shape)
        n_blocks = weight.packed.shape[0]
        cpu_scales = double_quantized_scales(gather_blocks(q.absmax, n_blocks, device))[first:first + len(scales)]
    packed.copy_(cpu_packed)
    scales.copy_(cpu_scales)
    return read


def gather_blocks(part: torch.Tensor, n: int, device: Device) -> torch.Tensor:
    """The whole (n,) tensor from each rank's torch.chunk part of it (on the CPU)."""
    import torch.distributed as dist
    world = distributed.world()[1]
    chunk = -(-n // world)
    mine = torch.zeros(chunk, dtype=part.dtype, device=device.torch_device)
    mine[:part.numel()] = part
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)[:n].cpu()


def rebuild_rotary(model: nn.Module, device: Device) -> None:
    """The rotary embedding's inv_freq is a buffer computed from the config, not a checkpoint tensor:
    to_empty left it uninitialised, so it is built again on the device."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device.torch_device)
