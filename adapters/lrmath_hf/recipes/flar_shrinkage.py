"""Shrinkage of FLAR's input covariances: the estimators, and the held-out choice of the intensity.

``shrunk_covariance`` (Ledoit-Wolf, OAS, the reference code's intensity, none, or a
fixed one) and ``shrinkage="heldout"``: the calibration accumulated in folds
(:func:`fold_batches`, :func:`merge_statistics`), each input group's intensity the
multiple of its Ledoit-Wolf intensity with the least held-out truncation error
(:func:`heldout_error`, :func:`heldout_intensity`). See docs/vit.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import lrmath
from lrmath.shrinkage import TARGETS

from ..calibrate import CalibrationResult, LayerStats, pixel_values

HELDOUT_GRID = (0.0, 1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0)  # multiples of the Ledoit-Wolf intensity
IDENTITY_ONLY = ("oas", "reference", "none")  # estimators defined with the target mu I


def resolve_target(shrinkage: Any, target: str | None) -> str:
    """The shrinkage target FLAR uses: ``Diag(S)`` for Ledoit-Wolf and held-out by default, else ``mu I``.

    A fixed intensity keeps ``mu I`` by default, so 1.0 still means plain SVD.
    """
    if target is None:
        return "diagonal" if shrinkage in ("ledoit_wolf", "heldout") else "identity"
    if target not in TARGETS:
        raise ValueError(f"shrinkage_target must be one of {TARGETS} or None, got {target!r}")
    if target == "diagonal" and isinstance(shrinkage, str) and shrinkage in IDENTITY_ONLY:
        raise ValueError(f'shrinkage={shrinkage!r} is defined with the target mu I: shrinkage_target="diagonal" '
                         'needs "ledoit_wolf", "heldout" or a fixed intensity')
    return target


def fold_batches(batches, folds: int = 2) -> list[list]:
    """Disjoint folds of the calibration: batch ``i`` goes to fold ``i % folds``.

    With fewer batches than folds, the images of every batch are dealt out the same way.
    """
    batches = [pixel_values(b) for b in batches]
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


def shrunk_covariance(moments: lrmath.Moments, shrinkage: Any = "ledoit_wolf", *, center: bool = True,
                      target: str | None = None):
    """``((1 - s) S + s T, s)`` for one input group, ``T = mu I`` or ``Diag(S)``.

    ``shrinkage``: ``"ledoit_wolf"``, ``"oas"``, ``"reference"`` (:func:`reference_intensity`),
    ``"none"`` or a fixed ``s`` in [0, 1] (``"heldout"`` needs folds: :func:`heldout_intensity`).
    ``target``: ``"identity"``, ``"diagonal"`` or ``None`` (:func:`resolve_target`).
    ``S`` is the covariance (``center``) or the uncentred second moment.  Returns a
    float64 ``(p, p)`` tensor and ``s``.
    """
    if shrinkage == "heldout":
        raise ValueError('shrinkage="heldout" is chosen per group from fold statistics: use heldout_intensity')
    target = resolve_target(shrinkage, target)
    if shrinkage == "ledoit_wolf":
        res = lrmath.ledoit_wolf(moments, assume_centered=not center, target=target)
        return res.covariance, float(res.shrinkage)
    if shrinkage == "oas":
        res = lrmath.oas(moments, assume_centered=not center)
        return res.covariance, float(res.shrinkage)
    S = moments.covariance() if center else moments.second_moment()
    if shrinkage == "none":
        return S, 0.0
    s = reference_intensity(S) if shrinkage == "reference" else float(shrinkage)
    return lrmath.shrink(S, s, target=target), s


def _fold_parts(moments: lrmath.Moments, center: bool):
    """``(S, mu, m)``: float64 covariance (or second moment), ``tr S / p`` and mean (``None`` uncentred)."""
    S = (moments.covariance() if center else moments.second_moment()).to(torch.float64)
    S = (S + S.T) / 2
    return S, float(torch.trace(S)) / S.shape[0], moments.mean.to(torch.float64) if center else None


def heldout_error(weights, fit: lrmath.Moments, test: lrmath.Moments, intensities, ranks, *,
                  center: bool = True, target: str = "identity") -> np.ndarray:
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
    target : {"identity", "diagonal"}
        The shrinkage target ``T``: :math:`\mu I` or :math:`\operatorname{Diag}(S_{\mathrm{fit}})`.

    Returns
    -------
    numpy.ndarray
        One error per intensity (float64).

    Notes
    -----
    With :math:`C_s = (1 - s) S_{\mathrm{fit}} + s T` and :math:`W C_s^{1/2} = U \Sigma V^\top`,
    the whitened rank-``r`` truncation is :math:`W_r = U_r U_r^\top W` (any square root gives
    the same :math:`U_r`), so :math:`W - W_r = (I - U_r U_r^\top) W` and

    .. math::
        e(s) = \sum_j \operatorname{tr}\big((W_j - W_{j,r_j}) T (W_j - W_{j,r_j})^\top\big)
             = \sum_j \operatorname{tr}(W_j T W_j^\top) - \operatorname{tr}(U_{j,r}^\top W_j T W_j^\top U_{j,r}),

    :math:`T = S_{\mathrm{test}} + d d^\top`, :math:`d = m_{\mathrm{test}} - m_{\mathrm{fit}}`
    (the bias correction uses the fit's mean), or the test's second moment when
    uncentred.  :math:`U_r` comes from the eigenvectors of the ``m x m``
    :math:`(1 - s) W S W^\top + s W T W^\top` when ``m <= p``, otherwise from
    :math:`W E \operatorname{diag}((1 - s)\lambda + s\mu)^{1/2}` with :math:`S = E \Lambda E^\top`
    (target :math:`\mu I`) or from :math:`W C_s^{1/2}` by an eigendecomposition of each
    :math:`C_s` (target :math:`\operatorname{Diag} S`).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    S, mu, mean = _fold_parts(fit, center)
    diagonal = target == "diagonal"
    T_s = torch.diag(torch.diagonal(S)) if diagonal else mu * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
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
            A, B = W @ S @ W.T, W @ T_s @ W.T
        elif eig is None and not diagonal:
            eig = torch.linalg.eigh(S)
        for i, s in enumerate(intensities):
            if m <= p:
                G = (1.0 - s) * A + s * B
                U = torch.linalg.eigh((G + G.T) / 2).eigenvectors[:, -r:]
            elif diagonal:
                e = torch.linalg.eigh((1.0 - s) * S + s * T_s)
                U = torch.linalg.svd(W @ (e.eigenvectors * torch.sqrt(torch.clamp(e.eigenvalues, min=0.0))),
                                     full_matrices=False).U[:, :r]
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
                      center: bool = True, target: str = "identity") -> dict[str, Any]:
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
    center, target : bool, str
        As in :func:`heldout_error` (the Ledoit-Wolf intensity is that of ``target``).

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
        s_fit = float(lrmath.ledoit_wolf(fit, assume_centered=not center, target=target).shrinkage)
        errors += heldout_error(weights, fit, test, [min(1.0, c * s_fit) for c in grid], ranks, center=center,
                                target=target)
    best = int(np.argmin(errors))
    s_full = float(lrmath.ledoit_wolf(full, assume_centered=not center, target=target).shrinkage)
    return {"intensity": min(1.0, grid[best] * s_full), "multiple": grid[best], "ledoit_wolf": s_full,
            "errors": errors.tolist()}
