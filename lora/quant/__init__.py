"""4-bit bases: NF4 as bitsandbytes stores it, and the frozen layer over it.

    nf4.py     the NF4 code, quantize / dequantize with double quantization, NF4Weight
    linear.py  NF4Linear: a frozen Linear over an NF4Weight (dequantized where used), the model walk
"""
from .nf4 import NF4Weight, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4"]
