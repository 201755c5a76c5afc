"""The embedding and the output head under --fsdp: sharded by vocabulary rows as FSDP2 shards its
units, but gathered whole into one buffer of their own when used, and freed right after.

FSDP2 all-gathers a unit's weights into one output and then copies them into the unit's parameters,
so a unit is held twice for a moment; for the vocabulary-sized embedding and head (V × hidden each,
the largest weights of a Llama) that moment sets a rank's peak. Gathered here they are held once.
The arithmetic is the one-process run's: the gathered weight is the checkpoint's, the lookup is
F.embedding's and the head's products are the ones nn.Linear's autograd runs, so a --fsdp run stays
the unsharded run bit for bit.

    RowShardedEmbedding   ids (B, T) → W[ids] (B, T, H)               W gathered for the lookup
    RowShardedHead        h (B, T, H) → h Wᵀ (B, T, V); dh = dlogits W  W gathered in forward and in backward

Rank r keeps rows [r·c, min((r + 1)·c, V)), c = ⌈V / N⌉: torch.chunk's split, as FSDP2's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed


def row_range(n_rows: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rank `rank`'s rows [first, end) of an n_rows tensor split over `world` ranks as torch.chunk
    splits it (FSDP2's split); this process's rank and world by default."""
    if rank is None or world is None:
        rank, world, _ = distributed.world()
    chunk = -(-n_rows // world)
    first = min(rank * chunk, n_rows)
    return first, min(first + chunk, n_rows)


def gather_rows(shard: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The whole (n_rows, ...) tensor from every rank's rows, broadcast by each rank straight into its
    slot of one buffer (no second copy)."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(), dist.get_rank()
    whole = torch.empty(n_rows, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    for r in range(world):
        first, end = row_range(n_rows, r, world)
        if end > first:
            slot = whole[first:end]                          # rows of a contiguous tensor: contiguous
            if r == rank:
                slot.copy_(shard)
            dist.broadcast(slot, src=r)
    return whole


def row_shard(n_rows: int, row_len: int, like: torch.Tensor) -> tuple[int, nn.Parameter]:
    """(first row, a frozen (rows, row_len) parameter of `like`'s dtype and device for this rank's rows)."""
    first, end = row_range(n_rows)
    return first, nn.Parameter(torch.empty(end - first, row_len, dtype=like.dtype, device=like.device),
                               requires_grad=False)


class RowShardedEmbedding(nn.Module):
    """nn.Embedding(V, H) whose frozen `weight` holds this rank's rows only."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.n_rows = self.num_embeddings
        self.first_row, self.weight = row_shard(self.n_rows, self.embedding_dim, embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        whole = gather_rows(self.weight, self.n_rows)               # (V, H), freed on return
        return F.embedding(ids, whole, self.padding_idx)


class RowShardedHead(nn.Module):
    """nn.Linear(H, V, bias=False) whose frozen `weight` holds this rank's rows only."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.n_rows = self.out_features
        self.first_row, self.weight = row_shard(self.n_rows, self.in_features, head.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return GatheredLinear.apply(h, self.weight, self.n_rows)


class GatheredLinear(torch.autograd.Function):
    """h Wᵀ with W (V, H) gathered from the row shards for the forward and again for dh = dlogits W."""

    @staticmethod
    def forward(ctx, h, shard, n_rows: int):
        whole = gather_rows(shard, n_rows)                          # (V, H)
        ctx.save_for_backward(shard)
        ctx.n_rows, ctx.h_dtype = n_rows, h.dtype
        return F.linear(h, whole)                                   # under autocast, cast as nn.Linear's

    @staticmethod
    def backward(ctx, dlogits):
        (shard,) = ctx.saved_tensors
        whole = gather_rows(shard, ctx.n_rows).to(dlogits.dtype)    # autocast's cast of W, again
        return dlogits.matmul(whole).to(ctx.h_dtype), None, None    # mm's backward: dlogits W
