"""Projections that read the same input share one shrink: q/k/v, and gate/up.

For members i = 1..n with the same input x:

    S   = dropout(x) [A_1; …; A_n]ᵀ                         (M, Σr)   one GEMM reads x once
    y_i = b_i + s_i · S[:, i] B_iᵀ + x W_iᵀ                  (M, out_i)  small term first, base GEMM accumulates
    dX  = (dS [A_1; …; A_n]) ⊙ mask + Σ_i dY_i W_i           one buffer, every base GEMM accumulated in place
    dA  = dSᵀ dropout(x)  (Σr, in), split per member;  dB_i = s_i · dY_iᵀ S[:, i]

Compared with one op per projection this reads x once instead of n times (forward shrink and dA),
draws one dropout mask instead of n, and sums the input gradient of all members in one buffer
with BLAS's beta=1 instead of n buffers added by autograd. The members share the dropout mask (PEFT
draws one per projection; each branch still sees dropout(p)).

How it is triggered without touching the model code: Llama/Mistral/Qwen2 call q_proj(h), k_proj(h),
v_proj(h) (and gate_proj(x), up_proj(x)) one after the other on the same tensor. The first member
called computes every member's output and keeps the others' until they are called with that same
tensor (same object, same version, same grad/autocast mode). Any other call pattern falls back to
each member computing its own output, so correctness never depends on the call order.
"""
from __future__ import annotations

import torch

from ..runtime.seed import new_seed
from .functional import compact, drop_, expand, input_recipe, recomputed_input, shrink


class GroupedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropout_p: float, seed: int, scalings: tuple, recipe, *params):
        n = len(scalings)
        Ws, bs, As, Bs = params[0:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:4 * n]
        in_features = x.shape[-1]
        ranks = [A.shape[0] for A in As]
        A_cat = torch.cat(As)                                            # (Σr, in)
        x2 = x.reshape(-1, in_features)                                  # (M, in)
        S, dropped, xd = shrink(x2, A_cat, dropout_p, seed)              # (M, Σr); one mask for all members
        outs, off = [], 0
        for W, b, B, s, r in zip(Ws, bs, Bs, scalings, ranks):
            S_i = S[:, off:off + r].mul_(s)                              # s_i · S_i, kept for dB_i
            y = expand(S_i, B, b)                                        # b_i + s_i · S_i B_iᵀ  (M, out_i)
            y.addmm_(x2, W.t())                                          # y += x W_iᵀ: the base GEMM accumulates
            outs.append(y.view(*x.shape[:-1], W.shape[0]))
            off += r
        ctx.save_for_backward(None if recipe else xd, S, A_cat, None if dropped is None else compact(dropped, x2.numel()),
                              *Ws, *Bs)
        ctx.n, ctx.ranks, ctx.scalings, ctx.dropout_p = n, ranks, scalings, dropout_p
        ctx.x_shape, ctx.x_dtype, ctx.recipe = x.shape, x.dtype, recipe       # recipe: x rebuilt in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        n, ranks, scalings, p = ctx.n, ctx.ranks, ctx.scalings, ctx.dropout_p
        xd, S, A_cat, dropped, *rest = ctx.saved_tensors
        Ws, Bs = rest[:n], rest[n:]
        dY2 = [dY.reshape(-1, W.shape[0]) for dY, W in zip(dYs, Ws)]     # (M, out_i)
        dS = torch.cat([torch.mm(d, B).mul_(s) for d, B, s in zip(dY2, Bs, scalings)], dim=1)   # (M, Σr)
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_A = any(needs[5 + 2 * n: 5 + 3 * n])
        need_B = needs[5 + 3 * n: 5 + 4 * n]
        dBs, off = [], 0
        for d, r, need in zip(dY2, ranks, need_B):
            dBs.append(torch.mm(d.t(), S[:, off:off + r]) if need else None)   # (out_i, r_i): S_i saved as s_i · S_i
            off += r
        if dropped is not None:
            dropped = dropped.long()
            dS.mul_(1 / (1 - p))                                         # the kept elements' scale, on the small side
        dAs = [None] * n
        if need_A:
            if ctx.recipe:                                               # x multiplied again, dropped again
                xd = recomputed_input(ctx.recipe, ctx.x_shape, ctx.x_dtype, dropped)
            dAs = list(torch.mm(dS.t(), xd).split(ranks))                 # (r_i, in)
        dX = None
        if need_x:
            dX = torch.mm(dS, A_cat)                                     # dS A  (M, in)
            if dropped is not None:
                drop_(dX, dropped)                                       # (dS A) ⊙ mask
            for d, W in zip(dY2, Ws):
                dX.addmm_(d, W)                                          # += Σ_i dY_i W_i in the same buffer
            dX = dX.view(ctx.x_shape)
        return (dX, None, None, None, None, *([None] * (2 * n)), *dAs, *dBs)


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
        seed = new_seed() if p > 0 else 0
        recipe = input_recipe(xs, any(A.requires_grad for A in As), recompute_input)
        outs = GroupedLoRAFunction.apply(xs, p, seed, tuple(float(m.scaling) for m in self.members), recipe,
                                         *Ws, *bs, *As, *Bs)
        self._pending = {j: o for j, o in enumerate(outs) if j != i}
        self._pending_input, self._pending_key = x, key
        return outs[i]
