"""The plan of a run in optimizer steps: how many, the learning rate at each, the examples each sees.

    G = batch_size · grad_accum · world_size examples per step, taken in a per-epoch order that
    depends only on (seed, epoch) (lora/training/data.py's epoch_order), so a resumed run replays the
    same batches. Warmup is linear, then the learning rate follows a cosine curve to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LoRAError
from .config import TrainConfig
from .data import epoch_order

WARMUP_SHARE = 0.05           # warmup when --warmup-steps is not given: 5% of the steps


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to 0.

    step < warmup: (step + 1) / warmup   (the first step already moves; the peak is reached at warmup-1)
    otherwise:     ½ (1 + cos(π · (step − warmup) / (total − warmup)))
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


@dataclass
class Plan:
    """Steps of a run over `n_examples` examples, and the rows each step and rank trains on."""

    n_examples: int
    seed: int
    batch_size: int           # per process, per micro-batch
    grad_accum: int
    world: int
    total: int                # optimizer steps
    warmup: int
    _order: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, cfg: TrainConfig, n_examples: int, world: int) -> "Plan":
        """The plan `cfg` asks for; a one-line error when the data cannot fill one step."""
        global_batch = cfg.batch_size * cfg.grad_accum * world
        steps_per_epoch = n_examples // global_batch
        if steps_per_epoch == 0:
            raise LoRAError(f"{cfg.data}: {n_examples} examples, but one step needs {global_batch} "
                            f"(--batch-size × --grad-accum × processes)")
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(WARMUP_SHARE * total)
        return cls(n_examples, cfg.seed, cfg.batch_size, cfg.grad_accum, world, total, warmup)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, steps of that epoch done) after optimizer step `step` (1-based)."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        return epoch, k + 1

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """The rows of the examples rank `rank` trains on in step `step` (1-based), one tensor of
        batch_size rows per micro-batch."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, epoch_order(self.n_examples, self.seed, epoch)
        order = self._order[1]
        # (grad_accum, world, batch_size): micro-batch a of rank r is idx[a, r]
        idx = order[k * self.global_batch:(k + 1) * self.global_batch].view(self.grad_accum, self.world,
                                                                            self.batch_size)
        return [idx[a, rank] for a in range(self.grad_accum)]

