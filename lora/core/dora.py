"""DoRA (Liu et al. 2024): the weight split into a magnitude and a direction, the LoRA update on the direction.

    W' = m ⊙ (W + s·B A) / n,   n = ‖W + s·B A‖_row     (one value per output feature, as PEFT for nn.Linear)
         W: (out, in) frozen   A = lora_A: (r, in)   B = lora_B: (out, r)   m = lora_magnitude_vector: (out,)

n is treated as a constant in backward (the paper's §4.3, PEFT's choice): it is computed without
gradients and passed in detached. With g = m / n (out,), the forward is PEFT's exactly
(`peft/tuners/lora/variants.py` DoraLinearVariant.forward, `dora.py` DoraLinearLayer.forward):

    no dropout (or eval):  y = x Wᵀ + b + (g − 1) ⊙ x Wᵀ + g ⊙ s·x Aᵀ Bᵀ  =  g ⊙ z + b,   z = x Wᵀ + s·x Aᵀ Bᵀ
    dropout p:             y = x Wᵀ + b + (g − 1) ⊙ xd Wᵀ + g ⊙ s·xd Aᵀ Bᵀ,   xd = dropout(x)
                             = x Wᵀ + b + (g − 1) ⊙ zd + s·xd Aᵀ Bᵀ,   zd = xd Wᵀ + s·xd Aᵀ Bᵀ

(with dropout PEFT applies the magnitude correction to the base term of the *dropped* input: a second
base GEMM, over xd). x: (M, in), y, z, zd: (M, out), g broadcast over the M rows.

The norm without the out × in product (`weight_norm`): row i of W + s·B A has squared norm

    n_i² = ‖W_i‖² + 2s·(W Aᵀ)_i · B_i + s²·B_i (A Aᵀ) B_iᵀ

one (out × r) product W Aᵀ (in row blocks when W is not fp32, dequantized one row block at a time
when it is NF4), an (r × r) Gram matrix, and ‖W_i‖² computed once by the layer and cached. The
products are fp32, the out-length sum fp64.

Backward (W, b frozen; n constant), no dropout, dz = dY ⊙ g:

    dS = s·dz B (M, r)   dB = s·dzᵀ S   dA = dSᵀ x   dX = dz W + dS A   dm = Σ_rows(dY ⊙ z) / n

With dropout (mask: 0 where dropped, 1/(1 − p) elsewhere; S = xd Aᵀ):

    dz = dY ⊙ g   dS = s·dz B   dB = s·dzᵀ S   dA = dSᵀ xd   dm = Σ_rows(dY ⊙ zd) / n
    dX = dY W + mask ⊙ ((dY ⊙ (g − 1)) W + dS A)

Saved for backward: besides the LoRA op's (x or its recipe, s·S, the dropped indices: lora/core/op.py),
the one (M, out) tensor dm needs. Without dropout that is the output y itself, since
Σ_rows(dY ⊙ z)/n = Σ_rows(dY ⊙ (y − b))/m: the layer that reads y (SiLU for gate_proj, the gated
multiply for up_proj, attention for v_proj) often keeps the same tensor, so it costs nothing there.
Only when some m_i is exactly 0 (y then carries no z) is z kept instead. With dropout, zd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.linear import base_linear, dense
from ..quant.nf4 import NF4Weight, blockwise_scale
from ..runtime.seed import new_seed
from .dropout import compact, drop_
from .op import expand, input_recipe, recomputed_input, shrink
from .thin import mm

_BLOCK_ELEMS = 1 << 20      # elements of W per row block when it is converted (4 MB of fp32)


def row_blocks(weight, dtype: torch.dtype = torch.float32):
    """(r0, W[r0:r1] as dense `dtype`) over row blocks of about _BLOCK_ELEMS elements: never a whole
    converted copy of W. An NF4 weight is dequantized one row block at a time (blocks aligned to its
    quantization blocks)."""
    out_f, in_f = weight.shape
    rows = max(1, _BLOCK_ELEMS // in_f)
    if isinstance(weight, NF4Weight):
        bs = weight.block_size
        while (rows * in_f) % bs and rows < out_f:      # a row block must start on a quantization block
            rows += 1
        scales = weight.scales()                         # (n_blocks,) fp32: 1/16 of W's fp32 size at block 64
        table = weight.quant_map.float()
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        if not isinstance(weight, NF4Weight):
            yield r0, weight[r0:r1].to(dtype)
            continue
        e0, e1 = r0 * in_f, r1 * in_f                    # elements; e0 is a multiple of the (even) block size
        p = weight.packed.view(-1)[e0 // 2:(e1 + 1) // 2]                       # two codes a byte, high nibble first
        codes = torch.stack((p >> 4, p & 0xF), dim=1).view(-1)[:e1 - e0].long()
        b0, b1 = e0 // bs, -(-e1 // bs)
        values = blockwise_scale(table[codes], scales[b0:b1], bs)
        yield r0, values.view(r1 - r0, in_f).to(dtype)


@torch.no_grad()
def weight_sq_norms(weight) -> torch.Tensor:
    """‖W_i‖² (out,) in fp64, W dense or NF4 (dequantized as the layer uses it), in row blocks."""
    out = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    for r0, blk in row_blocks(weight, torch.float64):
        out[r0:r0 + blk.shape[0]] = blk.square().sum(dim=1)
    return out


@torch.no_grad()
def weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                w_sq: torch.Tensor) -> torch.Tensor:
    """n = ‖W + s·B A‖_row (out,) fp32 by the factored formula (module docstring), detached.

    w_sq: ‖W_i‖² (out,) fp64 (`weight_sq_norms`). W Aᵀ (out, r) and A Aᵀ (r, r) in fp32."""
    A, B = lora_A.detach().float(), lora_B.detach().float()
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:
        WA = torch.mm(weight.detach(), A.t())                                  # (out, r)
    else:
        WA = torch.empty(weight.shape[0], A.shape[0], dtype=torch.float32, device=A.device)
        for r0, blk in row_blocks(weight, torch.float32):
            torch.mm(blk, A.t(), out=WA[r0:r0 + blk.shape[0]])
    cross = (WA * B).sum(dim=1)                                                # (W Aᵀ)_i · B_i
    quad = (torch.mm(B, torch.mm(A, A.t())) * B).sum(dim=1)                    # B_i (A Aᵀ) B_iᵀ
    n_sq = w_sq + (2 * scaling) * cross.double() + (scaling * scaling) * quad.double()
    return n_sq.clamp_min_(0).sqrt_().float()


def dense_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B A‖_row (out,) from the dense (out, in) sum, fp32, as PEFT's `get_weight_norm` computes it:
    the reference the factored norm is checked against (the merge, which builds W + s·B A anyway,
    takes the same dense norm in lora/core/delta.py)."""
    V = dense(weight, torch.float32).float() + scaling * (lora_B.float() @ lora_A.float())
    return torch.linalg.vector_norm(V, dim=1)


class DoRAFunction(torch.autograd.Function):
    """y for `apply(x, W, b, A, B, m, n, scaling, dropout_p, seed, recipe)`; gradients to x, A, B and
    m (W, b frozen, n constant). See the module docstring for the math and what is kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float,
                seed: int, recipe):
        x2 = x.reshape(-1, x.shape[-1])                                   # (M, in)
        W = dense(weight, x2.dtype)                                      # (out, in), dropped after use if NF4
        g = (magnitude.float() / norm.float()).to(x2.dtype)              # (out,)
        S, dropped, xd = shrink(x2, lora_A, dropout_p, seed)             # (M, r) (÷ (1 − p) when p > 0)
        S.mul_(scaling)                                                  # s·S
        need_m = ctx.needs_input_grad[5]
        keep_z = False
        if dropout_p == 0:
            z = expand(S, lora_B, None).addmm_(x2, W.t())                # z = s·S Bᵀ + x Wᵀ  (M, out)
            keep_z = need_m and not bool(magnitude.ne(0).all())          # y − b no longer carries z
            if keep_z:
                y = z * g if bias is None else torch.addcmul(bias, z, g)
            else:
                y = z.mul_(g) if bias is None else z.mul_(g).add_(bias)  # g ⊙ z + b, in place
            kept = z if keep_z else y
        else:
            P = expand(S, lora_B, None)                                  # s·xd Aᵀ Bᵀ  (M, out)
            y = (P.clone() if bias is None else P + bias).addmm_(x2, W.t())   # x Wᵀ + b + s·xd Aᵀ Bᵀ
            zd = P.addmm_(xd, W.t(), alpha=1 / (1 - dropout_p))          # zd = xd Wᵀ + s·xd Aᵀ Bᵀ, in P
            y.addcmul_(zd, (magnitude.float() / norm.float() - 1).to(x2.dtype))   # + (g − 1) ⊙ zd
            kept = zd
        ctx.save_for_backward(None if recipe else xd, S, lora_A, lora_B,
                              None if dropped is None else compact(dropped, x2.numel()),
                              weight if isinstance(weight, torch.Tensor) else None,
                              bias, magnitude, norm, g, kept if need_m else None)
        ctx.packed = None if isinstance(weight, torch.Tensor) else weight
        ctx.scaling, ctx.dropout_p, ctx.keep_z = scaling, dropout_p, keep_z
        ctx.x_shape, ctx.x_dtype, ctx.recipe = x.shape, x.dtype, recipe
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        xd, S, A, B, dropped, W, bias, m, n, g, kept = ctx.saved_tensors
        W = ctx.packed if W is None else W
        s, p = ctx.scaling, ctx.dropout_p
        need_x, _, _, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        dY2 = dY.reshape(-1, dY.shape[-1])                               # (M, out)
        dz = dY2 * g                                                     # (M, out)
        dS = mm(dz, B).mul_(s)                                           # (M, r)
        dB = mm(S.t(), dz).t() if need_B else None                       # (Sᵀ dz)ᵀ (out, r): S saved as s·S
        dm = None
        if need_m:
            if p > 0 or ctx.keep_z:                                      # Σ_rows(dY ⊙ z) / n
                dm = torch.linalg.vecdot(dY2, kept, dim=0).float() / n.float()
            else:                                                        # Σ_rows(dY ⊙ (y − b)) / m
                dot = torch.linalg.vecdot(dY2, kept.reshape(dY2.shape), dim=0).float()
                if bias is not None:
                    dot = dot - bias.float() * dY2.float().sum(0)
                dm = dot / m.float()
            dm = dm.to(m.dtype)
        if dropped is not None:
            dropped = dropped.long()
            dS.mul_(1 / (1 - p))                                         # the mask's scale, on the small side
        dA = None
        if need_A:
            if ctx.recipe:
                xd = recomputed_input(ctx.recipe, ctx.x_shape, ctx.x_dtype, dropped)
            dA = mm(dS.t(), xd)                                          # (r, in)
        dX = None
        if need_x:
            Wd = dense(W, dY2.dtype)
            dX = mm(dS, A)                                               # dS A  (M, in)
            if p == 0:
                dX.addmm_(dz, Wd)                                        # + dz W
            else:
                del dz
                g1 = (m.float() / n.float() - 1).to(dY2.dtype)
                dX.addmm_(dY2 * g1, Wd, alpha=1 / (1 - p))               # + (dY ⊙ (g − 1)) W ÷ (1 − p)
                drop_(dX, dropped)                                       # ⊙ mask
                dX.addmm_(dY2, Wd)                                       # + dY W
            dX = dX.view(ctx.x_shape)
        return dX, None, None, dA, dB, dm, None, None, None, None, None


def dora_linear_torch(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float = 0.0,
                      seed: int | None = None, recompute_input: bool = True) -> torch.Tensor:
    """PEFT's DoRA forward for x (..., in) → (..., out), `norm` = ‖W + s·B A‖_row detached (`weight_norm`);
    one autograd Function. `seed` fixes the dropout mask (drawn on the host when None and p > 0)."""
    if dropout_p > 0 and seed is None:
        seed = new_seed()
    recipe = input_recipe(x, lora_A.requires_grad, recompute_input)
    return DoRAFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm.detach(), float(scaling),
                              float(dropout_p), seed or 0, recipe)


def dora_linear_graph_safe(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """The same forward in plain autograd ops (capturable as one static graph: dropout from the device
    RNG, no host sync); autograd keeps what they need."""
    g = magnitude / norm.detach()                                        # (out,)
    if dropout_p == 0:
        y = g * (base_linear(x, weight, None) + scaling * F.linear(F.linear(x, lora_A), lora_B))
        return y if bias is None else y + bias
    xd = F.dropout(x, dropout_p, training=True)
    return (base_linear(x, weight, bias) + (g - 1) * base_linear(xd, weight, None)
            + g * (scaling * F.linear(F.linear(xd, lora_A), lora_B)))
