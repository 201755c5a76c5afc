"""Projections that read the same input share one op (lora/core/op.py): q/k/v, and gate/up.

How it is triggered without touching the model code: Llama/Mistral/Qwen2 call q_proj(h), k_proj(h),
v_proj(h) (and gate_proj(x), up_proj(x)) one after the other on the same tensor. The first member
called computes every member's output, with one shrink, one dropout mask and one input-gradient
buffer, and keeps the others' until they are called with that same tensor (same object, same
version, same grad/autocast mode). Any other call pattern falls back to each member computing its own
output, so correctness never depends on the call order.
"""
from __future__ import annotations

import torch

from .op import lora_group_torch


class SharedInputGroup:
    """Members (LoRALinear) known to be called on the same input, in order. Not an nn.Module: it holds
    no parameters and never appears in state dicts."""

    def __init__(self, members):
        self.members = list(members)
        self._pending: dict[int, torch.Tensor] = {}
        self._pending_input: torch.Tensor | None = None
        self._pending_key: tuple | None = None

    def _key(self, x: torch.Tensor) -> tuple:
        dev = x.device.type
        return (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(dev),
                tuple((m.lora_A._version, m.lora_B._version, m.weight._version, m.training) for m in self.members))

    def active(self, x: torch.Tensor) -> bool:
        # Inference-mode tensors carry no version counter to tell an in-place change: no sharing.
        return not x.is_inference() and all(not (m.merged or m.disabled) for m in self.members)

    def forward(self, member, x: torch.Tensor, p: float, cast, recompute_input: bool = True) -> torch.Tensor:
        """`member`'s output for `x` with dropout `p`; `cast` maps (x, W, b, A, B) to the compute dtype;
        `recompute_input`: rebuild x in backward when autograd keeps its factors anyway."""
        i = self.members.index(member)
        if x is self._pending_input and i in self._pending and self._key(x) == self._pending_key:
            out = self._pending.pop(i)
            if not self._pending:
                self._pending_input = self._pending_key = None
            return out
        key = self._key(x)
        xs, Ws, bs, As, Bs = x, [], [], [], []
        for m in self.members:
            xs, W, b, A, B = cast(xs, m.weight, m.bias, m.lora_A, m.lora_B)   # x is cast once
            Ws.append(W); bs.append(b); As.append(A); Bs.append(B)
        outs = lora_group_torch(xs, Ws, bs, As, Bs, [m.scaling for m in self.members], p,
                                recompute_input=recompute_input)
        self._pending = {j: o for j, o in enumerate(outs) if j != i}
        self._pending_input, self._pending_key = x, key
        return outs[i]
