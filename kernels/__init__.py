"""Fused Triton LoRA kernels (installed as `lora.kernels`): placeholder until they land.

Importing this package raises ImportError so `lora.backend` uses the plain PyTorch path.
"""
raise ImportError("lora.kernels: the fused Triton kernels are not built yet")
