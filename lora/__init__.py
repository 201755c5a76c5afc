"""A from-scratch LoRA library for Llama-family models, with its own fused kernels.

    y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ,   scaling = lora_alpha / r
"""
from .storage.adapter import load_adapter, save_adapter
from .core.backend import get_backend, get_recompute_inputs, set_backend, set_recompute_inputs
from .core.config import LLAMA_TARGETS, LoRAConfig
from .errors import LoRAError
from .core.inject import apply_lora, disable_adapter, lora_layers, merge_lora, trainable_parameters
from .core.layer import LoRALinear
from .core.thin import get_thin_gemm, set_thin_gemm
from .merging.streaming import merge_checkpoint
from .quant import NF4Weight, quantize_nf4

__all__ = [
    "LoRAConfig", "LoRALinear", "LoRAError", "LLAMA_TARGETS", "apply_lora", "merge_lora",
    "disable_adapter", "lora_layers", "trainable_parameters", "save_adapter", "load_adapter",
    "set_backend", "get_backend", "set_recompute_inputs", "get_recompute_inputs", "set_thin_gemm",
    "get_thin_gemm", "merge_checkpoint",
    "NF4Weight", "quantize_nf4",
]
__version__ = "0.1.0"
