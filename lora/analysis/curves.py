"""A training run's curves from its metrics.jsonl (written by lora/training/run_dir.py's MetricsLog):

    {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}    every log_every steps
    {"step", "eval_loss"}                                           every eval_every steps

A last line cut short (a run killed while writing it) is skipped; any other unreadable line is an error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoRAError
from ..training.run_dir import METRICS_FILE

SERIES = ("loss", "eval_loss", "lr", "tokens_per_s")


@dataclass
class Curves:
    run: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)    # name -> [(step, value)]

    def summary(self) -> list[tuple[str, int, float, float, float]]:
        """(name, points, first, last, min) for each series that has points."""
        return [(name, len(pts), pts[0][1], pts[-1][1], min(v for _, v in pts))
                for name, pts in self.series.items() if pts]


def read_curves(run_dir: str | os.PathLike) -> Curves:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise LoRAError(f"{run_dir}: no {METRICS_FILE} (not a training run directory)")
    lines = path.read_text().splitlines()
    curves = Curves(str(run_dir), {name: [] for name in SERIES})
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == len(lines):
                break
            raise LoRAError(f"{path}:{n}: not a metrics record (a JSON object with a step)") from None
        for name in SERIES:
            if isinstance(record.get(name), (int, float)):
                curves.series[name].append((step, float(record[name])))
    if not any(curves.series.values()):
        raise LoRAError(f"{path}: no loss, eval_loss, lr or tokens_per_s values")
    return curves
