"""One adapter analysed module by module: what report.json holds, computed in float64.

    analyze_adapter(adapter)                      ΔW's norm, singular values, stable / effective rank
    analyze_adapter(adapter, base=DIR)            + ‖ΔW‖_F / ‖W‖_F and Table 7 (amplification.py)
    analyze_adapter(adapter, compare=DIR)         + φ for lora_A and lora_B (similarity.py)

Every input is read and checked (configs, tensor shapes, the base's headers) before any module is
analysed, so bad input costs a one-line LoRAError and no work. The base is streamed (base.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import LoRAError
from ..runtime.progress import Progress
from .amplification import BaseMeasures, base_measures
from .base import BaseWeights
from .factors import read_factors
from .similarity import adapter_similarity
from .spectrum import delta_svd, effective_rank, stable_rank


@dataclass
class ModuleAnalysis:
    shape: tuple[int, int]                # ΔW's (out, in), the base weight's
    r: int
    scaling: float
    singular_values: list[float]          # of ΔW, descending, length r
    delta_norm: float                     # ‖ΔW‖_F
    stable_rank: float
    effective_rank: float
    base: BaseMeasures | None = None      # with a base


@dataclass
class Analysis:
    adapter: str
    base: str | None
    compare: str | None
    modules: dict[str, ModuleAnalysis]                                          # layer order
    similarity: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # {module: {"A", "B": (r1, r2)}}


def analyze_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None,
                    compare: str | os.PathLike | None = None, progress: bool = False) -> Analysis:
    """Analyse every module of `adapter`; with `base` (a checkpoint directory) and `compare` (a second
    adapter on the same modules) the measures that need them. `progress`: a bar on stderr."""
    factors = read_factors(adapter)
    other = read_factors(compare) if compare is not None else {}
    for module, f in factors.items():
        if compare is not None and module not in other:
            raise LoRAError(f"{compare}: has no {module} (the adapters to compare must adapt the same modules)")
        if module in other and other[module].shape != f.shape:
            raise LoRAError(f"{compare}: {module} has ΔW of shape {other[module].shape} but {adapter} has {f.shape}")
    weights = BaseWeights(base, {m: f.shape for m, f in factors.items()}) if base is not None else None

    bar = Progress(len(factors), "analyze", "module", enabled=progress)
    results, similarity = {}, {}
    for module, W in (iter(weights) if weights is not None else ((m, None) for m in factors)):
        f = factors[module]
        spectrum = delta_svd(f.lora_A, f.lora_B, f.scaling)
        results[module] = ModuleAnalysis(
            shape=f.shape, r=f.r, scaling=f.scaling, singular_values=spectrum.S.tolist(), delta_norm=spectrum.norm,
            stable_rank=stable_rank(spectrum.S), effective_rank=effective_rank(spectrum.S),
            base=base_measures(W, spectrum) if W is not None else None)
        if module in other:
            similarity[module] = adapter_similarity(f.lora_A, f.lora_B, other[module].lora_A, other[module].lora_B)
        bar.update()
    bar.close()
    order = list(factors)                 # layer order, whatever order the base was read in
    return Analysis(str(adapter), None if base is None else str(base), None if compare is None else str(compare),
                    {m: results[m] for m in order}, {m: similarity[m] for m in order if m in similarity})
