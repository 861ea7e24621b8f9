"""FLAR-SVD for ViT-family encoders: shrinkage whitening, bisection rank search, measured-latency ranks.

``lrmath_hf.compress(model, pixel_batches, recipe="flar", ratio=...)`` runs, per
encoder linear (q, k, v, o, fc1, fc2 of every block):

1. calibration: one :class:`lrmath.Moments` of the inputs per shared-input
   group ({q, k, v}, {o}, {fc1}, {fc2});
2. shrinkage of the covariance toward ``mu I`` with a real estimator
   (:func:`lrmath.ledoit_wolf` by default, :func:`lrmath.oas`, a fixed
   intensity, none, or the reference code's intensity, which is ~0);
3. Cholesky whitening with relative damping (:func:`lrmath.whiten`) and ONE
   whitened SVD per linear (:func:`lrmath.whitened_svd` at full rank): every
   candidate rank is a slice of it;
4. a rank per linear by :func:`lrmath.bisect_rank` over multiples of 8 below
   ``k_equiv``, on the weight-space cosine or on the normalised final-feature
   MSE with only that linear compressed;
5. all ranks rescaled by one factor to hit the target ratio (multiples of 8,
   leftover budget to the largest remainders);
6. with ``latency_aware``, a linear is factorised only at ranks where the pair
   is measurably faster than the dense linear ON THIS DEVICE
   (:class:`lrmath_hf.latency.LatencyTable`); elsewhere it stays dense.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

import lrmath

from ..calibrate import _layer_output
from ..latency import LatencyTable, time_models
from ..modules import FactorizedLinear
from ..specs import ArchSpec, get_linear, iter_layers, set_linear
from ..specs_vision import final_norm
from . import RecipeResult, register
from .common import group_name, input_plan, run_calibration, timer, weight64

__all__ = ["SHRINKAGE", "CRITERIA", "run_flar", "flar_statistics", "shrunk_covariance", "reference_intensity",
           "rescale_ranks"]

SHRINKAGE = ("ledoit_wolf", "oas", "reference", "none")
CRITERIA = ("feature", "weight", "uniform")


def flar_statistics(model, spec: ArchSpec, batches, *, progress: bool = False):
    """Input moments of every shared-input group (reusable across ratios via ``statistics=``)."""
    return run_calibration(model, spec, batches, input_plan(spec, importance=False), progress=progress)


def reference_intensity(S: torch.Tensor) -> float:
    r"""The reference code's "Ledoit-Wolf" intensity, reproduced in float32 to show what it does.

    :math:`T = \bar{s} I` with :math:`\bar s` the mean diagonal of ``S``, and
    :math:`\lambda = \mathrm{clip}(10^{10} (\mathrm{tr} S - \mathrm{tr} T) / \|S - T\|_F^2, 0, 1)`.
    The numerator is zero in exact arithmetic (``tr T = tr S``), so the result
    is float32 rounding noise amplified by :math:`10^{10}`; it is not Ledoit-Wolf.
    """
    S32 = S.to(torch.float32)
    target = torch.diagonal(S32).mean() * torch.eye(S32.shape[-1], dtype=torch.float32)
    numerator = torch.trace(S32) - torch.trace(target)
    denominator = ((S32 - target) ** 2).sum()
    return float(torch.clamp(1e10 * numerator / denominator, 0.0, 1.0)) if denominator > 0 else 0.0


def shrunk_covariance(moments: lrmath.Moments, shrinkage: Any = "ledoit_wolf", *, center: bool = True):
    """The shrunk input statistic of one group and the intensity used.

    Parameters
    ----------
    moments : lrmath.Moments
        Input rows of the group.
    shrinkage : {"ledoit_wolf", "oas", "reference", "none"} or float
        Estimator of the intensity ``s`` in ``(1 - s) S + s mu I``, or a fixed ``s``.
    center : bool
        ``S`` is the covariance (True) or the uncentred second moment ``X^T X / n``.

    Returns
    -------
    covariance : torch.Tensor
        float64, ``(p, p)``.
    intensity : float
    """
    if shrinkage == "ledoit_wolf" or shrinkage == "oas":
        estimator = lrmath.ledoit_wolf if shrinkage == "ledoit_wolf" else lrmath.oas
        res = estimator(moments, assume_centered=not center)
        return res.covariance, float(res.shrinkage)
    S = moments.covariance() if center else moments.second_moment()
    if shrinkage == "none":
        return S, 0.0
    s = reference_intensity(S) if shrinkage == "reference" else float(shrinkage)
    return lrmath.shrink(S, s), s


def rescale_ranks(ranks, shapes, budget: float, *, multiple: int = 8, caps=None):
    r"""Scale all ranks by one factor so the factorised parameters meet ``budget``.

    Parameters
    ----------
    ranks : sequence of int or None
        Searched ranks (``None``: the linear needed ``k_equiv`` or more).
    shapes : sequence of (m, n)
    budget : float
        Parameters allowed for these linears: ``(1 - ratio) sum m n``.
    multiple : int
        Ranks are multiples of this, at least ``multiple``.
    caps : sequence of int, optional
        Largest rank each linear may be factorised at (latency); above it the
        linear stays dense. ``k_equiv`` always applies.

    Returns
    -------
    list of int or None
        Final ranks; ``None`` means dense.

    Notes
    -----
    With :math:`c_\ell(r) = r (m_\ell + n_\ell)` if :math:`r < k_{\mathrm{equiv}}`
    and :math:`r \le \mathrm{cap}_\ell`, else :math:`m_\ell n_\ell` (dense), the
    total :math:`\sum_\ell c_\ell(\lfloor \alpha r_\ell \rfloor_{8})` is
    non-decreasing in :math:`\alpha`; the largest :math:`\alpha` within budget is
    found by bisection, then linears with the largest rounding remainders get
    one more step of ``multiple`` while the budget allows (FLAR-SVD rescales and
    rounds down; the remainders recover up to ``multiple (m + n)`` per linear).
    """
    keq = [lrmath.k_equiv(m, n) for m, n in shapes]
    base = np.array([k if r is None else r for r, k in zip(ranks, keq)], dtype=float)
    caps = [k - 1 for k in keq] if caps is None else [min(c, k - 1) for c, k in zip(caps, keq)]

    def final(r, i):
        return r if multiple <= r <= caps[i] else None

    def cost(rs):
        return sum(r * (m + n) if r is not None else m * n for r, (m, n) in zip(rs, shapes))

    def at(alpha):
        return [final(max(multiple, int(alpha * b) // multiple * multiple), i) for i, b in enumerate(base)]

    lo, hi = 0.0, float(max(keq)) / max(base.min(), 1.0) + 1.0
    if cost(at(lo)) > budget:
        return at(lo)  # even the smallest ranks miss the budget: the closest one can get
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(at(mid)) <= budget else (lo, mid)
    out = at(lo)
    spent = cost(out)
    # what rounding took from each linear (negative where the floor at ``multiple`` gave more)
    remainder = (lo * base - np.array([r or 0 for r in out])) / multiple
    for i in np.argsort(-remainder, kind="stable"):
        if out[i] is None:
            continue
        step = final(out[i] + multiple, i)
        m, n = shapes[i]
        if step is not None and spent + multiple * (m + n) <= budget:
            out[i], spent = step, spent + multiple * (m + n)
    return out


class _Linear:
    """One encoder linear with its full whitened SVD and input mean."""

    def __init__(self, dense, svd, mean):
        self.weight, self.bias = weight64(dense), None if dense.bias is None else dense.bias.detach().double()
        self.dtype, self.device = dense.weight.dtype, dense.weight.device
        self.svd, self.mean = svd, mean
        self.shape = tuple(self.weight.shape)

    def module(self, rank: int) -> FactorizedLinear:
        """Rank-``rank`` slice; with a mean, the bias absorbs ``(W - W_r) m`` (zero mean output error)."""
        left, right = self.svd.left[:, :rank], self.svd.right[:rank]
        bias = self.bias
        if self.mean is not None:
            shift = (self.weight - left @ right) @ self.mean
            bias = shift if bias is None else bias + shift
        return FactorizedLinear.from_factors(left, right, bias, dtype=self.dtype, device=self.device)


class _FeatureProbe:
    """Final features of search images with one or more linears swapped, run from the first changed block."""

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
            args, kwargs = self.inputs[start]
            hidden = args[0]
            for index in range(start, len(self.layers)):
                hidden = _layer_output(self.layers[index](hidden, *self.inputs[index][0][1:], **self.inputs[index][1]))
            features = self.norm(hidden).double()
        finally:
            for key, module in old.items():
                set_linear(self.model, key[0], key[1], module, self.spec)
        self.tail_passes += 1
        self.block_runs += len(self.layers) - start
        return float(((features - self.reference) ** 2).sum()) / self.energy


def _pixels(batches, count: int) -> torch.Tensor:
    tensors = [b["pixel_values"] if isinstance(b, dict) else b for b in batches]
    return torch.cat(tensors)[:count]


def _uniform_rank(m: int, n: int, ratio: float) -> int:
    # SVD-LLM's rule: the same parameter ratio for every matrix.
    return max(1, int(m * n * (1.0 - ratio) / (m + n)))


@register("flar")
def run_flar(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
             shrinkage: Any = "ledoit_wolf", criterion: str = "feature", latency_aware: bool = True,
             center: bool = True, damping: float = 1e-6, multiple: int = 8, search_images: int = 16,
             latency_batch: int = 1, latency_margin: float = 0.05, latency_cache_dir: Any = None,
             latency_table: LatencyTable | None = None, measure_latency: bool | None = None,
             statistics=None, search_memo: dict | None = None) -> RecipeResult:
    """FLAR-SVD (Thoma et al., CVPR 2025 Workshops) for ViT / DeiT / DINOv2 encoders.

    Parameters
    ----------
    ratio : float
        Fraction of the encoder linears' parameters to remove.
    shrinkage : {"ledoit_wolf", "oas", "reference", "none"} or float
        See :func:`shrunk_covariance`; ``"reference"`` reproduces the public
        code's intensity (~0), a float is a fixed intensity (1.0 = plain SVD).
    criterion : {"feature", "weight", "uniform"}
        ``feature``: normalised final-feature MSE with only that linear
        compressed, threshold = MSE of uniform compression at ``ratio`` / number
        of linears. ``weight``: cosine between ``W S`` and its rank-r slice,
        threshold = the mean cosine of uniform compression at ``ratio``.
        ``uniform``: SVD-LLM's one ratio for every matrix (no search, no rescale).
    latency_aware : bool
        Factorise only at ranks where the pair is measurably faster here.
    center : bool
        Whiten with the centred covariance and let the bias absorb the mean
        error (optimal for a biased linear); else the uncentred second moment.
    damping : float
        Relative Cholesky damping (``damping * mean(diag C)``).
    multiple : int
        Rank grid.
    search_images : int
        Calibration images whose final features the ``feature`` search compares.
    latency_batch, latency_margin, latency_cache_dir, latency_table
        Images per timed forward (rows = ``latency_batch`` x tokens per image);
        the "measurably faster" margin; where the JSON table lives; or a table
        to use instead.
    measure_latency : bool, optional
        Time the dense and compressed model end to end (default: ``latency_aware``).
    statistics : CalibrationResult, optional
        From :func:`flar_statistics` on the same dense model: skips calibration.
    search_memo : dict, optional
        Feature-criterion values shared between calls on the same dense model
        and calibration (e.g. a sweep over ratios).

    Notes
    -----
    With :math:`S S^\\top = (1 - s)\\Sigma + s \\mu I + \\delta I` (``Sigma`` the input covariance),
    ``W S = U \\Sigma V^T`` and ``W_r = U_r \\Sigma_r V_r^T S^{-1}``; the error
    :math:`E\\|(W - W_r)(x - m)\\|^2` is the tail :math:`\\sum_{i>r}\\sigma_i^2`
    (at ``s = 0``), and the bias ``b + (W - W_r) m`` removes the mean error.
    A searched rank reaching ``k_equiv = floor(m n / (m + n))`` keeps the linear dense.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not (shrinkage in SHRINKAGE or (isinstance(shrinkage, (int, float)) and 0.0 <= shrinkage <= 1.0)):
        raise ValueError(f"shrinkage must be one of {SHRINKAGE} or a number in [0, 1], got {shrinkage!r}")
    result = RecipeResult()
    batches = list(batches)
    with timer(result.timings, "calibration"):
        stats = statistics if statistics is not None else flar_statistics(model, spec, batches, progress=progress)
    result.calibration_tokens = stats.tokens
    images = sum(int((b["pixel_values"] if isinstance(b, dict) else b).shape[0]) for b in batches)
    tokens_per_image = stats.tokens // images

    with timer(result.timings, "factorisation"):
        linears, intensities, fallbacks = {}, {}, 0
        for layer, layer_stats in enumerate(stats.layers):
            for group in spec.input_groups:
                moments = layer_stats.inputs[group_name(group)]
                C, intensities[f"{layer}.{group_name(group)}"] = shrunk_covariance(moments, shrinkage, center=center)
                whitener = lrmath.whiten(C, method="cholesky", damping=damping)
                fallbacks += whitener.fallback is not None
                mean = moments.mean if center else None
                for role in group:
                    dense = get_linear(model, layer, role, spec)
                    svd = lrmath.whitened_svd(weight64(dense), whitener, min(dense.weight.shape))
                    linears[(layer, role)] = _Linear(dense, svd, mean)
    keys = list(linears)
    shapes = [linears[k].shape for k in keys]
    uniform = {k: _uniform_rank(*linears[k].shape, ratio) for k in keys}
    details: dict[str, Any] = {"shrinkage": shrinkage, "criterion": criterion, "latency_aware": latency_aware,
                               "center": center, "damping": damping, "multiple": multiple,
                               "shrinkage_intensity": intensities, "whitening_fallbacks": fallbacks}

    with timer(result.timings, "search"):
        searched, calls = _search(model, spec, batches, linears, uniform, criterion, details,
                                  search_images=search_images, multiple=multiple,
                                  memo=search_memo, memo_key=(str(shrinkage), center, damping))

    caps = None
    if latency_aware:
        with timer(result.timings, "latency"):
            param = next(model.parameters())
            table = latency_table or LatencyTable(param.device, param.dtype, cache_dir=latency_cache_dir,
                                                  margin=latency_margin)
            rows = latency_batch * tokens_per_image
            fast = {}
            for m, n in set(shapes):
                fast[(m, n)], _ = table.max_fast_rank(rows, n, m, hi=lrmath.k_equiv(m, n) - 1, multiple=multiple)
            caps = [fast[s] for s in shapes]
            details["latency_caps"] = {f"{m}x{n}": r for (m, n), r in fast.items()}
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes)
    if criterion == "uniform":
        limit = caps or [lrmath.k_equiv(m, n) - 1 for m, n in shapes]
        final = [r if r <= min(c, lrmath.k_equiv(*s) - 1) else None
                 for r, c, s in zip((uniform[k] for k in keys), limit, shapes)]
    else:
        final = rescale_ranks([searched[k] for k in keys], shapes, budget, multiple=multiple, caps=caps)

    measure = latency_aware if measure_latency is None else measure_latency
    dense_copy = copy.deepcopy(model) if measure else None
    with timer(result.timings, "surgery"):
        for key, rank in zip(keys, final):
            result.ranks[f"{key[0]}.{key[1]}"] = "dense" if rank is None else int(rank)
            if rank is not None:
                set_linear(model, key[0], key[1], linears[key].module(rank), spec)
    details["searched_ranks"] = {f"{k[0]}.{k[1]}": searched.get(k) for k in keys}
    details["search_calls"] = calls
    if latency_aware:
        details["latency"] = _latency_report(table, rows, keys, final, shapes)
    if measure:
        with timer(result.timings, "latency"):
            pixels = _pixels(batches, latency_batch)
            measured = time_models({"dense": dense_copy, "compressed": model}, pixels)
        report = details.setdefault("latency", {})
        report.update({"measured_dense_s": measured["dense"], "measured_compressed_s": measured["compressed"]})
        if "predicted_saving_s" in report:
            report["predicted_compressed_s"] = measured["dense"] - report["predicted_saving_s"]
    result.details = details
    return result


def _search(model, spec, batches, linears, uniform, criterion, details, *, search_images, multiple, memo, memo_key):
    """Per-linear bisection; returns ({key: rank or None}, calls) and fills ``details``."""
    keys = list(linears)
    if criterion == "uniform":
        details["forward_passes"] = {"search": 0}
        return dict(uniform), 0
    if criterion == "weight":
        energy = {}
        for key in keys:
            s2 = linears[key].svd.singular_values.double() ** 2
            energy[key] = torch.sqrt(torch.cumsum(s2, 0) / s2.sum()).cpu().numpy()  # cos(W S, (W S)_r) at r = i + 1
        cosine = [energy[k][min(uniform[k], len(energy[k])) - 1] for k in keys]
        threshold = 1.0 - float(np.mean(cosine))
        details["threshold"] = {"one_minus_cosine": threshold}
        searched, calls = {}, 0
        for key in keys:
            res = lrmath.bisect_rank(lambda r, e=energy[key]: 1.0 - float(e[r - 1]), multiple,
                                     lrmath.k_equiv(*linears[key].shape) - 1, multiple=multiple, threshold=threshold)
            searched[key], calls = res.rank, calls + res.calls
        details["forward_passes"] = {"search": 0, "note": "weight-space criterion needs no forward pass"}
        return searched, calls

    probe = _FeatureProbe(model, spec, _pixels(batches, search_images))
    uniform_mse = probe.nmse({k: linears[k].module(min(uniform[k], min(linears[k].shape))) for k in keys}, 0)
    threshold = uniform_mse / len(keys)
    memo = {} if memo is None else memo
    searched, calls, hits, non_monotone = {}, 0, 0, []
    for key in keys:
        values = {}

        def holds(r, key=key, values=values):
            nonlocal hits
            full_key = memo_key + (search_images, key[0], key[1], r)
            if full_key in memo:
                hits += 1
            else:
                memo[full_key] = probe.nmse({key: linears[key].module(r)}, key[0])
            values[r] = memo[full_key]
            return values[r] <= threshold

        res = lrmath.bisect_rank(holds, multiple, lrmath.k_equiv(*linears[key].shape) - 1, multiple=multiple)
        searched[key], calls = res.rank, calls + res.calls
        ordered = [values[r] for r in sorted(values)]
        if any(b > a * (1 + 1e-3) + 1e-12 for a, b in zip(ordered, ordered[1:])):
            non_monotone.append(f"{key[0]}.{key[1]}")
    layers = len(probe.layers)
    details["threshold"] = {"uniform_nmse": uniform_mse, "per_linear_nmse": threshold}
    details["non_monotone"] = non_monotone
    details["forward_passes"] = {
        "search_images": int(probe.reference.shape[0]),
        "tail_passes": probe.tail_passes,  # dense reference + uniform + one per new criterion value
        "memo_hits": hits,
        "block_runs": probe.block_runs,
        "full_forward_equivalent": probe.block_runs / layers,
    }
    return searched, calls


def _latency_report(table: LatencyTable, rows: int, keys, final, shapes) -> dict[str, Any]:
    """Predicted saving of the factorised linears from the measured table."""
    saving, factorised = 0.0, 0
    for rank, (m, n) in zip(final, shapes):
        if rank is not None:
            saving += table.dense_seconds(rows, n, m) - table.timing(rows, n, m, rank).pair_s
            factorised += 1
    table.save()
    return {"device": table.device_name, "table": None if table.path is None else str(table.path),
            "rows": rows, "shapes_measured": table.measured, "shapes_reused": table.reused,
            "factorised": factorised, "dense": len(final) - factorised, "predicted_saving_s": saving}
