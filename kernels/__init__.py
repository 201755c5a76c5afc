"""Fused Triton LoRA kernels (installed as `lora.kernels`): placeholder until they land.

`AVAILABLE = False` makes `lora.backend` use the plain PyTorch path. This package must import without
error even as a top-level `kernels` (transformers probes that name when the repo root is on sys.path)
and must not define `__version__` (so transformers never mistakes it for the PyPI `kernels` package).
"""
AVAILABLE = False


def lora_linear(*args, **kwargs):
    raise RuntimeError("lora.kernels: the fused Triton kernels are not built yet")
