"""Everything device-specific that the training loop and inference call, in one place.

The loop never branches on the device: it calls the hooks below at fixed points (`prepare_model`
once, `autocast()` around forward + loss, `mark_step()` after backward and after the optimizer
step, `make_optimizer`, `clip_grad_norm`, `zero_grad_set_to_none`, `dist_backend`). CPU and CUDA are
implemented here; a Gaudi (HPU) device only has to fill these hooks (lazy-mode `mark_step`, HPU
graphs in `prepare_model`, fused AdamW / clip-norm, `hccl`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import LoRAError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Device:
    """A compute device and the few device-specific calls the training loop makes."""

    name: str                           # "cpu" | "cuda"
    torch_device: torch.device          # e.g. cuda:1 under torchrun
    dist_backend: str                   # torch.distributed backend: "gloo" | "nccl"
    zero_grad_set_to_none: bool = True  # graph-captured devices need grads zeroed in place

    def default_dtype(self) -> torch.dtype:
        """bf16 where it is fast and supported (CUDA), fp32 otherwise."""
        if self.name == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def resolve_dtype(self, dtype: str) -> torch.dtype:
        """'auto' | 'fp32' | 'bf16' -> the compute dtype of the frozen base and of autocast."""
        if dtype == "auto":
            return self.default_dtype()
        if dtype not in DTYPES:
            raise LoRAError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
        return DTYPES[dtype]

    def autocast(self, dtype: torch.dtype):
        """Mixed precision around forward + loss; nothing in fp32."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.name, dtype=dtype)

    def mark_step(self) -> None:
        """Graph boundary for lazy-mode devices; CPU and CUDA run eagerly, so nothing to do."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Device-specific wrapping after the model is on the device (graph capture, compile)."""
        return model

    def make_optimizer(self, params, lr: float, betas: tuple[float, float], eps: float,
                       weight_decay: float) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Clip the global L2 norm of the grads to `max_norm` (≤ 0: no clipping); returns the norm before."""
        params = [p for p in params if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def rng_state(self) -> dict:
        """RNG states to checkpoint: torch's CPU generator plus this device's."""
        state = {"cpu": torch.get_rng_state()}
        if self.name == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.torch_device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.name == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.torch_device)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)       # also seeds every CUDA device

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize(self.torch_device)


def resolve_device(name: str = "auto", local_rank: int = 0) -> Device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'; `local_rank` picks the GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return Device("cpu", torch.device("cpu"), dist_backend="gloo")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LoRAError("--device cuda: no CUDA device is available (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise LoRAError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        return Device("cuda", torch.device("cuda", local_rank), dist_backend="nccl")
    raise LoRAError(f"--device must be auto, cpu or cuda, got {name!r}")
