"""The merged weight, in one place: LoRALinear.merge/unmerge, merge_lora and merge.py all use it.

    W' = round_to_dtype( fp32(W) + Σ_i w_i · (s_i · fp32(B_i) @ fp32(A_i)) )     one rounding
         W: (out, in)   A_i: (r_i, in)   B_i: (out, r_i)   s_i: scaling   w_i: the adapter's weight

Unmerging is the same formula with w = −1 (exact only up to the weight dtype's rounding).

A DoRA adapter (a Term with `magnitude` m (out,)) gives, as PEFT's merge does:

    V = fp32(W) + s · fp32(B) @ fp32(A)      W' = round_to_dtype( (m / ‖V‖_row) ⊙ V )         one rounding

and unmerging divides by the same m / ‖V‖_row (kept from the merge): W = round(fp32(W') / (m/‖V‖) − s·B A).
A weighted or multi-adapter sum including a DoRA adapter is undefined (each rescales the whole row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LoRAError


@dataclass
class Term:
    """One adapter's low-rank update of one weight: weight · scaling · B @ A."""
    lora_A: torch.Tensor      # (r, in)
    lora_B: torch.Tensor      # (out, r)
    scaling: float
    weight: float
    magnitude: torch.Tensor | None = None    # DoRA's lora_magnitude_vector m (out,); None for LoRA


class Workspace:
    """Buffers reused from one merged weight to the next: the sizes repeat layer after layer, and a
    fresh (out, in) allocation each time costs page faults (mmap'd by the allocator) on every tensor."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < n or buf.device != torch.device(device):
            self.buffers.pop(key, None)
            self.buffers[key] = buf = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def merged_weight(W: torch.Tensor, terms: list[Term], out_dtype: torch.dtype,
                  ws: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """round_to(out_dtype)( fp32(W) + Σ w·(s·B@A) ): the deltas summed in fp32, in adapter order, one rounding.

    W: (out, in) in any float dtype. `delta += fp32(W)` is the same IEEE sum as `fp32(W) + delta`
    (the upcast is exact, addition commutes); in-place ops and `copy_` into a buffer give the same bits
    as their allocating forms. `ws` holds the fp32 temporaries; the result goes to `out` when given.
    """
    if any(u.magnitude is not None for u in terms):
        if len(terms) != 1 or terms[0].weight != 1.0:
            raise LoRAError("a weighted or multi-adapter merge including a DoRA adapter is undefined; "
                            "merge a DoRA adapter alone with weight 1")
        return dora_merged_weight(W, terms[0], out_dtype, ws, out)[0]
    ws = ws or Workspace()
    out = torch.empty(W.shape, dtype=out_dtype, device=W.device) if out is None else out
    delta = ws.get("delta", W.shape, torch.float32, W.device)              # (out, in) fp32
    for i, u in enumerate(terms):
        prod = delta if i == 0 else ws.get("term", W.shape, torch.float32, W.device)
        torch.matmul(u.lora_B.float(), u.lora_A.float(), out=prod).mul_(u.scaling)   # (out, r) @ (r, in)
        if u.weight != 1.0:
            prod.mul_(u.weight)
        if i:
            delta.add_(prod)
    if W.dtype == torch.float64:                 # keep an fp64 base in fp64 (no precision lost)
        return out.copy_(W + delta.double())
    # A same-dtype add after an explicit upcast is several times faster than a mixed-dtype add_.
    delta.add_(W if W.dtype == torch.float32 else ws.get("w32", W.shape, torch.float32, W.device).copy_(W))
    return out.copy_(delta)                                                     # the one rounding (RNE)


def _updated(W: torch.Tensor, u: Term, sign: float, ws: Workspace) -> torch.Tensor:
    """fp32(W) + sign · s · B A (out, in) in a workspace buffer (fp64 for an fp64 W), W itself untouched."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    V = ws.get("delta", W.shape, dtype, W.device)
    torch.matmul(u.lora_B.to(dtype), u.lora_A.to(dtype), out=V).mul_(sign * u.scaling)   # (out, r) @ (r, in)
    return V.add_(W if W.dtype == dtype else ws.get("w32", W.shape, dtype, W.device).copy_(W))


def dora_merged_weight(W: torch.Tensor, u: Term, out_dtype: torch.dtype, ws: Workspace | None = None,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(round_to(out_dtype)( m/‖V‖_row ⊙ V ), m/‖V‖_row (out,)), V = fp32(W) + s·B@A: DoRA's merge, PEFT's
    formula (its norm is the dense row norm of V, which exists here anyway), one rounding."""
    ws = ws or Workspace()
    out = torch.empty(W.shape, dtype=out_dtype, device=W.device) if out is None else out
    V = _updated(W, u, 1.0, ws)                                                # (out, in)
    scale = u.magnitude.to(V.dtype) / torch.linalg.vector_norm(V, dim=1)      # (out,)
    return out.copy_(V.mul_(scale.unsqueeze(1))), scale


def dora_unmerged_weight(W: torch.Tensor, u: Term, scale: torch.Tensor, out_dtype: torch.dtype,
                         ws: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """round_to(out_dtype)( fp32(W') / scale − s·B@A ): a DoRA merge undone with the merge's m/‖V‖ `scale`."""
    ws = ws or Workspace()
    out = torch.empty(W.shape, dtype=out_dtype, device=W.device) if out is None else out
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    V = ws.get("w32", W.shape, dtype, W.device).copy_(W).div_(scale.to(dtype).unsqueeze(1))
    delta = ws.get("delta", W.shape, dtype, W.device)
    torch.matmul(u.lora_B.to(dtype), u.lora_A.to(dtype), out=delta).mul_(u.scaling)
    return out.copy_(V.sub_(delta))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no ±inf in `t`, in one reduction pass and no temporary of t's size: NaN propagates
    through min and max, and an infinity is the min or the max."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
