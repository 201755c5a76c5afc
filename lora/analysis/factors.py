"""An adapter's factors, module by module: A, B and the scaling of ΔW = scaling · B A, checked.

Reads any PEFT-format LoRA adapter (ours or PEFT's): `base_model.model.<module>.lora_A.weight` (r, in)
and `…lora_B.weight` (out, r), with r and the scaling from adapter_config.json (rank_pattern,
alpha_pattern and rsLoRA included). Tensors keep their stored dtype; the analyses work in float64.
Also here: the module-name helpers every report and figure orders and groups by (layer, projection).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import LLAMA_TARGETS
from ..errors import LoRAError
from ..storage.adapter import PREFIX, read_adapter_config, read_adapter_tensors

_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:.*\.)?([^.]+)$")


@dataclass
class Factors:
    """One module's update ΔW = scaling · lora_B @ lora_A, never formed here."""
    lora_A: torch.Tensor      # (r, in), as stored
    lora_B: torch.Tensor      # (out, r)
    scaling: float

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape (out, in), which is the base weight's."""
        return self.lora_B.shape[0], self.lora_A.shape[1]


def module_order(name: str) -> tuple:
    """Sort key for the model's order: layers by number (2 before 10), in a layer q k v o gate up
    down, then modules outside the layers by name."""
    layer, kind = layer_and_kind(name)
    natural = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))
    return (layer is None, layer or 0, kind_order(kind), natural)


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'q_proj'); (None, last part) outside a layer list."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name.rsplit(".", 1)[-1])


def kind_order(kind: str) -> tuple[int, str]:
    """Llama's projections in the model's order (q k v o gate up down), then any others by name."""
    return (LLAMA_TARGETS.index(kind), "") if kind in LLAMA_TARGETS else (len(LLAMA_TARGETS), kind)


def read_factors(adapter_dir: str | os.PathLike) -> dict[str, Factors]:
    """{module name as in the model: Factors}, in layer order; a one-line LoRAError for anything
    that is not a LoRA adapter whose tensors agree with its config."""
    if not Path(adapter_dir).is_dir():
        raise LoRAError(f"{adapter_dir}: not a directory (expected an adapter directory)")
    config = read_adapter_config(adapter_dir)
    if config.use_dora:
        raise LoRAError(f"{adapter_dir}: a DoRA adapter (use_dora): these analyses study ΔW = s·B A, and a DoRA "
                        "update also rescales each row by its lora_magnitude_vector, which they do not cover")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_adapter_tensors(adapter_dir).items():
        m = _KEY.match(key)
        if m is None:
            raise LoRAError(f"{adapter_dir}: unexpected tensor {key} (expected {PREFIX}<module>.lora_A/B.weight)")
        if t.ndim != 2 or not t.is_floating_point():
            raise LoRAError(f"{adapter_dir}: {key} must be a 2-D float tensor, got {t.dtype} {tuple(t.shape)}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise LoRAError(f"{adapter_dir}: the adapter holds no LoRA tensors")
    factors = {}
    for module in sorted(pairs, key=module_order):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{adapter_dir}: {module} has no lora_{'B' if 'A' in ab else 'A'}.weight")
        r = config.rank_for(module)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise LoRAError(f"{adapter_dir}: {module} has lora_A {tuple(ab['A'].shape)} and lora_B "
                            f"{tuple(ab['B'].shape)}, but its config says r = {r}")
        factors[module] = Factors(ab["A"], ab["B"], config.scaling_for(module))
    return factors
