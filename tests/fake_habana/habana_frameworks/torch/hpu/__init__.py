"""habana_frameworks.torch.hpu: availability, HPU Graphs for inference and training."""
import os

import torch

from habana_frameworks import record

from . import random  # noqa: E402,F401  (habana_frameworks.torch.hpu.random)


def is_available() -> bool:
    record("hpu.is_available")
    return True


def device_count() -> int:
    return int(os.environ.get("FAKE_HPU_COUNT", "1"))


def current_device() -> int:
    return 0


def synchronize() -> None:
    record("hpu.synchronize")


def wrap_in_hpu_graph(module: torch.nn.Module, asynchronous: bool = False, disable_tensor_cache: bool = False,
                      **kwargs) -> torch.nn.Module:
    """Inference HPU graphs; returns the module. The fake records the shapes it is called with."""
    record("wrap_in_hpu_graph", module=type(module).__name__, lazy=os.environ.get("PT_HPU_LAZY_MODE"))
    _record_shapes(module, "hpu_graph_forward")
    return module


class ModuleCacher:
    """Training HPU graphs: ModuleCacher(max_graphs=N)(model=model, inplace=True)."""

    def __init__(self, max_graphs: int = 10):
        self.max_graphs = max_graphs

    def __call__(self, model: torch.nn.Module, inplace: bool = True, **kwargs) -> torch.nn.Module:
        record("ModuleCacher", max_graphs=self.max_graphs, inplace=inplace, module=type(model).__name__,
               lazy=os.environ.get("PT_HPU_LAZY_MODE"),
               ddp=isinstance(model, torch.nn.parallel.DistributedDataParallel))
        _record_shapes(model, "cached_forward")
        return model


def _record_shapes(module: torch.nn.Module, name: str) -> None:
    """Record the tensor shapes of every forward call (static shapes are the point of HPU graphs)."""
    def hook(mod, args, kwargs):
        shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        shapes.update({i: tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)})
        record(name, shapes=shapes)
    module.register_forward_pre_hook(hook, with_kwargs=True)
