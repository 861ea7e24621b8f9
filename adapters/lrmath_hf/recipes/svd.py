"""Activation-aware SVD recipes: ``svd`` (global spectrum-driven ranks) and ``svd-llm`` (uniform).

Both whiten each group of linears that share an input with one factor of its
input second moment ``C = X X^T`` and factorise every linear as
``W ~ left @ right`` (:func:`lrmath.whitened_svd`). They differ in the ranks:

* ``svd``: one budget for all linears of all layers; :func:`lrmath.allocate_ranks`
  keeps the components whose (relative) whitened energy per parameter is largest,
  ranks in multiples of ``multiple``, and a linear whose rank reaches
  ``k_equiv`` stays dense (FLAR-SVD's cap).
* ``svd-llm``: SVD-LLM's rule, one rank ratio for every matrix,
  ``r = int(m n (1 - ratio) / (m + n))``, Cholesky whitening.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import lrmath

from ..attention import fold_value_output
from ..specs import ArchSpec, get_attention, get_linear
from . import RecipeResult, register
from .common import group_name, host_view, input_plan, install_factors, run_calibration, timer, weight64

__all__ = ["whitened_factors", "run_svd", "run_svd_llm"]


def whitened_factors(model, spec: ArchSpec, stats, *, roles=None, whitening: str = "cholesky",
                     damping: float = 1e-6) -> dict[tuple[int, str], Any]:
    """Full whitened SVD of every linear in ``roles``: ``{(layer, role): SVDResult}``.

    One whitener per input group (q, k and v share one factorisation); every
    rank is then a slice of these factors, so the decisions need no second SVD.
    On the CPU the factors are numpy arrays (:func:`host_view`), else tensors on
    the model's device.
    """
    wanted = set(spec.roles if roles is None else roles)
    factors = {}
    for layer, layer_stats in enumerate(stats.layers):
        for group in spec.input_groups:
            members = [role for role in group if role in wanted]
            if not members:
                continue
            moments = layer_stats.inputs[group_name(group)]
            whitener = lrmath.whiten(host_view(moments.gram), method=whitening, damping=damping)
            for role in members:
                W = host_view(weight64(get_linear(model, layer, role, spec)))
                factors[(layer, role)] = lrmath.whitened_svd(W, whitener, min(W.shape))
    return factors


def _apply_ranks(model, spec, factors, ranks, *, block_identity: bool) -> dict[str, Any]:
    decided = {}
    for (layer, role), rank in ranks.items():
        m, n = spec.shape(role)
        if rank is None or rank >= lrmath.k_equiv(m, n):
            decided[f"{layer}.{role}"] = "dense"
            continue
        res = factors[(layer, role)]
        install_factors(model, spec, layer, role, res.left[:, :rank], res.right[:rank, :],
                        block_identity=block_identity)
        decided[f"{layer}.{role}"] = int(rank)
    return decided


def _vo_spectrum(moments) -> np.ndarray:
    """Gains of keeping value rank r in every KV head: ``s_r = sum_g lambda_{g,r}`` (sorted per head)."""
    eig = lrmath._backend.to_numpy(lrmath.pca_truncate(moments.second_moment(), 0).eigenvalues)
    return np.clip(eig, 0.0, None).sum(axis=0)


@register("svd")
def run_svd(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
            roles=None, whitening: str = "cholesky", damping: float = 1e-6, multiple: int = 8,
            energy: str = "relative", block_identity: bool = False, vo: str = "svd",
            stats=None) -> RecipeResult:
    """Whitened SVD of every linear with globally allocated ranks.

    Parameters
    ----------
    ratio : float
        Fraction of the compressed linears' parameters to remove.
    roles : iterable of str, optional
        Linear roles to compress (default: all of the spec's).
    whitening, damping : see :func:`lrmath.whiten`.
    multiple : int
        Ranks are multiples of this.
    energy : {"relative", "absolute"}
        Compare matrices by whitened energy normalised by each matrix's total
        (every linear's relative output error weighs the same) or by raw energy.
    block_identity : bool
        Store factors with an identity block (``r (m + n - r)`` parameters).
    vo : {"svd", "pca"}
        ``pca``: instead of factorising ``v`` and ``o``, fold FLAT-LLM's head-wise
        PCA of the value outputs into them (value head dim and V cache shrink);
        the layer's value rank competes in the same global allocation, with
        gains ``sum_g lambda_{g,r}`` and cost ``(G + H) n`` per unit of rank.
    stats : CalibrationResult, optional
        Statistics from an earlier calibration of the same dense model (e.g. to
        compress at several ratios from one calibration); must hold the plan's
        statistics.

    Notes
    -----
    Minimises :math:`\\sum_{\\ell} e_\\ell \\sum_{i > r_\\ell} \\sigma_{\\ell,i}^2` subject to
    :math:`\\sum_\\ell r_\\ell c_\\ell \\le (1 - \\text{ratio}) \\sum_\\ell m_\\ell n_\\ell`
    (:math:`c_\\ell = m_\\ell + n_\\ell`) with :math:`e_\\ell = 1 / \\|W_\\ell S_\\ell\\|_F^2`
    (relative) or 1, by :func:`lrmath.allocate_ranks` (a certified greedy; costs differ per shape).
    For the whitened SVD the tail sums are the exact output errors (Eckart-Young);
    for V/O PCA they are the value-output errors (FLAT-LLM Theorem 4.1).
    """
    if energy not in ("relative", "absolute"):
        raise ValueError(f"energy must be 'relative' or 'absolute', got {energy!r}")
    if vo not in ("svd", "pca"):
        raise ValueError(f"vo must be 'svd' or 'pca', got {vo!r}")
    roles = tuple(spec.roles if roles is None else roles)
    svd_roles = tuple(r for r in roles if not (vo == "pca" and r in ("v", "o")))
    result = RecipeResult()
    plan = input_plan(spec, svd_roles, order=2)  # whitening needs only the second moments
    if vo == "pca":
        plan = dataclasses.replace(plan, head_outputs={"v": (spec.linears["v"], spec.num_kv_heads, spec.head_dim)})
    if stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, plan, progress=progress)
    result.calibration_tokens = stats.tokens
    with timer(result.timings, "decisions"):
        factors = whitened_factors(model, spec, stats, roles=svd_roles, whitening=whitening, damping=damping)
        keys, spectra, cost, cap = [], [], [], []
        for key in factors:
            s2 = lrmath._backend.to_numpy(factors[key].singular_values) ** 2
            m, n = spec.shape(key[1])
            keys.append(key)
            spectra.append(s2)
            cost.append(m + n)
            cap.append(lrmath.round_rank(lrmath.k_equiv(m, n), multiple=multiple))
        if vo == "pca":
            for layer, layer_stats in enumerate(stats.layers):
                keys.append((layer, "vo"))
                spectra.append(_vo_spectrum(layer_stats.head_outputs["v"]))
                cost.append((spec.num_kv_heads + spec.num_heads) * spec.hidden_size)
                cap.append(spec.head_dim)
        if energy == "relative":
            spectra = [s / s.sum() if s.sum() > 0 else s for s in spectra]
        dense_total = sum(np.prod(spec.shape(role)) for _, role in factors)
        if vo == "pca":  # v and o of every layer
            dense_total += len(stats.layers) * (spec.num_kv_heads + spec.num_heads) * spec.head_dim * spec.hidden_size
        alloc = lrmath.allocate_ranks(spectra, (1.0 - ratio) * float(dense_total),
                                      cost=np.asarray(cost, float), multiple=multiple, max_rank=np.asarray(cap))
        # the top grid rank means "keep dense": a factorisation would not save parameters
        ranks = {key: (None if int(r) >= c else int(r)) for key, r, c in zip(keys, alloc.ranks, cap)}
        result.spectra = {f"{layer}.{role}": (s, int(r)) for (layer, role), s, r in zip(keys, spectra, alloc.ranks)}
    with timer(result.timings, "surgery"):
        svd_ranks = {k: r for k, r in ranks.items() if k[1] != "vo"}
        result.ranks = _apply_ranks(model, spec, factors, svd_ranks, block_identity=block_identity)
        for (layer, role), rank in ranks.items():
            if role != "vo":
                continue
            if rank is None:
                result.ranks[f"{layer}.vo"] = "dense"
                continue
            bases = lrmath.pca_truncate(stats.layers[layer].head_outputs["v"].second_moment(), rank).basis
            fold_value_output(get_attention(model, layer, spec), spec, bases)
            result.ranks[f"{layer}.vo"] = int(rank)
    result.details = {"energy": energy, "whitening": whitening, "damping": damping, "multiple": multiple,
                      "vo": vo, "allocation_gap": float(alloc.gap)}
    return result


@register("svd-llm")
def run_svd_llm(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
                roles=None, damping: float = 1e-6, stats=None) -> RecipeResult:
    """SVD-LLM baseline: Cholesky whitening, one rank ratio for every matrix.

    Notes
    -----
    Wang et al., SVD-LLM (ICLR 2025): ``r = int(m n (1 - ratio) / (m + n))``
    for every ``m x n`` weight, truncation-aware (Cholesky) whitening. Here
    the statistics are float64 and the damping relative.
    """
    result = RecipeResult()
    if stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, input_plan(spec, roles, order=2), progress=progress)
    result.calibration_tokens = stats.tokens
    with timer(result.timings, "decisions"):
        factors = whitened_factors(model, spec, stats, roles=roles, whitening="cholesky", damping=damping)
        ranks = {}
        for layer, role in factors:
            m, n = spec.shape(role)
            ranks[(layer, role)] = max(1, int(m * n * (1.0 - ratio) / (m + n)))
    with timer(result.timings, "surgery"):
        result.ranks = _apply_ranks(model, spec, factors, ranks, block_identity=False)
    result.details = {"whitening": "cholesky", "damping": damping}
    return result
