"""Data parallel without a DDP wrapper: torchrun's environment and the few collectives the loop makes.

Only the LoRA parameters have grads, so one flat all-reduce per step sums them; each rank's RNG state
is gathered for the checkpoint. Outside torchrun (or with one process) every call here is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..runtime.device import Device


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group(device: Device) -> Iterator[None]:
    """The process group (gloo on CPU, nccl on CUDA, hccl on HPU) under torchrun, for the block's
    length: joined on entry unless the caller holds it already, and then left on exit, errors included.
    Leaving it joins the backend's threads while the interpreter is whole; gloo's, left to exit,
    may abort the process after its last step."""
    joined = world()[1] > 1 and not active()
    if joined:
        device.init_process_group()
    try:
        yield
    finally:
        if joined and active():
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes, in place; returns it."""
    if active():
        dist.all_reduce(t)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the LoRA grads over processes in one flat buffer (the frozen base has no grads)."""
    if not active():
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values on every rank (the adapter's initial weights)."""
    if active():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_rng_states(device: Device) -> list[dict]:
    """Every rank's RNG states, indexed by rank (what a checkpoint keeps)."""
    if not active():
        return [device.rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, device.rng_state())
    return states


def agreed_signal(signum: int | None, device: Device) -> int | None:
    """The signal any rank has received since the last step (the largest number), or None: every rank
    gets the same answer at the same step, so all stop together."""
    if not active():
        return signum
    t = torch.tensor([signum or 0], dtype=torch.int64, device=device.torch_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None
