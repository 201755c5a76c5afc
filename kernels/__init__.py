"""Fused Triton LoRA kernels, installed as `lora.kernels`.

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None)
        y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, autograd to x, lora_A, lora_B (W, b frozen)
    dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p=0.0)
        PEFT's DoRA output, g = magnitude / weight_norm: y = g ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b
        (dropout: PEFT's form, kernels/dora.py), autograd to x, lora_A, lora_B, magnitude
    nf4_dequantize(weight, dtype)      an NF4 weight (lora/quant/nf4.py) as a dense tensor, bit-exact
    nf4_matmul(x, weight, bias)        x Wᵀ + b with W dequantized in the K loop, for M ≤ 16 rows (decode)
    sgmv_(y, x, lora_A, lora_Bt, scalings, seg_start, seg_len, seg_adapter, max_len) / bgmv_(..., row_adapter)
                                       many adapters in one batch, per segment / per row (kernels/segmented.py)

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
    nf4_dequantize = nf4_matmul = dora_linear = sgmv_ = bgmv_ = lora_linear
else:
    from .autograd import lora_linear
    from .dora import dora_linear
    from .dropout import dropout_mask
    from .nf4_dequant import nf4_dequantize
    from .nf4_matmul import MAX_M as nf4_matmul_max_rows, nf4_matmul
    from .segmented import bgmv_, sgmv_

    AVAILABLE = True
