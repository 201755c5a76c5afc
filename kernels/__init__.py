"""Fused Triton LoRA kernels, installed as `lora.kernels`.

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None)
        y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, autograd to x, lora_A, lora_B (W, b frozen)

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 is set before this package is
imported (how CI tests it). See docs/kernels.md for the design.

This package imports without error even when triton is missing (and even as a bare top-level
`kernels`, which transformers probes for): `AVAILABLE` says whether the kernels are usable, and
`lora.core.backend` reads it. No `__version__` here, so transformers never mistakes it for the PyPI
`kernels` package.
"""
try:
    import triton  # noqa: F401
except ImportError:
    AVAILABLE = False

    def lora_linear(*args, **kwargs):
        raise ImportError("lora.kernels needs triton (pip install triton); use lora.set_backend('torch')")
else:
    from .autograd import lora_linear
    from .dropout import dropout_mask

    AVAILABLE = True
