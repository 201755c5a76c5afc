"""Everything device-specific that the training loop and inference call, in one place.

The loop never branches on the device: it calls the hooks below at fixed points (`prepare_model`
once, `autocast()` around forward + loss, `mark_step()` after backward and after the optimizer
step, `make_optimizer`, `clip_grad_norm`, `zero_grad_set_to_none`, `dist_backend`). CPU and CUDA are
implemented here; a Gaudi (HPU) device only has to fill these hooks (lazy-mode `mark_step`, HPU
graphs in `prepare_model`, fused AdamW / clip-norm, `hccl`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass

import torch

from ..core import backend
from ..errors import LoRAError

HPU_MODES = ("lazy", "eager")
# The torch.device HPU tensors live on. Only the tests' recording fake of habana_frameworks points
# this at the CPU (there is no HPU in CI).
HPU_TORCH_DEVICE = torch.device("hpu")

# The --dtype names of every script, and the torch dtype each one means.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        """'auto' or a name in DTYPES -> the compute dtype of the frozen base and of autocast."""
        if dtype == "auto":
            return self.default_dtype()
        if dtype not in DTYPES:
            raise LoRAError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
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
        # fused on CPU and CUDA: one kernel per tensor instead of ~10 ops (CPU's default is a Python
        # loop over tensors); docs/train.md has the time it saves per step.
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=self.name in ("cpu", "cuda") or None)

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

    def prepare_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """Device-specific wrapping of an eval-mode model for generation."""
        return model

    def static_shapes(self) -> bool:
        """Whether every forward must see one of a few fixed shapes (graph-compiled devices)."""
        return False

    def init_process_group(self) -> None:
        import torch.distributed as dist
        dist.init_process_group(backend=self.dist_backend)


def _hpu_module(name: str):
    """Import a habana_frameworks submodule; PT_HPU_LAZY_MODE must be set before the first one."""
    if "PT_HPU_LAZY_MODE" not in os.environ:
        raise RuntimeError("PT_HPU_LAZY_MODE must be set before habana_frameworks is imported "
                           "(lora.runtime.device.set_hpu_mode)")
    return importlib.import_module(name)


def set_hpu_mode(mode: str) -> None:
    """Set PT_HPU_LAZY_MODE (1 = lazy, 0 = eager) *before* any habana_frameworks import: the default
    changed between Gaudi releases (eager since 1.21), so it is always set explicitly."""
    if mode not in HPU_MODES:
        raise LoRAError(f"--hpu-mode must be lazy or eager, got {mode!r}")
    value = "1" if mode == "lazy" else "0"
    if "habana_frameworks.torch" in sys.modules and os.environ.get("PT_HPU_LAZY_MODE") != value:
        raise LoRAError(f"--hpu-mode {mode}: habana_frameworks was already imported with "
                        f"PT_HPU_LAZY_MODE={os.environ.get('PT_HPU_LAZY_MODE')}; set the mode first")
    os.environ["PT_HPU_LAZY_MODE"] = value


def hpu_available() -> bool:
    """True when Habana's PyTorch bridge is installed and sees a Gaudi. Never installs anything."""
    try:
        hpu = _hpu_module("habana_frameworks.torch.hpu")
    except ImportError:
        return False
    return bool(hpu.is_available())


@dataclass
class HPUDevice(Device):
    """Intel Gaudi: lazy mode (+ HPU Graphs) or eager mode (+ torch.compile), fused AdamW and clip-norm.

    Built from Habana's documented API and checked against a recording fake (tests/fake_habana); it
    has not run on Gaudi hardware yet.
    """

    mode: str = "lazy"          # PT_HPU_LAZY_MODE=1 ("lazy") or 0 ("eager")
    hpu_graphs: bool = True     # ModuleCacher for training, wrap_in_hpu_graph for inference (lazy only)
    max_graphs: int = 10

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type="hpu", dtype=dtype)

    def mark_step(self) -> None:
        """Lazy mode: flush the accumulated ops as one graph. Eager mode runs op by op: nothing."""
        if self.mode == "lazy":
            _hpu_module("habana_frameworks.torch.core").mark_step()

    def static_shapes(self) -> bool:
        return True

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Training: HPU Graphs via ModuleCacher in lazy mode (applied to the bare model, before any
        DDP wrapper; grads are then zeroed in place), torch.compile(backend="hpu_backend") in eager."""
        backend.set_graph_safe(True)
        if self.mode == "lazy" and self.hpu_graphs:
            ht = _hpu_module("habana_frameworks.torch")
            model = ht.hpu.ModuleCacher(max_graphs=self.max_graphs)(model=model, inplace=True)
        elif self.mode == "eager":
            model = torch.compile(model, backend="hpu_backend")
        return model

    def prepare_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        backend.set_graph_safe(True)
        if self.mode == "lazy" and self.hpu_graphs:
            model = _hpu_module("habana_frameworks.torch.hpu").wrap_in_hpu_graph(model)
        elif self.mode == "eager":
            model = torch.compile(model, backend="hpu_backend")
        return model

    def make_optimizer(self, params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
        """Habana's FusedAdamW when present. Its eps defaults to 1e-6 (torch: 1e-8), so ours is passed
        explicitly; it fails on an empty parameter group, so only trainable params are given."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise LoRAError("no trainable parameters to optimise")
        try:
            FusedAdamW = _hpu_module("habana_frameworks.torch.hpex.optimizers").FusedAdamW
        except (ImportError, AttributeError):
            return super().make_optimizer(params, lr, betas, eps, weight_decay)
        return FusedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        if max_norm > 0:
            try:
                FusedClipNorm = _hpu_module("habana_frameworks.torch.hpex.normalization").FusedClipNorm
            except (ImportError, AttributeError):
                return torch.nn.utils.clip_grad_norm_(params, max_norm)
            return FusedClipNorm(params, max_norm).clip_norm(params)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def rng_state(self) -> dict:
        """torch's CPU generator plus the HPU's, which graph-safe LoRA dropout draws from."""
        return {"cpu": torch.get_rng_state(), "hpu": self._random().get_rng_state()}

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "hpu" in state:
            self._random().set_rng_state(state["hpu"])

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._random().manual_seed(seed)

    @staticmethod
    def _random():
        """habana_frameworks.torch.hpu.random: get_rng_state / set_rng_state / manual_seed."""
        return _hpu_module("habana_frameworks.torch.hpu").random

    def synchronize(self) -> None:
        _hpu_module("habana_frameworks.torch.hpu").synchronize()

    def init_process_group(self) -> None:
        _hpu_module("habana_frameworks.torch.distributed.hccl")     # registers the "hccl" backend
        super().init_process_group()


def resolve_device(name: str = "auto", local_rank: int = 0, hpu_mode: str = "lazy",
                   hpu_graphs: bool | None = None, max_graphs: int = 10) -> Device:
    """'auto' (HPU when habana_frameworks sees a Gaudi, else CUDA when available, else CPU), 'cpu',
    'cuda' or 'hpu'; `local_rank` picks the GPU under torchrun. On HPU, `hpu_mode` is applied before
    any habana import, and HPU Graphs default to on in lazy mode (they need it)."""
    if name == "hpu" or (name == "auto" and "PT_HPU_LAZY_MODE" not in os.environ):
        set_hpu_mode(hpu_mode)         # before the first habana import, which `auto` may do below
    if name == "auto":
        name = "hpu" if hpu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "hpu":
        if not hpu_available():
            raise LoRAError("--device hpu: habana_frameworks is not installed or sees no Gaudi")
        if hpu_graphs and hpu_mode != "lazy":
            raise LoRAError("--hpu-graphs needs --hpu-mode lazy (HPU Graphs do not run in eager mode)")
        graphs = hpu_mode == "lazy" if hpu_graphs is None else hpu_graphs
        return HPUDevice("hpu", HPU_TORCH_DEVICE, dist_backend="hccl", zero_grad_set_to_none=not graphs,
                         mode=hpu_mode, hpu_graphs=graphs, max_graphs=max_graphs)
    if name == "cpu":
        return Device("cpu", torch.device("cpu"), dist_backend="gloo")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LoRAError("--device cuda: no CUDA device is available (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise LoRAError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        return Device("cuda", torch.device("cuda", local_rank), dist_backend="nccl")
    raise LoRAError(f"--device must be auto, cpu, cuda or hpu, got {name!r}")
