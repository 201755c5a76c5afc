"""The analysis' figures, drawn with matplotlib (the optional extra `plot`, imported here only).

    norms.png           layers × projections heat map of ‖ΔW‖_F / ‖W‖_F (‖ΔW‖_F without a base)
    spectra.png         ΔW's singular values, one panel per projection, one line per layer
    similarity.png      φ heat maps as in the LoRA paper's Figure 3 (q_proj and v_proj of the middle
                        layer: full i × j and the top 8 × 8 corner, for A and B); with compare
    similarity_map.png  layers × projections heat maps of φ_A(1, 1) and φ_B(1, 1); with compare
    curves.png          training loss with eval loss, learning rate, tokens/s; with a run

matplotlib's object API (Figure, no pyplot): nothing global changes, no display is needed.
"""
from __future__ import annotations

from pathlib import Path

from .analyze import Analysis
from .curves import Curves
from .factors import kind_order, layer_and_kind

PLOT_HINT = 'figures need matplotlib: pip install -e ".[plot]"'
DPI = 80
ZOOM = 8          # the top-left corner shown beside each full φ map, as in the paper's Figure 3


def available() -> bool:
    """Whether matplotlib can be imported (it is an optional extra)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def draw_all(analysis: Analysis | None, curves: Curves | None, out_dir: Path) -> list[str]:
    """Draw every figure that applies into `out_dir`; their file names."""
    jobs = []
    if analysis is not None:
        jobs += [("norms.png", norm_map), ("spectra.png", spectra)]
        if analysis.similarity:
            jobs += [("similarity.png", similarity_panels), ("similarity_map.png", similarity_map)]
    names = [name for name, draw in jobs if draw(analysis, out_dir / name)]
    if curves is not None:
        training_curves(curves, out_dir / "curves.png")
        names.append("curves.png")
    return names


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _grid(modules) -> tuple[list[int], list[str], dict[str, tuple[int, int]]]:
    """Rows (layers), columns (projection kinds) and each layered module's cell."""
    cells = {m: layer_and_kind(m) for m in modules}
    cells = {m: lk for m, lk in cells.items() if lk[0] is not None}
    layers = sorted({l for l, _ in cells.values()})
    kinds = sorted({k for _, k in cells.values()}, key=kind_order)
    return layers, kinds, {m: (layers.index(l), kinds.index(k)) for m, (l, k) in cells.items()}


def _grid_height(layers: list[int]) -> float:
    """Inches for a layers × projections map: a row of text per layer, up to a page's worth."""
    return min(1.5 + 0.3 * len(layers), 6.0)


def _heat(fig, ax, values: dict[str, float], title: str, vmin=None, vmax=None, cmap="viridis") -> None:
    """One layers × projections heat map of {module: value}, annotated when it is small."""
    import numpy as np
    layers, kinds, cells = _grid(values)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for m, (i, j) in cells.items():
        grid[i, j] = values[m]
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers if len(layers) <= 16 else [l if l % 4 == 0 else "" for l in layers])
    ax.set_ylabel("layer")
    ax.set_title(title)
    if grid.size <= 64:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):                   # dark text on the bright end of the colour map
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="k" if im.norm(v) > 0.6 else "w")
    fig.colorbar(im, ax=ax)


def norm_map(analysis: Analysis, path: Path) -> bool:
    if analysis.base is not None:
        values, title = {m: a.base.relative_norm for m, a in analysis.modules.items()}, "‖ΔW‖_F / ‖W‖_F"
    else:
        values, title = {m: a.delta_norm for m, a in analysis.modules.items()}, "‖ΔW‖_F"
    values = {m: v for m, v in values.items() if v is not None}
    layers, kinds, _ = _grid(values)
    if not layers:
        return False
    fig = _figure(1.0 + 0.8 * len(kinds), _grid_height(layers))
    _heat(fig, fig.subplots(), values, title)
    fig.savefig(path)
    return True


def spectra(analysis: Analysis, path: Path) -> bool:
    from matplotlib import colormaps
    groups: dict[str, list[tuple[int | None, str]]] = {}
    for m in analysis.modules:
        layer, kind = layer_and_kind(m)
        groups.setdefault(kind, []).append((layer, m))
    kinds = sorted(groups, key=kind_order)
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig = _figure(2.6 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds):
        members = groups[kind]
        for n, (_, m) in enumerate(members):
            s = [v for v in analysis.modules[m].singular_values if v > 0]
            ax.semilogy(range(1, len(s) + 1), s, color=colormaps["viridis"](n / max(1, len(members) - 1)), lw=1)
        ax.set_title(kind)
        ax.set_xlabel("i")
    axes[0].set_ylabel("σ_i of ΔW")
    if len(groups[kinds[0]]) <= 8:
        axes[0].legend([f"layer {l}" if l is not None else m for l, m in groups[kinds[0]]], fontsize=6)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    fig.savefig(path)
    return True


def _figure3_modules(analysis: Analysis) -> list[str]:
    """q_proj and v_proj of the middle layer (the paper shows layer 48 of 96), else the first module."""
    layers, _, _ = _grid(analysis.similarity)
    if layers:
        mid = layers[len(layers) // 2]
        picked = [m for m in analysis.similarity if layer_and_kind(m) in ((mid, "q_proj"), (mid, "v_proj"))]
        if picked:
            return picked
    return [next(iter(analysis.similarity))]


def similarity_panels(analysis: Analysis, path: Path) -> bool:
    modules = _figure3_modules(analysis)
    fig = _figure(12, 2.6 * len(modules))
    axes = fig.subplots(len(modules), 4, squeeze=False)
    for row, m in zip(axes, modules):
        for (ax_full, ax_zoom), which in zip((row[:2], row[2:]), "AB"):
            phi = analysis.similarity[m][which].numpy()
            for ax, shown, label in ((ax_full, phi, ""), (ax_zoom, phi[:ZOOM, :ZOOM], f" (top {ZOOM})")):
                im = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                               extent=(0.5, shown.shape[1] + 0.5, shown.shape[0] + 0.5, 0.5))
                ax.set_title(f"{m.removeprefix('model.')}: φ_{which}{label}", fontsize=8)
                ax.set_xlabel("j (compared adapter)")
                ax.set_ylabel("i")
    fig.colorbar(im, ax=axes.ravel().tolist())
    fig.savefig(path)
    return True


def similarity_map(analysis: Analysis, path: Path) -> bool:
    layers, kinds, _ = _grid(analysis.similarity)
    if not layers:
        return False
    fig = _figure(2 * (1.0 + 0.8 * len(kinds)), _grid_height(layers))
    for ax, which in zip(fig.subplots(1, 2), "AB"):
        values = {m: s[which][0, 0].item() for m, s in analysis.similarity.items()}
        _heat(fig, ax, values, f"φ_{which}(1, 1)", vmin=0, vmax=1)
    fig.savefig(path)
    return True


def training_curves(curves: Curves, path: Path) -> None:
    fig = _figure(10, 2.6)
    ax_loss, ax_lr, ax_tok = fig.subplots(1, 3)
    for name, style in (("loss", "-"), ("eval_loss", "o-")):
        points = curves.series.get(name)
        if points:
            ax_loss.plot(*zip(*points), style, label=name, ms=3)
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title("loss")
    for ax, name in ((ax_lr, "lr"), (ax_tok, "tokens_per_s")):
        if curves.series.get(name):
            ax.plot(*zip(*curves.series[name]))
        ax.set_title(name)
    for ax in (ax_loss, ax_lr, ax_tok):
        ax.set_xlabel("step")
    fig.savefig(path)
