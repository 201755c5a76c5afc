"""The plain multi-adapter LoRA term, added into the base output in place.

    y[i] += s_k · (x[i] A_kᵀ) B_kᵀ        for every row i whose adapter is k
        x: (M, in)   y: (M, out)   A_k: (r_k, in)   B_k: (out, r_k)   s_k: adapter k's scaling here

Grouped (CPU, CUDA without Triton): rows are grouped by adapter once per forward (lora/serving/rows.py);
each group costs one shrink and one expand on its own rows, `index_add_` puts them back. A group
that holds every row, or one contiguous run of rows (a row of a decode batch, a prompt at prefill),
reads x and writes y through views instead, with `addmm_` as the single-adapter path does. A row with
no adapter, or whose adapter does not target this module, is never written: it keeps the base's
output bit for bit.

Batched (CPU, CUDA without Triton, when a batch holds several adapters): one shrink and one expand
for all of them, as two batched GEMMs over the stacks,

    S = X_g A_gᵀ · s_g    (G, R, r)        X_g: (G, R, in), adapter g's rows padded to R (lora/serving/rows.py)
    y[rows] += S B_gᵀ     (G, R, out)      padding slots dropped

the stacks read as views when the batch's adapters are a run of them. A batch of one row per adapter
costs four calls per module instead of two per adapter; the products are the grouped form's but
with the ranks padded to the largest among the batch's adapters (zeros, which add nothing).

DoRA adapters (lora/core/dora.py): their rows then become b + g_k ⊙ (y − b), g_k = m_k / ‖W + s_k·B_k A_k‖_row
(out,) fixed at load, which is DoRA's g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b on whichever path computed y.

Masked (graph capture, HPU: shapes must not depend on the data): every adapter's shrink and expand
run over all M rows, S multiplied by a 0/1 row mask first. The index is data, not shape: one graph
serves every mix of adapters, at n times the (small) adapter FLOPs.
"""
from __future__ import annotations

import torch


def grouped_lora_(y: torch.Tensor, x: torch.Tensor, adapters, groups) -> None:
    """y (M, out) += each group's LoRA term. `adapters[k]`: (A_k, B_kᵀ, s_k) or None (module not
    targeted by k); `groups`: (k, rows) pairs, rows None for all, a slice, or a LongTensor of indices."""
    for k, rows in groups:
        ad = adapters[k]
        if ad is None:
            continue
        A, Bt, s = ad
        if rows is None:
            y.addmm_(torch.mm(x, A.t()), Bt, alpha=s)                          # every row: y += s · (x Aᵀ) Bᵀ
        elif isinstance(rows, slice):                                           # one run of rows: views
            y[rows].addmm_(torch.mm(x[rows], A.t()), Bt, alpha=s)
        else:
            S = torch.mm(x.index_select(0, rows), A.t())                        # (M_k, r_k) shrink
            y.index_add_(0, rows, torch.mm(S, Bt), alpha=s)                     # (M_k, out) expand, added back


def masked_lora_(y: torch.Tensor, x: torch.Tensor, adapters, masks) -> None:
    """y (M, out) += Σ_k s_k · ((x A_kᵀ) ⊙ mask_k) B_kᵀ; `masks[k]`: (M, 1) 0/1 in x's dtype."""
    for ad, mask in zip(adapters, masks):
        if ad is None:
            continue
        A, Bt, s = ad
        y.addmm_(torch.mm(x, A.t()).mul_(mask), Bt, alpha=s)


def batched_lora_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, s: torch.Tensor,
                  plan) -> None:
    """y (M, out) += every row's LoRA term, the batch's G adapters in one batched shrink and expand.
    A: (G, r, in), Bt: (G, r, out), s: (G, 1, 1), in x's dtype, r the largest rank among them;
    plan: lora.serving.rows.Batched (which rows, padded to R per adapter)."""
    X = (x if plan.gather is None else x.index_select(0, plan.gather)).view(plan.G, plan.R, -1)
    S = torch.bmm(X, A.transpose(1, 2)).mul_(s)                                # (G, R, r) shrink, scaled
    if plan.rows is None:                                                      # every slot is row i: y in place
        y.view(plan.G, plan.R, -1).baddbmm_(S, Bt)
        return
    Y = torch.bmm(S, Bt).view(plan.G * plan.R, -1)                             # (G·R, out) expand
    y.index_add_(0, plan.rows, Y if plan.slots is None else Y.index_select(0, plan.slots))


def dora_rows_(y: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor, groups, dora) -> None:
    """y[i] ← b + g_k ⊙ (y[i] − b) for the rows of each DoRA adapter k (`dora[k]`): y (M, out) holds
    x Wᵀ + b + s·x Aᵀ Bᵀ, g (n, out) the row scales; `groups` as grouped_lora_'s."""
    for k, rows in groups:
        if not dora[k]:
            continue
        if rows is None or isinstance(rows, slice):
            part = y if rows is None else y[rows]                              # a view: changed in place
            _rescale_(part, bias, g[k])
        else:
            y.index_copy_(0, rows, _rescale_(y.index_select(0, rows), bias, g[k]))


def _rescale_(z: torch.Tensor, bias, g: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return z.mul_(g)
    return z.sub_(bias).mul_(g).add_(bias)


def dora_masked_(y: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor, masks, dora) -> None:
    """The same with static shapes: y += (y − b) ⊙ Σ_k mask_k (g_k − 1) over the DoRA adapters; a row of
    no DoRA adapter gets + 0."""
    scale = sum(mask * (g[k] - 1) for k, mask in enumerate(masks) if dora[k])       # (M, out)
    y.addcmul_(y if bias is None else y - bias, scale)
