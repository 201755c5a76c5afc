"""The LoRA input recomputed in backward from tensors autograd keeps anyway, instead of saved.

dA = dSᵀ dropout(x) needs x in backward, and a frozen base saves no x for its own backward: saving it
is the one activation-sized cost of LoRA. But in Llama the inputs of five of the seven projections
are products whose factors the base's own backward keeps until after ours has run:

    q/k/v, gate/up:   x = w ⊙ (h ⊙ rsqrt(mean(h²) + ε))     RMSNorm: the inner multiply keeps h and the rsqrt
    down:             x = act(g) ⊙ u                          the gated MLP: the multiply keeps act(g) and u

A recipe is that product read off the autograd graph: x's `grad_fn` is a multiply, and each factor is
either saved by that multiply (it keeps `self` when `other` needs a gradient, and `other` when `self`
does) or, when it is not, is itself the untouched output of such a multiply. In backward the factors
are unpacked (`_saved_self`, `_saved_other`: they share storage with what autograd holds) and
multiplied again in the same order: the same ops on the same values, so x comes back bit for bit.
No other pattern qualifies (o_proj's input, a cast, a view, a fused norm kernel, an x with no
autograd history such as layer 0's norm of frozen embeddings), nor a factor saved through
saved-tensor hooks (non-reentrant checkpointing, CPU offload): then x is saved.

Most of the time x need not be built at all. RMSNorm's output is one activation-sized factor times
broadcast ones: x[m, k] = rsqrt_m · h[m, k] · w_k, a row scale (M, 1) and a column scale (in,). Then

    dA = dSᵀ x = ((dS ⊙ rsqrt)ᵀ h) ⊙ w          (Σr, M)·(M, in), the scales applied on the small sides

which is the same sum in another order (equal up to fp rounding, not bit for bit) and costs no pass
over an activation: `split_product` finds that form, `rebuild` falls back to the product.
"""
from __future__ import annotations

import torch


def product_recipe(x: torch.Tensor, depth: int = 2):
    """A recipe that rebuilds `x` in backward from factors autograd keeps anyway, or None."""
    return _recipe(x.grad_fn, 0, depth)


def _recipe(node, output_nr: int, depth: int):
    if node is None or output_nr != 0 or depth == 0 or node.name() != "MulBackward0":
        return None
    (f_self, nr_self), (f_other, nr_other) = node.next_functions
    # `self` is saved when `other` needs a gradient; otherwise `self` must be a product itself.
    left = None if f_other is not None else _recipe(f_self, nr_self, depth - 1)
    right = None if f_self is not None else _recipe(f_other, nr_other, depth - 1)
    if (f_other is None and left is None) or (f_self is None and right is None):
        return None
    if (f_other is not None and _hooked(node._raw_saved_self)) or (f_self is not None and _hooked(node._raw_saved_other)):
        return None
    return node, left, right


def _hooked(saved) -> bool:
    """Whether a saved tensor goes through saved-tensor hooks (checkpointing, offloading): those may
    allow one unpack only, the multiply's own, so such a factor is never read for a recipe."""
    return getattr(saved, "unpack_hook", True) is not None


def recompute(recipe, like_shape: torch.Size, like_dtype: torch.dtype) -> torch.Tensor:
    """x again, from `recipe`; checked against the shape and dtype x had in forward."""
    x = _product(recipe)
    if x.shape != like_shape or x.dtype != like_dtype:        # a product that promotes differently
        raise RuntimeError(f"recomputed LoRA input is {tuple(x.shape)} {x.dtype}, "
                           f"forward saw {tuple(like_shape)} {like_dtype}")
    return x


def split_product(recipe, x_shape: torch.Size, x_dtype: torch.dtype):
    """(row, full, col) when the product is row ⊙ full ⊙ col: exactly one factor of x's shape (full),
    the others broadcast along x's rows (shape (..., 1): row, as (M, 1)) or its columns (every dim 1
    but the last: col, as (in,)), all of x's dtype; None otherwise. row/col are None when absent."""
    full, rows, cols = [], [], []
    for f in _factors(recipe):
        if f.dtype != x_dtype:
            return None
        if f.shape == x_shape:
            full.append(f)
        elif f.dim() == len(x_shape) and f.shape[:-1] == x_shape[:-1] and f.shape[-1] == 1:
            rows.append(f.reshape(-1, 1))
        elif f.numel() == x_shape[-1] and f.dim() <= len(x_shape) and f.shape[-1] == x_shape[-1]:
            cols.append(f.reshape(-1))
        else:
            return None
    if len(full) != 1:
        return None
    prod = lambda fs: None if not fs else fs[0] if len(fs) == 1 else torch.stack(fs).prod(0)
    return prod(rows), full[0].reshape(-1, x_shape[-1]), prod(cols)


def _factors(recipe) -> list[torch.Tensor]:
    """The saved tensors the product multiplies, left to right."""
    node, left, right = recipe
    a = [node._saved_self] if left is None else _factors(left)
    b = [node._saved_other] if right is None else _factors(right)
    return a + b


def _product(recipe) -> torch.Tensor:
    node, left, right = recipe
    a = node._saved_self if left is None else _product(left)
    b = node._saved_other if right is None else _product(right)
    return a * b
