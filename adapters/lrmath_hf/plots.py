"""PNG plots next to a compression report: spectra with the chosen ranks, rank allocation, quality vs ratio."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["write_plots", "plot_spectra", "plot_allocation", "plot_quality_vs_ratio", "full_ranks"]

_ROLE_ORDER = {r: i for i, r in enumerate(("q", "k", "v", "o", "vo", "gate", "up", "fc1", "down", "fc2", "mlp"))}

# Labels of the per-layer entries of recipes that report one dict per layer (flat, auto).
_LAYER_KEYS = {
    "head_rank": "value head dim kept (all heads)",
    "mlp_channels": "MLP channels kept",
    "kept_fraction": "kept fraction of the layer",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(ax, axis: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def full_ranks(spec) -> dict[str, int]:
    """Full rank of each role of ``spec`` (``min(out, in)``), plus ``vo`` (head dim) and ``mlp`` (width)."""
    out = {}
    for role in spec.roles:
        try:
            out[role] = min(spec.shape(role))
        except KeyError:  # a role the spec cannot size (encoders): drawn without a reference
            continue
    out["vo"] = spec.head_dim
    out["head_rank"] = spec.head_dim
    out["mlp"] = out["mlp_channels"] = spec.intermediate_size
    out["kept_fraction"] = 1
    return out


def plot_spectra(spectra: Mapping[str, tuple[Any, int]], path: Path, *, max_panels: int = 8,
                 columns: int = 4) -> Path | None:
    """Normalised spectra (log scale) per linear role, every layer one line, the kept rank marked."""
    if not spectra or not all("." in name and name.split(".", 1)[0].isdigit() for name in spectra):
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    roles = sorted({name.split(".", 1)[1] for name in spectra}, key=lambda r: (_ROLE_ORDER.get(r, 99), r))
    roles = roles[:max_panels]
    layers = sorted({int(name.split(".", 1)[0]) for name in spectra})
    ncols = min(columns, len(roles))
    nrows = math.ceil(len(roles) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.0, 2.9 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(layers[0], max(layers[-1], layers[0] + 1))
    for k, (ax, role) in enumerate(zip(axes.flat, roles)):
        for layer in layers:
            item = spectra.get(f"{layer}.{role}")
            if item is None:
                continue
            s, rank = np.asarray(item[0], dtype=float), int(item[1])
            s = s / s.sum() if s.sum() > 0 else s
            color = cmap(norm(layer))
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), color=color, lw=0.9)
            if 0 < rank <= len(s):
                ax.plot(rank, max(s[rank - 1], 1e-12), "o", color=color, ms=5, mec="k", mew=0.5)
        ax.set_title(role)
        if k % ncols == 0:
            ax.set_ylabel("share of energy")
        if k + ncols >= len(roles):  # lowest panel of its column
            ax.set_xlabel("component (largest first)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(roles):]:
        ax.set_visible(False)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.03, pad=0.02)
    bar.set_label("layer")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Calibration spectra per layer; dot: last kept component (the chosen rank)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _allocation_by_role(ranks, full, plt, path):
    """Heat map: one row per linear, one column per layer; colour = kept rank / full rank, text = rank."""
    roles = sorted({k.split(".", 1)[1] for k in ranks}, key=lambda r: (_ROLE_ORDER.get(r, 99), r))
    layers = sorted({int(k.split(".", 1)[0]) for k in ranks})
    kept = np.full((len(roles), len(layers)), np.nan)
    text = [["" for _ in layers] for _ in roles]
    for i, role in enumerate(roles):
        for j, layer in enumerate(layers):
            v = ranks.get(f"{layer}.{role}")
            if v == "dense":
                kept[i, j], text[i][j] = 1.0, "D"
            elif v is not None:
                kept[i, j] = float(v) / full[role] if full.get(role) else np.nan
                text[i][j] = f"{int(v)}"
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.42 * len(layers) + 2.5), 24.0), 0.45 * len(roles) + 1.8),
                           layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("0.85")
    image = ax.imshow(np.ma.masked_invalid(kept), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    if len(layers) <= 48:
        size = 8 if len(layers) <= 16 else 6
        for i in range(len(roles)):
            for j in range(len(layers)):
                if text[i][j]:
                    light = np.isnan(kept[i, j]) or kept[i, j] > 0.6
                    ax.text(j, i, text[i][j], ha="center", va="center", fontsize=size,
                            color="black" if light else "white")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    if len(layers) > 32:
        for k, label in enumerate(ax.get_xticklabels()):
            label.set_visible(k % 2 == 0)
    ax.set_yticks(range(len(roles)), [f"{r} (full {full[r]})" if full.get(r) else r for r in roles])
    ax.set_xlabel("layer")
    ax.set_ylabel("linear")
    ax.set_title("Kept rank per layer and linear (D: left dense)")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("kept rank / full rank")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _allocation_by_layer(ranks, full, plt, path):
    layers = sorted(int(k) for k in ranks)
    keys = [k for k in _LAYER_KEYS if any(k in ranks[str(layer)] for layer in layers)]
    keys += sorted({k for layer in layers for k, v in ranks[str(layer)].items()
                    if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ys = [ranks[str(layer)].get(key, np.nan) for layer in layers]
        ax.plot(layers, [np.nan if v is None else float(v) for v in ys], marker="o", ms=5)
        if key in full:
            ax.axhline(full[key], color="k", ls="--", lw=1, label=f"dense ({full[key]})")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(0, max(np.nanmax(np.asarray(ys, dtype=float)), full.get(key, 0)) * 1.08 or 1)
        ax.set_xlabel("layer")
        ax.set_ylabel(_LAYER_KEYS.get(key, key))
        ax.set_title(_LAYER_KEYS.get(key, key))
        _integer_ticks(ax)
        if key != "kept_fraction":
            _integer_ticks(ax, "y")
        ax.grid(alpha=0.3)
    fig.suptitle("Allocation per layer (dashed: dense size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_allocation(ranks: Mapping[str, Any], shapes: Mapping[str, int] | None, path: Path) -> Path | None:
    """Kept rank per layer and role (dense linears drawn at their full rank from ``shapes``).

    ``ranks`` is a report's ``ranks``: ``"layer.role" -> rank or "dense"`` (svd, latent, global),
    or ``"layer" -> {"head_rank": ..., "mlp_channels": ..., ...}`` (flat, auto: one panel per entry).
    ``shapes``: full rank per role or entry (:func:`full_ranks`).
    """
    full = dict(shapes or {})
    if ranks and all(isinstance(v, Mapping) for v in ranks.values()) and all(str(k).isdigit() for k in ranks):
        return _allocation_by_layer({str(k): v for k, v in ranks.items()}, full, _pyplot(), path)
    numeric = {k: v for k, v in ranks.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool)) or v == "dense"}
    if not numeric or not all("." in k and k.split(".", 1)[0].isdigit() for k in numeric):
        return None
    return _allocation_by_role(numeric, full, _pyplot(), path)


def plot_quality_vs_ratio(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *,
                          dense: float | None = None, ylabel: str = "perplexity", title: str | None = None,
                          log: bool | None = None, annotate: bool = True) -> Path:
    """One line per method: quality against the fraction of decoder-linear parameters removed.

    ``curves``: label -> ``[(fraction removed, value), ...]``; ``dense``: a horizontal reference;
    ``log``: logarithmic y axis (default: when the values span more than a factor 4).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    values = [y for points in curves.values() for _, y in points] + ([dense] if dense is not None else [])
    values = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if log is None:
        log = bool(values) and max(values) / min(values) > 4.0
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot([100 * x for x in xs], ys, marker="o", label=name)
        if annotate and len(xs) <= 10:
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.4g}", (100 * x, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8)
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.4g})")
    ax.set_xlabel("decoder-linear parameters removed (%)")
    ax.set_ylabel(f"{ylabel} (log scale)" if log else ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_xlim(left=0)
    ax.margins(y=0.12)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report, folder: Path, *, spec=None) -> list[Path]:
    """Spectra and allocation plots for a :class:`~lrmath_hf.pipeline.CompressionReport`.

    ``spec`` (the model's :class:`~lrmath_hf.specs.ArchSpec`) sizes the full ranks that dense
    linears are drawn at. ``spectra.png`` needs a recipe that reports its spectra.
    """
    folder = Path(folder)
    shapes = full_ranks(spec) if spec is not None else None
    written = [plot_spectra(report.spectra, folder / "spectra.png"),
               plot_allocation(report.ranks, shapes, folder / "ranks.png")]
    return [p for p in written if p is not None]
