"""What an analysis writes: report.json (a fixed shape, for scripts), report.md, the figures, and
the summary table printed on stdout; and where it may write them.

report.json:
    {"adapter": str, "base": str | null, "compare": str | null,
     "modules": {module: {"r", "scaling", "delta_norm", "singular_values" (descending, length r),
                          "stable_rank", "effective_rank",
                          "relative_norm", "amplification"}},      # null without a base
     "similarity": {module: {"A": [[φ(i, j) for j ≤ r₂] for i ≤ r₁], "B": [[…]]}}}   # {} without compare

The output directory is written whole or not at all (lora.storage.atomic.atomic_dir), and only
where that cannot touch an input: never inside the adapter, the base or the compared adapter, never
over a directory that holds an input, and never over a directory that is not an earlier analysis.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ..errors import LoRAError
from ..storage.atomic import atomic_dir
from ..storage.lock import OutputLock
from .analyze import Analysis
from .curves import Curves
from .factors import kind_order, layer_and_kind
from .similarity import random_similarity

JSON_NAME, MD_NAME = "report.json", "report.md"


# -- report.json ----------------------------------------------------------------------------------
def report_json(analysis: Analysis) -> dict:
    """The report in exactly the documented shape (plain floats, lists, None)."""
    modules = {}
    for name, m in analysis.modules.items():
        modules[name] = {
            "r": m.r, "scaling": m.scaling, "delta_norm": m.delta_norm, "singular_values": m.singular_values,
            "stable_rank": m.stable_rank, "effective_rank": m.effective_rank,
            "relative_norm": m.base.relative_norm if m.base else None,
            "amplification": m.base.amplification if m.base else None,
        }
    similarity = {name: {k: phi.tolist() for k, phi in s.items()} for name, s in analysis.similarity.items()}
    return {"adapter": analysis.adapter, "base": analysis.base, "compare": analysis.compare,
            "modules": modules, "similarity": similarity}


# -- tables ---------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """Aligned columns (numbers: 4 significant digits; None: '-'); a Markdown table when asked."""
    cells = [[_cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:          # first column (names) to the left, numbers to the right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers)] + [line(r) for r in cells])


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _phi_corners(phi) -> tuple[float, float, float]:
    """φ(1, 1), φ(k, k) with k = min(r₁, r₂), and φ(r₁, r₂)."""
    k = min(phi.shape)
    return phi[0, 0].item(), phi[k - 1, k - 1].item(), phi[-1, -1].item()


def summary_table(analysis: Analysis) -> str:
    """One row per projection kind, averaged over its layers (the stdout table)."""
    groups: dict[str, list[str]] = {}
    for name in analysis.modules:
        groups.setdefault(layer_and_kind(name)[1], []).append(name)
    headers = ["module", "n", "r", "|dW|_F", "sigma_1", "stable rank", "eff. rank"]
    if analysis.base is not None:
        headers += ["|dW|/|W|", "amplification"]
    if analysis.compare is not None:
        headers += ["phi_A(1,1)", "phi_B(1,1)"]
    rows = []
    for kind in sorted(groups, key=kind_order):
        ms = [analysis.modules[n] for n in groups[kind]]
        ranks = sorted({m.r for m in ms})
        row = [kind, len(ms), str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
               _mean(m.delta_norm for m in ms), _mean(m.singular_values[0] for m in ms),
               _mean(m.stable_rank for m in ms), _mean(m.effective_rank for m in ms)]
        if analysis.base is not None:
            row += [_mean(m.base.relative_norm for m in ms), _mean(m.base.amplification for m in ms)]
        if analysis.compare is not None:
            row += [_mean(analysis.similarity[n][k][0, 0].item() for n in groups[kind]) for k in "AB"]
        rows.append(row)
    return format_table(headers, rows)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def module_tables(analysis: Analysis) -> str:
    """The per-module Markdown tables of report.md: spectra, then Table 7, then φ."""
    ms = analysis.modules
    parts = ["### ΔW = scaling · B A, per module\n", format_table(
        ["module", "r", "scaling", "‖ΔW‖_F", "σ₁", "σ_r", "stable rank", "effective rank"],
        [[n, m.r, m.scaling, m.delta_norm, m.singular_values[0], m.singular_values[-1], m.stable_rank,
          m.effective_rank] for n, m in ms.items()], markdown=True)]
    if analysis.base is not None:
        parts += ["\n### Against the base (the LoRA paper's Table 7)\n",
                  "‖Uᵀ W V‖_F for U, V (k = r) taken from ΔW, from W's own top-r singular directions "
                  "(randomized SVD), and at random (seeded; its expectation is r ‖W‖_F / √(out · in)). "
                  "Amplification = ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V from ΔW.\n",
                  format_table(["module", "‖W‖_F", "‖ΔW‖_F", "‖ΔW‖/‖W‖", "ΔW dirs", "W top-r", "random",
                                "random (expected)", "amplification"],
                               [[n, m.base.weight_norm, m.base.delta_norm, m.base.relative_norm,
                                 m.base.delta_directions, m.base.weight_directions, m.base.random_directions,
                                 m.base.random_expected, m.base.amplification] for n, m in ms.items()],
                               markdown=True)]
    if analysis.compare is not None:
        rows = []
        for n, s in analysis.similarity.items():
            r1, r2 = s["A"].shape
            n_out, n_in = ms[n].shape
            rows.append([n, f"{r1} × {r2}", *_phi_corners(s["A"]), random_similarity(r1, r2, n_in)[-1, -1].item(),
                         *_phi_corners(s["B"]), random_similarity(r1, r2, n_out)[-1, -1].item()])
        parts += ["\n### Subspace similarity with the compared adapter\n",
                  "φ(i, j) = ‖U₁^{(i)ᵀ} U₂^{(j)}‖²_F / min(i, j), k = min(r₁, r₂). Random subspaces of "
                  "R^n give E φ(i, j) = max(i, j) / n (the 'random' columns, at (r₁, r₂)).\n",
                  format_table(["module", "r₁ × r₂", "φ_A(1,1)", "φ_A(k,k)", "φ_A(r₁,r₂)", "random",
                                "φ_B(1,1)", "φ_B(k,k)", "φ_B(r₁,r₂)", "random"], rows, markdown=True)]
    return "\n".join(parts)


def curves_table(curves: Curves, markdown: bool = False) -> str:
    return format_table(["series", "points", "first", "last", "min"], [list(r) for r in curves.summary()], markdown)


# -- report.md ------------------------------------------------------------------------------------
def report_markdown(analysis: Analysis | None, curves: Curves | None, figures: list[str], note: str | None) -> str:
    lines = ["# LoRA analysis", ""]
    if analysis is not None:
        lines += [f"- adapter: `{analysis.adapter}`", f"- base: `{analysis.base}`" if analysis.base else "- base: none",
                  f"- compare: `{analysis.compare}`" if analysis.compare else "- compare: none",
                  "", "## Summary (mean over layers, per projection)", "", "```", summary_table(analysis), "```", ""]
    if curves is not None:
        lines += [f"## Training curves of `{curves.run}`", "", curves_table(curves, markdown=True), ""]
    if figures or note:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + ([note] if note else []) + [""]
    if analysis is not None:
        lines += ["## Per module", "", module_tables(analysis), ""]
    return "\n".join(lines)


# -- the output directory -------------------------------------------------------------------------
def default_out(source: str | os.PathLike) -> Path:
    """Beside the adapter (or run), never inside it: runs/r8/adapter -> runs/r8/adapter-analysis."""
    source = Path(source).resolve()
    return source.parent / f"{source.name}-analysis"


def check_out(out: str | os.PathLike, inputs: list, run: str | os.PathLike | None = None) -> None:
    """A one-line LoRAError when writing `out` whole could harm an input: `out` may not be or lie
    inside one of `inputs` (adapters, base), may not hold one of them or the `run` directory (the
    output may lie inside a run), and an existing `out` must be an earlier analysis (with report.md)."""
    out_path = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out_path == src or src in out_path.parents:
            raise LoRAError(f"--out {out} is inside the input {src}; write the analysis beside it instead")
    for src in [*inputs, *([run] if run is not None else [])]:
        src = Path(src).resolve()
        if out_path == src or out_path in src.parents:
            raise LoRAError(f"--out {out} holds the input {src}; replacing it would delete the input")
    if out_path.exists() and not (out_path.is_dir() and (out_path / MD_NAME).is_file()):
        raise LoRAError(f"--out {out} exists and is not an earlier analysis (no {MD_NAME}); "
                        f"choose another directory")


def write_report(out: str | os.PathLike, analysis: Analysis | None,
                 curves: Curves | None) -> tuple[list[str], str | None]:
    """Write report.json (with an analysis), report.md and the figures into `out`, replacing an earlier
    analysis whole (check_out first). Returns (file names written, a note when the figures could not
    be drawn)."""
    from . import figures
    inputs = [] if analysis is None else [p for p in (analysis.adapter, analysis.base, analysis.compare) if p]
    check_out(out, inputs, curves.run if curves is not None else None)
    note = None if figures.available() else figures.PLOT_HINT
    with OutputLock(out), atomic_dir(out) as tmp:
        drawn = [] if note else figures.draw_all(analysis, curves, tmp)
        names = []
        if analysis is not None:
            text = json.dumps(report_json(analysis), indent=1, allow_nan=False)
            (tmp / JSON_NAME).write_text(text + "\n")
            names.append(JSON_NAME)
        (tmp / MD_NAME).write_text(report_markdown(analysis, curves, drawn, note))
        names += [MD_NAME, *drawn]
    return names, note
