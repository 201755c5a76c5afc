"""`LoRALinear`: a frozen `nn.Linear` plus a trainable low-rank update.

    y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

    x: (..., in)   W: (out, in) frozen   b: (out,) frozen   A = lora_A: (r, in)   B = lora_B: (out, r)
    scaling = alpha / r   (rsLoRA: alpha / sqrt(r); lora/core/config.py's `lora_scaling`)

B·A (out × in) is never built in the forward: the shrink (x Aᵀ, r columns) and the expand cost
O(M·r·(in+out)) instead of O(out·in·r) + another GEMM. `merge()` folds the update into W
(fp32 sum, one rounding) for inference; `unmerge()` subtracts it again.

The base may be 4-bit (an NF4Linear, lora/quant/): W is then dequantized where it is used, in the
forward and again in backward for dX, and is never merged in place (merge.py writes a merged copy).

With `use_dora` (DoRA, lora/core/dora.py) the layer also has `lora_magnitude_vector` m (out,), trainable,
initialised to ‖W + s·B A‖_row (‖W‖_row when B = 0), and computes PEFT's DoRA forward
y = m/n ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b with n = ‖W + s·B A‖_row constant in backward (dropout: dora.py).
‖W_i‖² is computed once and cached (recomputed when W changes); merge() folds
W ← round(m/n ⊙ (fp32(W) + s·B A)) and unmerge() divides by m/n again.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import backend
from .config import check_init_mode, lora_scaling
from .delta import Term, dora_merged_weight, dora_unmerged_weight, merged_weight
from .dora import weight_norm, weight_sq_norms
from ..errors import LoRAError
from ..quant.linear import NF4Linear, base_linear
from ..quant.nf4 import NF4Weight


class LoRALinear(nn.Module):
    """A wrapped `nn.Linear`: keeps its `weight`/`bias` (so checkpoint keys are unchanged), adds
    `lora_A` (r × in), `lora_B` (out × r) and `scaling`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 lora_dtype: torch.dtype | None = None, use_dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                                  # (out, in), frozen; or an NF4Weight
        self.bias = base.bias                                      # (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.lora_dropout = r, alpha, dropout
        self.scaling = lora_scaling(alpha, r, use_rslora)
        # Adapter weights in fp32 by default (as PEFT does), whatever the base dtype.
        dtype = lora_dtype or (torch.float32 if base.weight.is_floating_point() else base.weight.dtype)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))  # (out, r)
        self.use_dora = use_dora
        if use_dora:                                               # m: (out,), set by reset_lora_parameters
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        self._w_sq = self._w_sq_key = self._norm = self._norm_key = None   # DoRA: cached ‖W_i‖² and n
        self._merge_scale = None                                             # DoRA: m/n at merge, for unmerge
        self.merged = False
        self.disabled = False
        self.group = None       # a SharedInputGroup when siblings read the same input (lora/core/group.py)
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """A and B drawn as `init` says (one of INIT_MODES, as LoRAConfig.init_lora_weights describes)."""
        check_init_mode(init, "LoRALinear")
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)                 # A ~ N(0, 1/r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))          # nn.Linear's own init
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)                                    # B = 0: y is the base's at step 0
        if self.use_dora:                                                  # m = ‖W + s·B A‖_row: y unchanged
            self.lora_magnitude_vector.copy_(self.dora_norm())

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """The trainable tensors: (lora_A, lora_B), and lora_magnitude_vector with DoRA."""
        if self.use_dora:
            return self.lora_A, self.lora_B, self.lora_magnitude_vector
        return self.lora_A, self.lora_B

    def dora_norm(self, cache: bool = True) -> torch.Tensor:
        """n = ‖W + s·B A‖_row (out,) fp32, detached, by the factored formula (lora/core/dora.py), in fp32
        whatever autocast says. ‖W_i‖² is cached until W changes, n until W, A or B does (another tensor,
        device or in-place version: an optimizer step changes A and B, so n is computed once a step, and
        once for all of generation). `cache=False` (graph capture, where a replay would not rerun the
        check) computes n every call."""
        w = self.weight
        ref = w.packed if isinstance(w, NF4Weight) else w
        w_key = (ref.data_ptr(), ref.device, ref.dtype, w._version)
        key = (w_key, *((t.data_ptr(), t.dtype, t._version) for t in (self.lora_A, self.lora_B)), self.scaling,
               torch.is_inference_mode_enabled())     # an inference tensor cannot be saved for a later backward
        if self._norm_key != key or not cache:
            with torch.autocast(ref.device.type, enabled=False), torch.no_grad():
                if self._w_sq_key != w_key:
                    self._w_sq, self._w_sq_key = weight_sq_norms(w), w_key
                self._norm = weight_norm(w, self.lora_A, self.lora_B, self.scaling, self._w_sq)
            self._norm_key = key
        return self._norm

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout}, merged={self.merged}"
                + (", dora=True" if self.use_dora else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return base_linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        if self.use_dora:
            return backend.dora_forward(self, x, p)    # m/n ⊙ (x Wᵀ + scaling · x Aᵀ Bᵀ) + b (dropout: dora.py)
        return backend.lora_forward(self, x, p)    # x Wᵀ + b + scaling · (dropout_p(x) Aᵀ) Bᵀ

    # -- merge / unmerge --------------------------------------------------------------------
    def _fold(self, sign: float) -> None:
        """W ← round(fp32(W) + sign · scaling · B A), by the merge formula of lora/core/delta.py."""
        if isinstance(self.weight, NF4Weight):
            raise LoRAError("cannot merge an adapter into a 4-bit base in place; merge.py writes the merged "
                            "model (--base: the original full-precision weights or the 4-bit checkpoint)")
        term = Term(self.lora_A.detach(), self.lora_B.detach(), self.scaling, sign)
        W = self.weight.detach()
        if not self.use_dora:
            merged_weight(W, [term], self.weight.dtype, out=self.weight.data)
        elif sign > 0:                     # W ← round(m/n ⊙ (fp32(W) + s·B A)), n of the unmerged W
            term.magnitude = self.lora_magnitude_vector.detach()
            _, self._merge_scale = dora_merged_weight(W, term, self.weight.dtype, out=self.weight.data)
        else:                              # W ← round(fp32(W) / (m/n) − s·B A), m/n kept from merge (PEFT's)
            term.weight = 1.0
            dora_unmerged_weight(W, term, self._merge_scale, self.weight.dtype, out=self.weight.data)
            self._merge_scale = None

    @torch.no_grad()
    def merge(self) -> None:
        """W ← round(fp32(W) + scaling · B A) (DoRA: round(m/n ⊙ (fp32(W) + scaling · B A))). Idempotent."""
        if not self.merged:
            self._fold(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← round(fp32(W) − scaling · B A) (DoRA: round(fp32(W) / (m/n) − scaling · B A), m/n as at
        merge). Idempotent; exact only up to the weight dtype's rounding."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base layer inside the block."""
        if self.merged:
            raise RuntimeError("cannot disable a merged adapter: call unmerge() first")
        old, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = old

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this layer's (merged, if merged) weight and bias; an NF4Linear
        over a 4-bit base."""
        if isinstance(self.weight, NF4Weight):
            return NF4Linear(self.weight, self.bias)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin
