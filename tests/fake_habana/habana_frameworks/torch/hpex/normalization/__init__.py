"""habana_frameworks.torch.hpex.normalization.FusedClipNorm(params, max_norm).clip_norm(params)."""
import torch

from habana_frameworks import record


class FusedClipNorm:
    def __init__(self, parameters, max_norm: float):
        self.max_norm = float(max_norm)
        record("FusedClipNorm", max_norm=self.max_norm)

    def clip_norm(self, parameters):
        record("FusedClipNorm.clip_norm")
        params = [p for p in parameters if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.max_norm)
