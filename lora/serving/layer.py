"""`MultiLoRALinear`: a frozen `nn.Linear` and the adapters of one module, stacked, each batch row
choosing its own (lora/serving/rows.py).

    y[i] = x[i] Wᵀ + b + s_k · (x[i] A_kᵀ) B_kᵀ       k = row i's adapter; no term when k = -1
        lora_A: (n, r_max, in)   lora_Bt: (n, r_max, out), B_kᵀ stacked as the expand reads it
        adapter k uses A_k = lora_A[k, :r_k] and B_kᵀ = lora_Bt[k, :r_k], both contiguous

Ranks are padded to the largest with zeros. The grouped path (lora/serving/grouped.py) reads each
adapter's own r_k (the padding is never multiplied: the same products as the adapter alone); the
batched path reads up to the largest rank among the batch's adapters and the Triton kernels
(kernels/segmented.py, when lora.core.backend picks Triton) the whole padded stacks, whose zeros add
nothing. An adapter that does not target this module has `present[k]` False and contributes nothing
for its rows. Scalings are per adapter and per module (rank_pattern / alpha_pattern), from
lora/core/config.py. A DoRA adapter's rows are then rescaled on every path,

    y[i] = b + g_k ⊙ (x[i] Wᵀ + s_k · (x[i] A_kᵀ) B_kᵀ)    g_k = m_k / ‖W + s_k·B_k A_k‖_row (`dora_scale[k]`)

with g_k fixed when the adapters are loaded (lora/serving/load.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core import backend
from ..quant.linear import base_linear
from .grouped import batched_lora_, dora_masked_, dora_rows_, grouped_lora_, masked_lora_


class MultiLoRALinear(nn.Module):
    """Keeps the base's `weight`/`bias`; adds buffers `lora_A`, `lora_Bt` (stacked, zero-padded) and
    the per-adapter `ranks`, `scalings`, `present`."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_Bt: torch.Tensor, ranks: list[int],
                 scalings: list[float], present: list[bool], state, dora_scale: torch.Tensor | None = None,
                 dora: list[bool] | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("lora_A", lora_A)           # (n, r_max, in)
        self.register_buffer("lora_Bt", lora_Bt)         # (n, r_max, out)
        self.dora = list(dora) if dora is not None else [False] * len(ranks)
        self._any_dora = any(self.dora)
        # DoRA's g_k = m_k / ‖W + s_k·B_k A_k‖_row (n, out), 1 for plain LoRA adapters
        self.register_buffer("dora_scale", dora_scale if dora_scale is not None
                             else torch.ones(len(ranks), self.out_features, dtype=lora_A.dtype, device=lora_A.device))
        self.ranks, self.scalings, self.present = list(ranks), list(scalings), list(present)
        self.state = state                                # ServingState, shared with the model
        self._views = self._adapter_views()
        self._present = tuple(self.present)
        self._batched: dict = {}                          # (adapters, dtype) → views for the batched form

    def _adapter_views(self):
        """Per adapter (A_k (r_k, in), B_kᵀ (r_k, out), s_k) as views of the stacks, or None."""
        return [(self.lora_A[k, :r], self.lora_Bt[k, :r], s) if on else None
                for k, (r, s, on) in enumerate(zip(self.ranks, self.scalings, self.present))]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._views = self._adapter_views()              # the stacks may be new tensors now
        self._batched = {}
        return out

    def _triton_(self, y2: torch.Tensor, x2: torch.Tensor, index) -> None:
        """The kernels of kernels/segmented.py: per row at decode (T = 1), per segment at prefill. Rows of
        an adapter that does not target this module get index -1 here (nothing added)."""
        from .. import kernels
        M = x2.shape[0]
        ids = index.token_ids(M, x2.device)                                # (M,) int32
        if not all(self.present):
            present = torch.tensor(self.present + [False], device=x2.device)   # [-1] reads the last: False
            ids = torch.where(present[ids.long()], ids, -1).to(torch.int32)
        A, Bt = self.lora_A.to(x2.dtype), self.lora_Bt.to(x2.dtype)
        scalings = torch.tensor(self.scalings, dtype=torch.float32, device=x2.device)
        if index.token_rows(M) == 1:
            kernels.bgmv_(y2, x2, A, Bt, scalings, ids)
        else:
            start, length, adapter = kernels.segmented.segments(ids)
            if length.numel():
                kernels.sgmv_(y2, x2, A, Bt, scalings, start, length, adapter, int(length.max()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={len(self.ranks)}, "
                f"ranks={self.ranks}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_linear(x, self.weight, self.bias)                         # x Wᵀ + b  (..., out)
        index = self.state.current
        if index is None or not index.active:
            return y
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])       # (M, in), (M, out)
        M = x2.shape[0]
        triton = backend.uses_triton(x)
        masked = backend._GRAPH_SAFE and not triton
        if triton:
            self._triton_(y2, x2, index)
        elif masked:
            masked_lora_(y2, x2, self._views_in(x.dtype), index.masks(M, x.device, x.dtype))
        else:
            plan = index.batched(M, x.device, self._present)
            if plan is None:
                grouped_lora_(y2, x2, self._views_in(x.dtype), index.groups(M, x.device))
            else:
                batched_lora_(y2, x2, *self._batch_stacks(plan, x.dtype), plan)
        if self._any_dora:                                # DoRA adapters' rows: b + g ⊙ (y − b)
            g, bias = self.dora_scale.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            if masked:
                dora_masked_(y2, bias, g, index.masks(M, x.device, x.dtype), self.dora)
            else:
                dora_rows_(y2, bias, g, index.groups(M, x.device), self.dora)
        return y

    def _views_in(self, dtype: torch.dtype):
        """The per-adapter views, cast to `dtype` as the single-adapter path casts (per call) if need be."""
        if self.lora_A.dtype == dtype:
            return self._views
        return [None if v is None else (v[0].to(dtype), v[1].to(dtype), v[2]) for v in self._views]

    def _batch_stacks(self, plan, dtype: torch.dtype):
        """(A (G, r, in), Bᵀ (G, r, out), s (G, 1, 1)) of the plan's adapters in `dtype`, r the largest of
        their ranks: views of the stacks for a run of adapters (cached per plan), else gathered."""
        key = (plan.ks, dtype)
        got = self._batched.get(key)
        if got is None:
            r = max(self.ranks[k] for k in plan.ks)
            k = plan.adapters
            s = torch.tensor([self.scalings[i] for i in plan.ks], dtype=dtype, device=self.lora_A.device)
            got = (self.lora_A[k, :r].to(dtype), self.lora_Bt[k, :r].to(dtype), s.view(-1, 1, 1))
            if self.lora_A.dtype != dtype or not isinstance(k, slice):
                return got                              # a gathered or cast copy: not kept
            self._batched[key] = got
        return got
