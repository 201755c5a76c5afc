"""What a merge will add to which weight, read from the adapters' headers alone.

    adapter key  base_model.model.<module>.lora_{A,B}.weight   →   checkpoint tensor <module>.weight
                 base_model.model.<module>.lora_magnitude_vector    (DoRA's m, when use_dora)

`plan_updates` checks every adapter against the base (keys, pairs, dtypes, shapes against `r` and
`rank_pattern`) from the headers, then reads each A and B once, one at a time, to refuse non-finite
values before anything is written; an `Update` reads its A and B again when its weight comes up.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.delta import Term
from ..errors import LoRAError
from ..storage.adapter import PREFIX, WEIGHTS_NAME, check_finite, read_adapter_config, weights_path
from ..storage.safetensors_stream import FLOAT_NAMES, Entry, read_shard_header, read_tensor

_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.(?:lora_([AB])\.weight|lora_(magnitude)_vector)$")


@dataclass
class Update:
    """Where a Term's tensors live: read from the adapter file only when their weight is merged, so
    the adapter (which grows with the layers, too) is never held whole."""
    path: Path
    lora_A: Entry
    lora_B: Entry
    scaling: float
    weight: float
    magnitude: Entry | None = None      # DoRA's m (out,)

    def load(self, fd: int) -> Term:
        A, B = (read_tensor(fd, e, self.path) for e in (self.lora_A, self.lora_B))
        m = None if self.magnitude is None else read_tensor(fd, self.magnitude, self.path)
        return Term(A, B, self.scaling, self.weight, m)

    def check_finite(self) -> None:
        """A one-line error naming the tensor when A, B or m holds NaN or ±inf."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            term = self.load(fd)
        finally:
            os.close(fd)
        for e, t in ((self.lora_A, term.lora_A), (self.lora_B, term.lora_B), (self.magnitude, term.magnitude)):
            if e is not None:
                check_finite(t, e.name, str(self.path))


def plan_updates(adapter_dirs: list[Path], weights: list[float],
                 base: dict[str, Entry]) -> dict[str, list[Update]]:
    """{checkpoint tensor name: updates in adapter order}; every mismatch is a one-line LoRAError.
    Only headers are read here: shapes and dtypes are checked before any tensor is."""
    plan: dict[str, list[Update]] = {}
    for adapter_dir, w in zip(adapter_dirs, weights):
        config = read_adapter_config(adapter_dir)
        if config.use_dora and (len(adapter_dirs) > 1 or w != 1.0):
            raise LoRAError(f"{adapter_dir}: a weighted or multi-adapter merge including a DoRA adapter is "
                            "undefined; merge a DoRA adapter alone with weight 1")
        path = weights_path(adapter_dir)
        pairs: dict[str, dict[str, Entry]] = {}
        for t in sorted(read_shard_header(path).entries, key=lambda t: t.name):
            m = _KEY.match(t.name)
            if m is None:
                raise LoRAError(f"{adapter_dir}: unexpected key {t.name} (expected {PREFIX}<module>.lora_A/B.weight)")
            which = m.group(2) or m.group(3)
            if which == "magnitude" and not config.use_dora:
                raise LoRAError(f"{adapter_dir}: {t.name} is a DoRA magnitude but adapter_config.json has no use_dora")
            pairs.setdefault(m.group(1), {})[which] = t
        if not pairs:
            raise LoRAError(f"{adapter_dir}: {WEIGHTS_NAME} holds no LoRA tensors")
        for module, ab in pairs.items():
            magnitude = ab.pop("magnitude", None)
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise LoRAError(f"{adapter_dir}: {module} has no {missing}.weight")
            if config.use_dora and magnitude is None:
                raise LoRAError(f"{adapter_dir}: {module} has no lora_magnitude_vector (the adapter is DoRA)")
            target = base.get(f"{module}.weight")
            if target is None:
                raise LoRAError(f"{adapter_dir}: target module {module} is not in the base checkpoint "
                                f"(no tensor {module}.weight)")
            lora_A, lora_B = ab["A"], ab["B"]
            for t in (lora_A, lora_B):
                if t.dtype not in FLOAT_NAMES or len(t.shape) != 2:
                    raise LoRAError(f"{adapter_dir}: {t.name} must be a 2-D float tensor, got {t.dtype} {t.shape}")
            if target.dtype not in FLOAT_NAMES or len(target.shape) != 2:
                raise LoRAError(f"{adapter_dir}: base tensor {target.name} is {target.dtype} {target.shape}; "
                                f"only 2-D F32/F16/BF16/F64 weights can be merged into")
            out_f, in_f = target.shape
            r = config.rank_for(module)
            if lora_A.shape != (r, in_f):
                raise LoRAError(f"{adapter_dir}: {lora_A.name} has shape {lora_A.shape} but base weight "
                                f"{target.name} has shape {target.shape} (needs ({r}, {in_f}) at r={r})")
            if lora_B.shape != (out_f, r):
                raise LoRAError(f"{adapter_dir}: {lora_B.name} has shape {lora_B.shape} but base weight "
                                f"{target.name} has shape {target.shape} (needs ({out_f}, {r}) at r={r})")
            if magnitude is not None and (magnitude.dtype not in FLOAT_NAMES or magnitude.shape != (out_f,)):
                raise LoRAError(f"{adapter_dir}: {magnitude.name} must be a float tensor of shape ({out_f},), "
                                f"got {magnitude.dtype} {magnitude.shape}")
            plan.setdefault(target.name, []).append(
                Update(path, lora_A, lora_B, config.scaling_for(module), w, magnitude))
    for updates in plan.values():
        for u in updates:
            u.check_finite()
    return plan
