"""habana_frameworks.torch.hpex.optimizers.FusedAdamW: eps defaults to 1e-6 (torch's is 1e-8), and the
real one fails on an empty parameter group, which the fake reproduces."""
import torch

from habana_frameworks import record


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **kwargs):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        sizes = [len(list(g["params"])) for g in groups]
        record("FusedAdamW", lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, group_sizes=sizes)
        if any(s == 0 for s in sizes):
            raise RuntimeError("FusedAdamW: empty parameter group")
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def zero_grad(self, set_to_none: bool = True):
        record("FusedAdamW.zero_grad", set_to_none=set_to_none)
        return super().zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        record("FusedAdamW.step")
        return super().step(closure)
