"""The adapter's thin products on the CPU: oneDNN's fp32 matmul where PyTorch has it, `torch.mm` elsewhere.

The adapter's GEMMs are thin: r columns (the shrink x Aᵀ, dS = dY B), r rows of a reduction (the
expand S Bᵀ, dX's dS A) or a reduction over the tokens into r rows (dA = dSᵀ x, dB = (Sᵀ dY)ᵀ).
PyTorch's fp32 `torch.mm` on an x86 CPU is MKL's sgemm, which picks its code path by CPU vendor; on
CPUs where it picks a narrower vector path than the machine has, oneDNN's fp32 matmul (which picks
by instruction set) runs the same thin products in about half the time (docs/train.md has the rates
and the machine). oneDNN is reached through `torch.ops.mkldnn._linear_pointwise`, the op PyTorch's
compiler lowers CPU linear layers to: it computes X Wᵀ (+ b) for strided X and W, so a @ b is
`linear(a, bᵀ)` and the transposed views the op passes (dSᵀ, xᵀ, dYᵀ, Bᵀ) are read in place.

Used only
- for fp32 CPU tensors (bf16's `torch.mm` on the CPU is oneDNN's already; CUDA takes its own BLAS),
- for products of at least MIN_MACS multiply-adds: a oneDNN call has a fixed cost that decode-sized
  products do not earn back,
- by the adapter's own products: the base GEMMs stay `torch.mm` (MKL), the frozen base's own, so that
  B = 0 still gives the base's output bit for bit and the training floor is PyTorch's.
`_linear_pointwise` is internal to PyTorch: on first use its result is checked against `torch.mm` on
a small product, and anything but a match within fp32 rounding (or a missing op) leaves every
product on `torch.mm`. `set_thin_gemm("torch")` does so by choice.
"""
from __future__ import annotations

import torch

MIN_MACS = 1 << 22          # m · k · n below this: torch.mm
_MODE = "auto"              # "auto" | "torch"
_WORKS: bool | None = None  # oneDNN's linear checked against torch.mm: None until first use


def set_thin_gemm(mode: str) -> None:
    """'auto' (oneDNN's matmul for large fp32 CPU products where it works) or 'torch' (always torch.mm)."""
    global _MODE
    if mode not in ("auto", "torch"):
        raise ValueError(f"thin GEMM mode must be 'auto' or 'torch', got {mode!r}")
    _MODE = mode


def get_thin_gemm() -> str:
    return _MODE


def _onednn_works() -> bool:
    """Whether oneDNN's linear is present and gives torch.mm's product (checked once)."""
    global _WORKS
    if _WORKS is None:
        _WORKS = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(37, 53, generator=g), torch.randn(53, 19, generator=g)
            try:
                with torch.autocast("cpu", enabled=False), torch.no_grad():     # the fp32 products themselves
                    _WORKS = torch.allclose(_linear(a.t().contiguous().t(), b.t(), None), torch.mm(a, b),
                                            rtol=1e-5, atol=1e-5)
            except RuntimeError:
                pass
    return _WORKS


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")      # x wᵀ + b


def _onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (_MODE == "auto" and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS and _onednn_works())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (m, k)·(k, n) → (m, n), a fresh contiguous tensor."""
    return _linear(a, b.t(), None) if _onednn(a, b) else torch.mm(a, b)


def addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bias + a @ b, bias (n,) broadcast over the rows (a @ b when bias is None), a fresh tensor."""
    if _onednn(a, b) and (bias is None or bias.dtype == torch.float32):
        return _linear(a, b.t(), bias)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
