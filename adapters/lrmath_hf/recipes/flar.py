"""FLAR-SVD for ViT-family encoders: shrinkage whitening, rank search, measured-latency ranks.

Input moments per shared-input group; shrinkage (:func:`lrmath.ledoit_wolf` by
default; ``"heldout"``: the Ledoit-Wolf intensity times the factor with the least
2-fold held-out truncation error, :func:`heldout_intensity`); Cholesky whitening and ONE whitened SVD per linear (every candidate
rank is a slice of it); ranks (multiples of 8 below ``k_equiv``) from a criterion
by FLAR's bisection + rescale or by equal marginal error per parameter, each
component's error priced under the sample covariance (:func:`sample_energy`); with
``latency_aware``, factorised only where measurably faster here.  See docs/vit.md.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch

import lrmath

from ..calibrate import _layer_output, pixel_values, to_input_device
from ..latency import LatencyTable, time_models
from ..modules import FactorizedLinear
from ..specs import ArchSpec, get_linear, iter_layers, set_linear
from ..specs_vision import final_norm
from . import RecipeResult, register
from .common import group_name, input_plan, run_calibration, timer, weight64
from .flar_ranks import imposed_ranks, non_increasing, rescale_ranks, sample_energy, slope_ranks
from .flar_shrinkage import (HELDOUT_GRID, _check_grid, fold_batches, heldout_error, heldout_intensity,
                             merge_statistics, reference_intensity, resolve_target, shrunk_covariance)

__all__ = ["SHRINKAGE", "CRITERIA", "ALLOCATIONS", "HELDOUT_GRID", "run_flar", "flar_statistics",
           "fold_batches", "merge_statistics", "shrunk_covariance", "heldout_error", "heldout_intensity",
           "reference_intensity", "rescale_ranks", "sample_energy", "slope_ranks"]

SHRINKAGE = ("heldout", "ledoit_wolf", "oas", "reference", "none")
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
    plan = input_plan(spec, importance=False, per_feature=True)  # the diagonal shrinkage target needs them
    if folds == 1:
        return run_calibration(model, spec, batches, plan, progress=progress)
    return [run_calibration(model, spec, part, plan, progress=progress) for part in fold_batches(batches, folds)]


class _Linear:
    """One encoder linear with its full whitened SVD and input mean."""

    def __init__(self, dense, svd, mean, sample=None):
        self.weight, self.bias = weight64(dense), None if dense.bias is None else dense.bias.detach().double()
        self.dtype, self.device = dense.weight.dtype, dense.weight.device
        self.svd, self.mean = svd, mean
        self.shape = tuple(self.weight.shape)
        sigma = svd.singular_values.double()
        if sample is None:
            self.energy = (sigma**2).cpu()
        else:
            self.energy = non_increasing(sample_energy(sigma, svd.right.double(), sample.double()).cpu())

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
    return torch.cat([pixel_values(b) for b in batches])[:count]


def _uniform_rank(m: int, n: int, ratio: float) -> int:
    return max(1, int(m * n * (1.0 - ratio) / (m + n)))  # SVD-LLM: one parameter ratio for every matrix


@register("flar")
def run_flar(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
             shrinkage: Any = "ledoit_wolf", criterion: str = "feature", allocation: str = "slope",
             latency_aware: bool = True, center: bool = True, damping: float = 1e-6, multiple: int = 8,
             search_images: int = 16, latency_batch: int = 1, latency_margin: float = 0.05,
             latency_cache_dir: Any = None, latency_table: LatencyTable | None = None,
             measure_latency: bool | None = None, statistics=None, search_memo: dict | None = None,
             heldout_grid=HELDOUT_GRID, shrinkage_target: str | None = None,
             error_covariance: str = "sample", ranks: dict | None = None) -> RecipeResult:
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
        others: :func:`shrunk_covariance`; 1.0 gives plain SVD (with the target ``mu I``).
    shrinkage_target : {"identity", "diagonal"}, optional
        ``mu I`` or ``Diag(S)``.  Default: ``Diag(S)`` for ``"ledoit_wolf"`` and
        ``"heldout"`` (:func:`lrmath.ledoit_wolf` ``target="diagonal"``), ``mu I``
        for the others; see docs/vit.md for why.
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
    error_covariance : {"shrunk", "sample"}
        The covariance under which the rank search models each linear's error
        ``sum_{i>r} e_i``. ``"sample"`` (default): the unshrunk sample covariance
        ``S_0`` the calibration measured, ``e_i = sigma_i^2 b_i S_0 b_i^T``
        (:func:`sample_energy`). ``"shrunk"``: the whitening's, ``e_i = sigma_i^2``
        (the default until stop 16). The factors are the same either way; only the
        ranks can change. docs/vit.md, "Shrinkage choice", has the measurements.
    ranks : dict, optional
        Impose the ranks instead of searching them: ``{"layer.role": rank or "dense"}``
        for every encoder linear, the format of ``RecipeResult.ranks`` (so one
        compression's ranks can be replayed on another calibration or shrinkage).
        Each rank is an int in ``[1, min(m, n)]``. ``ratio`` then only sets the
        uniform ranks ``shrinkage="heldout"`` scores, and no latency caps apply.

    Notes
    -----
    With :math:`S S^\\top = (1 - s)\\Sigma + s\\mu I + \\delta I` and :math:`W S = U \\Sigma V^\\top`,
    :math:`W_r = U_r \\Sigma_r V_r^\\top S^{-1}` minimises :math:`E\\|(W - W_r)(x - m)\\|^2`
    (at :math:`s = \\delta = 0`) and the bias :math:`b + (W - W_r) m` removes the mean error.
    A rank reaching :math:`k_{\\mathrm{equiv}} = \\lfloor mn/(m+n) \\rfloor` keeps the linear dense.
    """
    if spec.kind != "encoder":
        raise ValueError(f"recipe 'flar' is FLAR-SVD for ViT-family encoders (vit, deit, dinov2); "
                         f"{spec.model_type} is a {spec.kind}: use 'auto' (the default), 'flat', 'svd-llm' or 'latent'")
    if criterion not in CRITERIA or allocation not in ALLOCATIONS:
        raise ValueError(f"criterion must be in {CRITERIA} and allocation in {ALLOCATIONS}, "
                         f"got {criterion!r}, {allocation!r}")
    if not (shrinkage in SHRINKAGE or (isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool)
                                       and 0.0 <= shrinkage <= 1.0)):
        raise ValueError(f"shrinkage must be one of {SHRINKAGE} or a number in [0, 1], got {shrinkage!r}")
    target = resolve_target(shrinkage, shrinkage_target)
    if error_covariance not in ("shrunk", "sample"):
        raise ValueError(f"error_covariance must be 'shrunk' or 'sample', got {error_covariance!r}")
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
                estimator = shrinkage
                if heldout:
                    weights = [weight64(get_linear(model, layer, role, spec)) for role in group]
                    choice = heldout_intensity(weights, [f.layers[layer].inputs[name] for f in folds], moments,
                                               [_uniform_rank(*w.shape, ratio) for w in weights],
                                               grid=heldout_grid, center=center, target=target)
                    multiples[f"{layer}.{name}"], estimator = choice["multiple"], choice["intensity"]
                C, intensities[f"{layer}.{name}"] = shrunk_covariance(moments, estimator, center=center,
                                                                      target=target)
                whitener = lrmath.whiten(C, method="cholesky", damping=damping)
                fallbacks += whitener.fallback is not None
                sample = None
                if error_covariance == "sample" and intensities[f"{layer}.{name}"] > 0:
                    sample = shrunk_covariance(moments, "none", center=center)[0]
                for role in group:
                    dense = get_linear(model, layer, role, spec)
                    svd = lrmath.whitened_svd(weight64(dense), whitener, min(dense.weight.shape))
                    linears[(layer, role)] = _Linear(dense, svd, moments.mean if center else None, sample)
    keys = list(linears)
    shapes = [linears[k].shape for k in keys]
    details: dict[str, Any] = {"shrinkage": shrinkage, "shrinkage_target": target,
                               "criterion": criterion, "allocation": allocation,
                               "error_covariance": error_covariance,
                               "latency_aware": latency_aware, "center": center, "damping": damping,
                               "multiple": multiple, "shrinkage_intensity": intensities,
                               "whitening_fallbacks": fallbacks}
    if heldout:
        details["heldout_multiple"] = multiples
    imposed = None if ranks is None else imposed_ranks(ranks, keys, shapes)
    caps, table = None, None
    if latency_aware and imposed is None:
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
        memo_key = (str(shrinkage), target, tuple(intensities.values()), center, damping, search_images)
        if imposed is not None:
            final, details["ranks_imposed"], details["forward_passes"] = imposed, True, {"search": 0}
        else:
            final = _decide(model, spec, batches, linears, ratio, criterion, allocation, caps, details,
                            search_images=search_images, multiple=multiple, memo=search_memo, memo_key=memo_key,
                            progress=progress)

    measure = latency_aware if measure_latency is None else measure_latency
    dense_copy = copy.deepcopy(model) if measure else None
    with timer(result.timings, "surgery"):
        for key, rank in zip(keys, final):
            result.ranks[f"{key[0]}.{key[1]}"] = "dense" if rank is None else int(rank)
            if rank is not None:
                set_linear(model, key[0], key[1], linears[key].module(rank), spec)
    if table is not None:
        details["latency"] = _latency_report(table, rows, final, shapes)
        _warn_if_capped(ratio, final, shapes, details["latency"])
    if measure:
        with timer(result.timings, "latency"):
            measured = time_models({"dense": dense_copy, "compressed": model}, _pixels(batches, latency_batch))
        report = details.setdefault("latency", {})
        report.update({"measured_dense_s": measured["dense"], "measured_compressed_s": measured["compressed"]})
        if "predicted_saving_s" in report:
            report["predicted_compressed_s"] = measured["dense"] - report["predicted_saving_s"]
    result.details = details
    return result


def _searching(keys, progress: bool, what: str):
    """``keys``, under a tqdm bar where the search runs forward passes (a minute on DINOv2-S, one CPU)."""
    if not progress:
        return keys
    from tqdm.auto import tqdm

    return tqdm(keys, desc=what, unit="linear")


def _decide(model, spec, batches, linears, ratio, criterion, allocation, caps, details, *, search_images,
            multiple, memo, memo_key, progress=False):
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
    probe = (_FeatureProbe(model, spec, to_input_device(_pixels(batches, search_images), model))
             if criterion == "feature" else None)
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
            gain = [nmse(k, r) / max(float(linears[k].energy[r:].sum()), 1e-300)
                    for k, r in zip(_searching(keys, progress, "feature gain"), uniform)]
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
        for key, shape in zip(_searching(keys, progress and criterion == "feature", "rank search"), shapes):
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


def _warn_if_capped(ratio: float, final, shapes, report: dict) -> None:
    """Say so when the latency caps kept the recipe well short of the ratio asked for."""
    dense = sum(m * n for m, n in shapes)
    removed = sum(m * n - r * (m + n) for r, (m, n) in zip(final, shapes) if r is not None) / dense
    if removed < ratio - 0.01:
        warnings.warn(f"flar removed {removed:.1%} of the encoder linears' parameters, not the {ratio:.1%} asked: "
                      f"factorising is measurably faster on {report['device']} for {report['factorised']} of "
                      f"{len(final)} linears only, so the others stay dense. Pass latency_aware=False to reach the "
                      "ratio whatever the speed.", UserWarning, stacklevel=5)  # the caller of compress (under no_grad)


def _latency_report(table: LatencyTable, rows: int, final, shapes) -> dict[str, Any]:
    """Predicted saving of the factorised linears from the measured table."""
    saving = sum(table.dense_seconds(rows, n, m) - table.timing(rows, n, m, r).pair_s
                 for r, (m, n) in zip(final, shapes) if r is not None)
    factorised = sum(r is not None for r in final)
    table.save()
    return {"device": table.device_name, "table": None if table.path is None else str(table.path),
            "rows": rows, "shapes_measured": table.measured, "shapes_reused": table.reused,
            "factorised": factorised, "dense": len(final) - factorised, "predicted_saving_s": saving}
