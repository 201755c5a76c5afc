"""The loss the loop trains on, and the eval loss: mean token NLL over the trained (unmasked) tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime.device import Device
from . import distributed
from .data import IGNORE, TokenizedData


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over trained tokens of −log p(label): logits (B, T, V) at t−1 predict labels (B, T) at t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def evaluate(model, data: TokenizedData, batch_size: int, device: Device, dtype: torch.dtype) -> float:
    """Mean token NLL over `data`, its batches sharded over the processes. Batches keep one shape:
    the last is filled with masked rows, and every rank runs as many (a rank short of one runs a fully
    masked batch: under --fsdp each forward is a collective all ranks take part in)."""
    rank, world, _ = distributed.world()
    was_training = model.training
    model.eval()
    n = len(data)
    total = torch.zeros(2, dtype=torch.float64, device=device.torch_device)   # (nll sum, tokens)
    for b in range(rank, math.ceil(n / batch_size / world) * world, world):
        idx = torch.arange(min(b * batch_size, n), min((b + 1) * batch_size, n))
        real = idx.numel()
        idx = torch.cat([idx, idx.new_zeros(batch_size - real)])
        batch = data.batch(idx, device.torch_device)
        batch["labels"][real:] = IGNORE
        with device.autocast(dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            nll = token_nll_sum(logits, batch["labels"])
        device.mark_step()
        total += torch.stack([nll.double(), (batch["labels"][:, 1:] != IGNORE).sum().double()])
    distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()
