"""PNG plots next to a compression report: spectra with the chosen ranks, rank allocation, quality vs ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["write_plots", "plot_spectra", "plot_allocation", "plot_quality_vs_ratio"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(spectra: Mapping[str, tuple[Any, int]], path: Path, *, max_panels: int = 7) -> Path | None:
    """Normalised spectra (log scale) per linear role, every layer one line, the kept rank marked."""
    if not spectra:
        return None
    plt = _pyplot()
    roles = sorted({name.split(".", 1)[1] for name in spectra})[:max_panels]
    fig, axes = plt.subplots(1, len(roles), figsize=(3.2 * len(roles), 3.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    layers = sorted({int(name.split(".", 1)[0]) for name in spectra})
    for ax, role in zip(axes[0], roles):
        for layer in layers:
            item = spectra.get(f"{layer}.{role}")
            if item is None:
                continue
            s, rank = np.asarray(item[0], dtype=float), int(item[1])
            s = s / s.sum() if s.sum() > 0 else s
            color = cmap(layer / max(1, len(layers) - 1))
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), color=color, lw=0.8)
            if 0 < rank <= len(s):
                ax.plot(rank, max(s[rank - 1], 1e-12), "o", color=color, ms=3)
        ax.set_title(role)
        ax.set_xlabel("component")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of energy (dot: kept rank)")
    fig.suptitle("Whitened spectra per layer (dark: first layer, light: last)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_allocation(ranks: Mapping[str, Any], shapes: Mapping[str, int] | None, path: Path) -> Path | None:
    """Kept rank per layer and role (dense linears drawn at their full width)."""
    numeric = {k: v for k, v in ranks.items() if isinstance(v, (int, float)) or v == "dense"}
    if not numeric or not all("." in k for k in numeric):
        return None
    plt = _pyplot()
    roles = sorted({k.split(".", 1)[1] for k in numeric})
    layers = sorted({int(k.split(".", 1)[0]) for k in numeric})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for role in roles:
        ys = []
        for layer in layers:
            v = numeric.get(f"{layer}.{role}")
            full = (shapes or {}).get(role, np.nan)
            ys.append(full if v == "dense" else (np.nan if v is None else v))
        ax.plot(layers, ys, marker="o", ms=3, label=role)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept rank")
    ax.set_title("Rank allocation (dense layers at full rank)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality_vs_ratio(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *,
                          dense: float | None = None, ylabel: str = "perplexity") -> Path:
    """One line per method: quality against the fraction of parameters removed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot([100 * x for x in xs], ys, marker="o", label=name)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("decoder-linear parameters removed (%)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report, folder: Path) -> list[Path]:
    """Spectra and allocation plots for a :class:`~lrmath_hf.pipeline.CompressionReport`."""
    folder = Path(folder)
    shapes = None
    written = [plot_spectra(report.spectra, folder / "spectra.png"),
               plot_allocation(report.ranks, shapes, folder / "ranks.png")]
    return [p for p in written if p is not None]
