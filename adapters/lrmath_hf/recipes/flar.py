"""FLAR-SVD for ViT-family encoders: shrinkage whitening, rank search, measured-latency ranks.

Input moments per shared-input group; shrinkage (:func:`lrmath.ledoit_wolf` by
default; ``"heldout"``: the Ledoit-Wolf intensity times the factor with the least
2-fold held-out truncation error, :func:`heldout_intensity`); Cholesky whitening and ONE whitened SVD per linear (every candidate
rank is a slice of it); ranks (multiples of 8 below ``k_equiv``) from a criterion
by FLAR's bisection + rescale or by equal marginal error per parameter; with
``latency_aware``, factorised only where measurably faster here.  See docs/vit.md.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

import lrmath

from ..calibrate import CalibrationResult, LayerStats, _layer_output
from ..latency import LatencyTable, time_models
from ..modules import FactorizedLinear
from ..specs import ArchSpec, get_linear, iter_layers, set_linear
from ..specs_vision import final_norm
from . import RecipeResult, register
from .common import group_name, input_plan, run_calibration, timer, weight64

__all__ = ["SHRINKAGE", "CRITERIA", "ALLOCATIONS", "HELDOUT_GRID", "run_flar", "flar_statistics",
           "fold_batches", "merge_statistics", "shrunk_covariance", "heldout_error", "heldout_intensity",
           "reference_intensity", "rescale_ranks", "slope_ranks"]

SHRINKAGE = ("heldout", "ledoit_wolf", "oas", "reference", "none")
HELDOUT_GRID = (0.0, 1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0)  # multiples of the Ledoit-Wolf intensity
CRITERIA = ("feature", "weight", "uniform")
ALLOCATIONS = ("slope", "threshold")


def flar_statistics(model, spec: ArchSpec, batches, *, folds: int = 1, progress: bool = False):
    """Input moments of every shared-input group (reusable across ratios via ``statistics=``).

    With ``folds > 1``, a list of ``folds`` results over the disjoint batch
    subsets of :func:`fold_batches` (the same forward work as one call); their
    :func:`merge_statistics` is the statistic of all batches, and
    ``shrinkage="heldout"`` needs them.
    """
    if int(folds) != folds or folds < 1:
        raise ValueError(f"folds must be a positive integer, got {folds!r}")
    plan = input_plan(spec, importance=False)
    if folds == 1:
        return run_calibration(model, spec, batches, plan, progress=progress)
    return [run_calibration(model, spec, part, plan, progress=progress) for part in fold_batches(batches, folds)]


def fold_batches(batches, folds: int = 2) -> list[list]:
    """Disjoint folds of the calibration: batch ``i`` goes to fold ``i % folds``.

    With fewer batches than folds, the images of every batch are dealt out the same way.
    """
    batches = [b["pixel_values"] if isinstance(b, dict) else b for b in batches]
    if len(batches) < folds:
        batches = [image[None] for b in batches for image in b]
    if len(batches) < folds:
        raise ValueError(f"{len(batches)} calibration images cannot fill {folds} folds")
    return [batches[i::folds] for i in range(folds)]


def merge_statistics(parts) -> CalibrationResult:
    """The statistic of all folds: every input group's ``Moments`` merged exactly (:meth:`lrmath.Moments.merge`)."""
    parts = list(parts)
    if not parts or any(len(p.layers) != len(parts[0].layers) for p in parts):
        raise ValueError("merge_statistics needs one or more results over the same layers")
    layers = []
    for index, first in enumerate(parts[0].layers):
        inputs = {}
        for name, moments in first.inputs.items():
            merged = moments.copy()
            for part in parts[1:]:
                merged.merge(part.layers[index].inputs[name])
            inputs[name] = merged
        layers.append(LayerStats(inputs=inputs))
    return CalibrationResult(layers=layers, tokens=sum(p.tokens for p in parts),
                             seconds=sum(p.seconds for p in parts), sequential=parts[0].sequential,
                             world_size=parts[0].world_size)


def reference_intensity(S: torch.Tensor) -> float:
    r"""The reference code's "Ledoit-Wolf" intensity, reproduced to show what it does.

    :math:`\lambda = \mathrm{clip}(10^{10} (\mathrm{tr} S - \mathrm{tr} T) / \|S - T\|_F^2, 0, 1)`
    with :math:`T = \bar s I`, :math:`\bar s` the mean diagonal, on the float64
    statistic.  ``tr T = tr S`` exactly, so this is rounding noise times
    :math:`10^{10}` (about 0 here; 1e-5..3e-3 in the reference runs), not Ledoit-Wolf.
    """
    S = S.to(torch.float64)
    target = torch.diagonal(S).mean() * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    denominator = ((S - target) ** 2).sum()
    if denominator <= 0:
        return 0.0
    return float(torch.clamp(1e10 * (torch.trace(S) - torch.trace(target)) / denominator, 0.0, 1.0))


def shrunk_covariance(moments: lrmath.Moments, shrinkage: Any = "ledoit_wolf", *, center: bool = True):
    """``((1 - s) S + s mu I, s)`` for one input group.

    ``shrinkage``: ``"ledoit_wolf"``, ``"oas"``, ``"reference"`` (:func:`reference_intensity`),
    ``"none"`` or a fixed ``s`` in [0, 1] (``"heldout"`` needs folds: :func:`heldout_intensity`).
    ``S`` is the covariance (``center``) or the uncentred second moment.  Returns a
    float64 ``(p, p)`` tensor and ``s``.
    """
    if shrinkage == "heldout":
        raise ValueError('shrinkage="heldout" is chosen per group from fold statistics: use heldout_intensity')
    if shrinkage in ("ledoit_wolf", "oas"):
        res = (lrmath.ledoit_wolf if shrinkage == "ledoit_wolf" else lrmath.oas)(moments, assume_centered=not center)
        return res.covariance, float(res.shrinkage)
    S = moments.covariance() if center else moments.second_moment()
    if shrinkage == "none":
        return S, 0.0
    s = reference_intensity(S) if shrinkage == "reference" else float(shrinkage)
    return lrmath.shrink(S, s), s


def _fold_parts(moments: lrmath.Moments, center: bool):
    """``(S, mu, m)``: float64 covariance (or second moment), ``tr S / p`` and mean (``None`` uncentred)."""
    S = (moments.covariance() if center else moments.second_moment()).to(torch.float64)
    S = (S + S.T) / 2
    return S, float(torch.trace(S)) / S.shape[0], moments.mean.to(torch.float64) if center else None


def heldout_error(weights, fit: lrmath.Moments, test: lrmath.Moments, intensities, ranks, *,
                  center: bool = True) -> np.ndarray:
    r"""Held-out output error of the whitened truncation fitted on ``fit``, for each intensity.

    Parameters
    ----------
    weights : sequence of tensor
        The linears ``W_j`` (``m_j x p``) that read this input group.
    fit, test : lrmath.Moments
        Input statistics the truncation is fitted on and scored on (disjoint data).
    intensities : sequence of float
        Shrinkage intensities ``s`` in [0, 1] applied to ``fit``'s statistic.
    ranks : sequence of int
        Rank of each linear.
    center : bool
        Centred covariance with the bias correction (as :func:`run_flar`), or the
        uncentred second moment.

    Returns
    -------
    numpy.ndarray
        One error per intensity (float64).

    Notes
    -----
    With :math:`C_s = (1 - s) S_{\mathrm{fit}} + s \mu I` and :math:`W C_s^{1/2} = U \Sigma V^\top`,
    the whitened rank-``r`` truncation is :math:`W_r = U_r U_r^\top W` (any square root gives
    the same :math:`U_r`), so :math:`W - W_r = (I - U_r U_r^\top) W` and

    .. math::
        e(s) = \sum_j \operatorname{tr}\big((W_j - W_{j,r_j}) T (W_j - W_{j,r_j})^\top\big)
             = \sum_j \operatorname{tr}(W_j T W_j^\top) - \operatorname{tr}(U_{j,r}^\top W_j T W_j^\top U_{j,r}),

    :math:`T = S_{\mathrm{test}} + d d^\top`, :math:`d = m_{\mathrm{test}} - m_{\mathrm{fit}}`
    (the bias correction uses the fit's mean), or the test's second moment when
    uncentred.  :math:`U_r` comes from the eigenvectors of the ``m x m``
    :math:`(1 - s) W S W^\top + s \mu W W^\top` when ``m <= p``, otherwise from
    :math:`W E \operatorname{diag}((1 - s)\lambda + s\mu)^{1/2}` with :math:`S = E \Lambda E^\top`.
    """
    S, mu, mean = _fold_parts(fit, center)
    T, _, test_mean = _fold_parts(test, center)
    if center:
        d = test_mean - mean
        T = T + torch.outer(d, d)
    eig = None
    out = np.zeros(len(intensities))
    for W, r in zip(weights, ranks):
        W = W.to(torch.float64)
        m, p = W.shape
        WT = W @ T
        Q = WT @ W.T
        total = float(torch.trace(Q))
        if m <= p:
            A, B = W @ S @ W.T, W @ W.T
        elif eig is None:
            eig = torch.linalg.eigh(S)
        for i, s in enumerate(intensities):
            if m <= p:
                G = (1.0 - s) * A + (s * mu) * B
                U = torch.linalg.eigh((G + G.T) / 2).eigenvectors[:, -r:]
            else:
                scale = torch.sqrt(torch.clamp((1.0 - s) * eig.eigenvalues + s * mu, min=0.0))
                U = torch.linalg.svd(W @ (eig.eigenvectors * scale), full_matrices=False).U[:, :r]
            out[i] += total - float(torch.sum(U * (Q @ U)))
    return out


def _check_grid(grid) -> list[float]:
    try:
        out = [float(c) for c in grid]
    except (TypeError, ValueError):
        raise ValueError(f"heldout grid must be a sequence of numbers, got {grid!r}") from None
    if not out or any(not np.isfinite(c) or c < 0 for c in out):
        raise ValueError(f"heldout grid must hold non-negative finite multiples, got {grid!r}")
    return out


def heldout_intensity(weights, folds, full: lrmath.Moments, ranks, *, grid=HELDOUT_GRID,
                      center: bool = True) -> dict[str, Any]:
    r"""Shrinkage intensity of one input group chosen by K-fold held-out truncation error.

    Parameters
    ----------
    weights : sequence of tensor
        The group's linears.
    folds : sequence of lrmath.Moments
        The group's statistics on K >= 2 disjoint parts of the calibration.
    full : lrmath.Moments
        The statistic of all of it (the folds' merge).
    ranks : sequence of int
        Representative rank of each linear (:func:`run_flar`: its uniform rank at the target ratio).
    grid : sequence of float
        Multiples ``c`` of the Ledoit-Wolf intensity to try (0 and 1 among them by default).
    center : bool
        As in :func:`heldout_error`.

    Returns
    -------
    dict
        ``intensity`` (for ``full``), ``multiple`` (the chosen ``c``),
        ``ledoit_wolf`` (the full statistic's intensity), ``errors`` (summed over folds, per ``c``).

    Notes
    -----
    Ledoit-Wolf's :math:`s_{LW}` minimises :math:`E\|C_s - \Sigma\|_F^2`, not the error
    of the compression, and its rate (about :math:`\beta/\delta \propto 1/n`) assumes
    independent rows, which tokens of one image are not.  Here fold ``k`` is fitted at
    :math:`s = \min(1, c\, s_{LW}(\text{fit}_k))` with fit\ :sub:`k` = all folds but
    ``k``, and scored on fold ``k`` by :func:`heldout_error`;

    .. math::
        c^* = \arg\min_{c \in \text{grid}} \sum_k e_k(c), \qquad
        s = \min(1, c^*\, s_{LW}(\text{full})).

    Scaling the Ledoit-Wolf intensity of each statistic (instead of one absolute
    ``s``) carries its :math:`1/n` dependence from the folds to the full sample.
    Ties go to the first grid value.
    """
    grid = _check_grid(grid)
    folds = list(folds)
    if len(folds) < 2:
        raise ValueError(f"heldout_intensity needs at least 2 folds, got {len(folds)}")
    errors = np.zeros(len(grid))
    for k, test in enumerate(folds):
        fit = None
        for j, part in enumerate(folds):
            if j != k:
                fit = part.copy() if fit is None else fit.merge(part)
        s_fit = float(lrmath.ledoit_wolf(fit, assume_centered=not center).shrinkage)
        errors += heldout_error(weights, fit, test, [min(1.0, c * s_fit) for c in grid], ranks, center=center)
    best = int(np.argmin(errors))
    s_full = float(lrmath.ledoit_wolf(full, assume_centered=not center).shrinkage)
    return {"intensity": min(1.0, grid[best] * s_full), "multiple": grid[best], "ledoit_wolf": s_full,
            "errors": errors.tolist()}


def _cost(ranks, shapes) -> int:
    return sum(r * (m + n) if r is not None else m * n for r, (m, n) in zip(ranks, shapes))


def rescale_ranks(ranks, shapes, budget: float, *, multiple: int = 8, caps=None):
    r"""FLAR's rescale: one factor on all searched ranks so the parameters meet ``budget``.

    ``ranks``: searched ranks (``None``: needed ``k_equiv`` or more); ``shapes``:
    ``(m, n)``; ``caps``: largest rank each linear may be factorised at (latency).
    Returns ranks, ``None`` for dense.

    Notes
    -----
    With :math:`c_\ell(r) = r (m_\ell + n_\ell)` for :math:`8 \le r \le \min(\mathrm{cap}_\ell, k_{\mathrm{equiv}} - 1)`
    and :math:`m_\ell n_\ell` (dense) otherwise, :math:`\sum_\ell c_\ell(\lfloor \alpha r_\ell \rfloor_8)`
    is non-decreasing in :math:`\alpha`; the largest :math:`\alpha` within budget is
    bisected, then the largest rounding remainders get one more step while the budget allows.
    """
    keq = [lrmath.k_equiv(m, n) for m, n in shapes]
    base = np.array([k if r is None else r for r, k in zip(ranks, keq)], dtype=float)
    top = [k - 1 if caps is None else min(c, k - 1) for c, k in zip(caps or keq, keq)]

    def at(alpha):
        out = [max(multiple, int(alpha * b) // multiple * multiple) for b in base]
        return [r if r <= t else None for r, t in zip(out, top)]

    lo, hi = 0.0, float(max(keq)) / max(base.min(), 1.0) + 1.0
    if _cost(at(lo), shapes) > budget:
        return at(lo)  # even the smallest ranks miss the budget
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(at(mid), shapes) <= budget else (lo, mid)
    out = at(lo)
    spent = _cost(out, shapes)
    remainder = (lo * base - np.array([r or 0 for r in out])) / multiple  # what rounding took
    for i in np.argsort(-remainder, kind="stable"):
        step = multiple * sum(shapes[i])
        if out[i] is not None and out[i] + multiple <= top[i] and spent + step <= budget:
            out[i], spent = out[i] + multiple, spent + step
    return out


def slope_ranks(spectra, shapes, budget: float, *, multiple: int = 8, caps=None):
    r"""Ranks with equal marginal error per parameter (``allocation="slope"``).

    ``spectra``: per linear, descending :math:`g_\ell \sigma_{\ell,i}^2` (the modelled
    error of dropping component ``i``); other arguments as in :func:`rescale_ranks`.

    Notes
    -----
    Minimises :math:`\sum_\ell g_\ell \sum_{i > r_\ell} \sigma_{\ell,i}^2` s.t.
    :math:`\sum_\ell c_\ell(r_\ell) \le B` with :func:`lrmath.allocate_ranks` (a
    certified greedy).  The top grid rank below ``k_equiv`` may cost about ``m n``:
    there the linear stays dense.  A linear allotted more than its latency cap
    turns dense, its ``m n`` leaves the budget, and the others are re-allocated
    until no cap is exceeded.
    """
    keq = [lrmath.k_equiv(m, n) for m, n in shapes]
    top = [lrmath.round_rank(k, multiple) for k in keq]  # the top grid point means dense
    caps = top if caps is None else caps
    dense: set[int] = set()
    while True:
        live = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(shapes[i][0] * shapes[i][1] for i in dense)
        if not live or left < multiple * sum(sum(shapes[i]) for i in live):
            return [None if i in dense else multiple for i in range(len(shapes))]  # the closest one can get
        alloc = lrmath.allocate_ranks([spectra[i] for i in live], left, cost=np.array([float(sum(shapes[i])) for i in live]),
                                      multiple=multiple, min_rank=multiple, max_rank=np.array([top[i] for i in live]))
        ranks = dict(zip(live, (int(r) for r in alloc.ranks)))
        over = {i for i, r in ranks.items() if r >= keq[i] or r > caps[i]}
        if not over - {i for i, r in ranks.items() if r >= keq[i]}:
            return [None if i in dense or ranks[i] >= keq[i] else ranks[i] for i in range(len(shapes))]
        dense |= {i for i in over if ranks[i] < keq[i]}


class _Linear:
    """One encoder linear with its full whitened SVD and input mean."""

    def __init__(self, dense, svd, mean):
        self.weight, self.bias = weight64(dense), None if dense.bias is None else dense.bias.detach().double()
        self.dtype, self.device = dense.weight.dtype, dense.weight.device
        self.svd, self.mean = svd, mean
        self.shape = tuple(self.weight.shape)
        self.energy = (svd.singular_values.double() ** 2).cpu()

    def module(self, rank: int) -> FactorizedLinear:
        """Rank-``rank`` slice; with a mean, the bias absorbs ``(W - W_r) m`` (zero mean output error)."""
        left, right = self.svd.left[:, :rank], self.svd.right[:rank]
        bias = self.bias
        if self.mean is not None:
            shift = (self.weight - left @ right) @ self.mean
            bias = shift if bias is None else bias + shift
        return FactorizedLinear.from_factors(left, right, bias, dtype=self.dtype, device=self.device)


class _FeatureProbe:
    """Final features of search images with linears swapped, run from the first changed block."""

    def __init__(self, model, spec, pixels):
        self.model, self.spec, self.norm = model, spec, final_norm(model)
        self.layers = [layer for _, layer in iter_layers(model, spec)]
        self.inputs: dict[int, tuple] = {}
        hooks = [layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: self.inputs.__setitem__(i, (args, kwargs)), with_kwargs=True)
            for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.reference = model.base_model(pixel_values=pixels).last_hidden_state.double()
        finally:
            for hook in hooks:
                hook.remove()
        self.energy = float((self.reference ** 2).sum())
        self.tail_passes, self.block_runs = 1, len(self.layers)  # the dense pass above

    @torch.no_grad()
    def nmse(self, swaps: dict, start: int) -> float:
        """``||F' - F||^2 / ||F||^2`` with ``swaps`` ({(layer, role): module}) installed."""
        old = {key: set_linear(self.model, key[0], key[1], module, self.spec) for key, module in swaps.items()}
        try:
            hidden = self.inputs[start][0][0]
            for index in range(start, len(self.layers)):
                args, kwargs = self.inputs[index]
                hidden = _layer_output(self.layers[index](hidden, *args[1:], **kwargs))
            features = self.norm(hidden).double()
        finally:
            for key, module in old.items():
                set_linear(self.model, key[0], key[1], module, self.spec)
        self.tail_passes += 1
        self.block_runs += len(self.layers) - start
        return float(((features - self.reference) ** 2).sum()) / self.energy

    def counts(self) -> dict[str, Any]:
        return {"search_images": int(self.reference.shape[0]), "tail_passes": self.tail_passes,
                "block_runs": self.block_runs, "full_forward_equivalent": self.block_runs / len(self.layers)}


def _pixels(batches, count: int) -> torch.Tensor:
    return torch.cat([b["pixel_values"] if isinstance(b, dict) else b for b in batches])[:count]


def _uniform_rank(m: int, n: int, ratio: float) -> int:
    return max(1, int(m * n * (1.0 - ratio) / (m + n)))  # SVD-LLM: one parameter ratio for every matrix


@register("flar")
def run_flar(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
             shrinkage: Any = "ledoit_wolf", criterion: str = "feature", allocation: str = "slope",
             latency_aware: bool = True, center: bool = True, damping: float = 1e-6, multiple: int = 8,
             search_images: int = 16, latency_batch: int = 1, latency_margin: float = 0.05,
             latency_cache_dir: Any = None, latency_table: LatencyTable | None = None,
             measure_latency: bool | None = None, statistics=None, search_memo: dict | None = None,
             heldout_grid=HELDOUT_GRID) -> RecipeResult:
    """FLAR-SVD (Thoma et al., CVPR 2025 Workshops) for ViT / DeiT / DINOv2 encoders.

    Parameters
    ----------
    ratio : float
        Fraction of the encoder linears' parameters to remove.
    shrinkage : {"heldout", "ledoit_wolf", "oas", "reference", "none"} or float
        Intensity estimator (default ``"ledoit_wolf"``).  ``"heldout"``: per input group, the
        Ledoit-Wolf intensity times the multiple in ``heldout_grid`` with the
        least 2-fold held-out error of the whitened truncation at the uniform
        ranks of ``ratio`` (:func:`heldout_intensity`; the calibration is
        accumulated in two folds, :func:`flar_statistics` ``folds=2``); the
        others: :func:`shrunk_covariance`; 1.0 gives plain SVD.
    criterion : {"feature", "weight", "uniform"}
        ``e_l(r)``: final-feature NMSE with only linear ``l`` at rank ``r``; or
        ``1 - cos(W S, (W S)_r)``; or SVD-LLM's uniform ratio (no search).
    allocation : {"slope", "threshold"}
        ``threshold`` (the paper): per linear the smallest rank with
        ``e_l(r) <= tau`` by :func:`lrmath.bisect_rank` (``tau`` = uniform
        compression's NMSE / number of linears, or its mean ``1 - cos``), then
        :func:`rescale_ranks`.  ``slope``: ``e_l(r) ~ g_l sum_{i>r} sigma_i^2``
        with ``g_l`` measured once per linear at its uniform rank, then
        :func:`slope_ranks`.
    latency_aware : bool
        Factorise only at ranks where the pair is measurably faster here
        (:class:`~lrmath_hf.latency.LatencyTable`, ``latency_batch`` images per
        forward, ``latency_margin``, ``latency_cache_dir`` or ``latency_table``).
    center : bool
        Whiten the centred covariance and let the bias absorb the mean error.
    damping, multiple : float, int
        Relative Cholesky damping; rank grid.
    search_images : int
        Calibration images the ``feature`` criterion compares.
    measure_latency : bool, optional
        Time dense and compressed model end to end (default: ``latency_aware``).
    statistics : CalibrationResult or list of CalibrationResult, optional
        :func:`flar_statistics` of the same dense model (skips calibration); a
        list is the folds of ``folds=2`` (merged by :func:`merge_statistics`),
        which ``"heldout"`` needs.
    search_memo : dict, optional
        Criterion values shared by calls on the same dense model and calibration.
    heldout_grid : sequence of float
        Multiples of the Ledoit-Wolf intensity ``"heldout"`` chooses from.

    Notes
    -----
    With :math:`S S^\\top = (1 - s)\\Sigma + s\\mu I + \\delta I` and :math:`W S = U \\Sigma V^\\top`,
    :math:`W_r = U_r \\Sigma_r V_r^\\top S^{-1}` minimises :math:`E\\|(W - W_r)(x - m)\\|^2`
    (at :math:`s = \\delta = 0`) and the bias :math:`b + (W - W_r) m` removes the mean error.
    A rank reaching :math:`k_{\\mathrm{equiv}} = \\lfloor mn/(m+n) \\rfloor` keeps the linear dense.
    """
    if criterion not in CRITERIA or allocation not in ALLOCATIONS:
        raise ValueError(f"criterion must be in {CRITERIA} and allocation in {ALLOCATIONS}, "
                         f"got {criterion!r}, {allocation!r}")
    if not (shrinkage in SHRINKAGE or (isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool)
                                       and 0.0 <= shrinkage <= 1.0)):
        raise ValueError(f"shrinkage must be one of {SHRINKAGE} or a number in [0, 1], got {shrinkage!r}")
    heldout = shrinkage == "heldout"
    if heldout:
        _check_grid(heldout_grid)
    if heldout and statistics is not None and not isinstance(statistics, (list, tuple)):
        raise ValueError('shrinkage="heldout" needs fold statistics: pass flar_statistics(..., folds=2)')
    result, batches = RecipeResult(), list(batches)
    with timer(result.timings, "calibration"):
        if statistics is None:
            statistics = flar_statistics(model, spec, batches, folds=2 if heldout else 1, progress=progress)
        folds = list(statistics) if isinstance(statistics, (list, tuple)) else None
        stats = merge_statistics(folds) if folds is not None else statistics
    result.calibration_tokens = stats.tokens
    tokens_per_image = stats.tokens // sum(int(_pixels([b], 10**9).shape[0]) for b in batches)

    with timer(result.timings, "factorisation"):
        linears, intensities, fallbacks, multiples = {}, {}, 0, {}
        for layer, layer_stats in enumerate(stats.layers):
            for group in spec.input_groups:
                name = group_name(group)
                moments = layer_stats.inputs[name]
                if heldout:
                    weights = [weight64(get_linear(model, layer, role, spec)) for role in group]
                    choice = heldout_intensity(weights, [f.layers[layer].inputs[name] for f in folds], moments,
                                               [_uniform_rank(*w.shape, ratio) for w in weights],
                                               grid=heldout_grid, center=center)
                    multiples[f"{layer}.{name}"] = choice["multiple"]
                    C, intensities[f"{layer}.{name}"] = shrunk_covariance(moments, choice["intensity"],
                                                                          center=center)
                else:
                    C, intensities[f"{layer}.{name}"] = shrunk_covariance(moments, shrinkage, center=center)
                whitener = lrmath.whiten(C, method="cholesky", damping=damping)
                fallbacks += whitener.fallback is not None
                for role in group:
                    dense = get_linear(model, layer, role, spec)
                    svd = lrmath.whitened_svd(weight64(dense), whitener, min(dense.weight.shape))
                    linears[(layer, role)] = _Linear(dense, svd, moments.mean if center else None)
    keys = list(linears)
    shapes = [linears[k].shape for k in keys]
    details: dict[str, Any] = {"shrinkage": shrinkage, "criterion": criterion, "allocation": allocation,
                               "latency_aware": latency_aware, "center": center, "damping": damping,
                               "multiple": multiple, "shrinkage_intensity": intensities,
                               "whitening_fallbacks": fallbacks}
    if heldout:
        details["heldout_multiple"] = multiples
    caps, table = None, None
    if latency_aware:
        with timer(result.timings, "latency"):
            param = next(model.parameters())
            table = latency_table or LatencyTable(param.device, param.dtype, cache_dir=latency_cache_dir,
                                                  margin=latency_margin)
            rows = latency_batch * tokens_per_image
            fast = {s: table.max_fast_rank(rows, s[1], s[0], hi=lrmath.k_equiv(*s) - 1, multiple=multiple)[0]
                    for s in set(shapes)}
            caps = [fast[s] for s in shapes]
            details["latency_caps"] = {f"{m}x{n}": r for (m, n), r in fast.items()}

    with timer(result.timings, "search"):
        memo_key = (str(shrinkage), tuple(intensities.values()), center, damping, search_images)
        final = _decide(model, spec, batches, linears, ratio, criterion, allocation, caps, details,
                        search_images=search_images, multiple=multiple, memo=search_memo, memo_key=memo_key)

    measure = latency_aware if measure_latency is None else measure_latency
    dense_copy = copy.deepcopy(model) if measure else None
    with timer(result.timings, "surgery"):
        for key, rank in zip(keys, final):
            result.ranks[f"{key[0]}.{key[1]}"] = "dense" if rank is None else int(rank)
            if rank is not None:
                set_linear(model, key[0], key[1], linears[key].module(rank), spec)
    if table is not None:
        details["latency"] = _latency_report(table, rows, final, shapes)
    if measure:
        with timer(result.timings, "latency"):
            measured = time_models({"dense": dense_copy, "compressed": model}, _pixels(batches, latency_batch))
        report = details.setdefault("latency", {})
        report.update({"measured_dense_s": measured["dense"], "measured_compressed_s": measured["compressed"]})
        if "predicted_saving_s" in report:
            report["predicted_compressed_s"] = measured["dense"] - report["predicted_saving_s"]
    result.details = details
    return result


def _decide(model, spec, batches, linears, ratio, criterion, allocation, caps, details, *, search_images,
            multiple, memo, memo_key):
    """Final ranks (``None`` = dense); fills ``details`` with thresholds, searches and forward passes."""
    keys = list(linears)
    shapes = [linears[k].shape for k in keys]
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes)
    uniform = [_uniform_rank(*s, ratio) for s in shapes]
    if criterion == "uniform":
        top = caps or [lrmath.k_equiv(*s) - 1 for s in shapes]
        details["forward_passes"] = {"search": 0}
        return [r if r <= min(c, lrmath.k_equiv(*s) - 1) else None for r, c, s in zip(uniform, top, shapes)]
    memo = {} if memo is None else memo
    probe = _FeatureProbe(model, spec, _pixels(batches, search_images)) if criterion == "feature" else None
    hits = 0

    def nmse(key, rank):
        nonlocal hits
        slot = memo_key + (key[0], key[1], int(rank))
        hits += slot in memo
        if slot not in memo:
            memo[slot] = probe.nmse({key: linears[key].module(rank)}, key[0])
        return memo[slot]

    if allocation == "slope":
        if criterion == "feature":  # measured gain: NMSE per unit of dropped whitened energy
            gain = [nmse(k, r) / max(float(linears[k].energy[r:].sum()), 1e-300) for k, r in zip(keys, uniform)]
        else:  # relative whitened energy: 1 - cos ~ tail / (2 ||W S||^2)
            gain = [1.0 / max(float(linears[k].energy.sum()), 1e-300) for k in keys]
        details["gain"] = {f"{k[0]}.{k[1]}": g for k, g in zip(keys, gain)}
        spectra = [(g * linears[k].energy).numpy() for k, g in zip(keys, gain)]
        final = slope_ranks(spectra, shapes, budget, multiple=multiple, caps=caps)
        calls = len(keys) if criterion == "feature" else 0
    else:
        if criterion == "feature":
            threshold = probe.nmse({k: linears[k].module(r) for k, r in zip(keys, uniform)}, 0) / len(keys)
            error = nmse
        else:
            cosine = {k: torch.sqrt(torch.cumsum(linears[k].energy, 0) / linears[k].energy.sum()) for k in keys}
            threshold = 1.0 - float(np.mean([float(cosine[k][r - 1]) for k, r in zip(keys, uniform)]))
            error = lambda key, r: 1.0 - float(cosine[key][r - 1])  # noqa: E731
        searched, calls, non_monotone = [], 0, []
        for key, shape in zip(keys, shapes):
            seen = {}
            res = lrmath.bisect_rank(lambda r: seen.setdefault(r, error(key, r)) <= threshold, multiple,
                                     lrmath.k_equiv(*shape) - 1, multiple=multiple)
            searched.append(res.rank)
            calls += res.calls
            ordered = [seen[r] for r in sorted(seen)]
            if any(b > a * (1 + 1e-3) + 1e-12 for a, b in zip(ordered, ordered[1:])):
                non_monotone.append(f"{key[0]}.{key[1]}")
        details.update(threshold=threshold, non_monotone=non_monotone,
                       searched_ranks={f"{k[0]}.{k[1]}": r for k, r in zip(keys, searched)})
        final = rescale_ranks(searched, shapes, budget, multiple=multiple, caps=caps)
    details["search_calls"] = calls
    details["forward_passes"] = {"search": 0} if probe is None else {**probe.counts(), "memo_hits": hits}
    return final


def _latency_report(table: LatencyTable, rows: int, final, shapes) -> dict[str, Any]:
    """Predicted saving of the factorised linears from the measured table."""
    saving = sum(table.dense_seconds(rows, n, m) - table.timing(rows, n, m, r).pair_s
                 for r, (m, n) in zip(final, shapes) if r is not None)
    factorised = sum(r is not None for r in final)
    table.save()
    return {"device": table.device_name, "table": None if table.path is None else str(table.path),
            "rows": rows, "shapes_measured": table.measured, "shapes_reused": table.reused,
            "factorised": factorised, "dense": len(final) - factorised, "predicted_saving_s": saving}
