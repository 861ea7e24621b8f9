"""Shrinkage covariance estimators: Ledoit-Wolf, OAS and a fixed intensity, from samples or streams."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._backend import as_work, device_of, namespace
from ._validation import check_array, check_finite, check_symmetric
from .moments import Moments, PowerSums

__all__ = ["TARGETS", "ShrinkageResult", "ledoit_wolf", "oas", "shrink"]


class ShrinkageResult(NamedTuple):
    r"""Result of :func:`ledoit_wolf` and :func:`oas`.

    Attributes
    ----------
    covariance : array, shape (..., p, p)
        The shrunk covariance :math:`(1 - s) S + s T`.
    shrinkage : array, shape (...)
        The intensity :math:`s \in [0, 1]`.
    target : array, shape (...) or (..., p)
        What defines :math:`T` (not the matrix itself): the scalar
        :math:`\mu = \operatorname{tr} S / p` of :math:`T = \mu I`, or, for
        ``target="diagonal"``, the variances :math:`\operatorname{diag} S` of
        :math:`T = \operatorname{Diag}(S)`.
    """

    covariance: Any
    shrinkage: Any
    target: Any


TARGETS = ("identity", "diagonal")


def ledoit_wolf(data, *, assume_centered: bool = False, target: str = "identity") -> ShrinkageResult:
    r"""Ledoit-Wolf shrinkage of the empirical covariance toward :math:`\mu I` or its own diagonal.

    Parameters
    ----------
    data : array, shape (..., n, p), or Moments
        Samples as rows (leading dimensions are independent batches), or a
        :class:`~lrmath.Moments` that has accumulated them (one pass over the
        data suffices).
    assume_centered : bool, optional
        If True, use the sums about the origin: :math:`S = X^\top X / n`
        (scikit-learn's semantics). Default: centre on the sample mean.
    target : {"identity", "diagonal"}, optional
        ``"identity"`` (default): :math:`T = \mu I`, Ledoit & Wolf's target
        (scikit-learn's ``LedoitWolf``). ``"diagonal"``: :math:`T = \operatorname{Diag}(S)`,
        which keeps every variance and shrinks only the covariances; use it when
        a few features carry most of the variance (massive activations), where
        :math:`\mu I` lifts the small directions by a ridge set by the large ones.

    Returns
    -------
    ShrinkageResult
        float64 (float32 on devices without float64) on the library and
        device of the data.

    Raises
    ------
    ValueError
        On empty data, a ``Moments`` with count 0, wrong ndim or NaN/Inf, an
        unknown ``target``, a ``Moments`` with ``order=2`` (no fourth sums),
        data whose fourth powers underflow float64 (a scale below ~1e-77),
        or ``target="diagonal"`` on a ``Moments`` without the per-feature sums
        (``per_feature=False``, or loaded from a state without them, such as
        format version 1).

    Notes
    -----
    Ledoit & Wolf, "A well-conditioned estimator for large-dimensional
    covariance matrices", J. Multivariate Anal. 88 (2004), Lemma 3.2 / 3.3,
    in scikit-learn's normalisation. With :math:`S = \frac1n \sum_k y_k y_k^\top`
    (:math:`y_k` the centred rows),

    .. math::
        \mu = \frac{\operatorname{tr} S}{p}, \quad
        \delta = \frac{\|S - \mu I\|_F^2}{p}, \quad
        \beta = \frac{1}{n^2 p} \sum_k \|y_k y_k^\top - S\|_F^2
              = \frac{1}{n^2 p}\Big(\sum_k \|y_k\|^4 - n \|S\|_F^2\Big),

    :math:`s = \min(\beta, \delta) / \delta` (0 when :math:`\delta = 0`).
    :math:`\delta` is summed from the entries of :math:`S - \mu I` (never the
    cancelling :math:`\|S\|_F^2 - p\mu^2`), and :math:`\beta` is clipped at 0
    against rounding, so :math:`s \in [0, 1]` always.

    With ``target="diagonal"`` the same estimate of the optimal intensity is
    taken over the off-diagonal entries only (Schaefer & Strimmer, "A shrinkage
    approach to large-scale covariance matrix estimation", Stat. Appl. Genet.
    Mol. Biol. 4 (2005), target D, in the normalisation above):

    .. math::
        \delta_D = \sum_{i \ne j} S_{ij}^2, \quad
        \beta_D = \frac{1}{n^2} \sum_k \sum_{i \ne j} (y_{ki} y_{kj} - S_{ij})^2
                = \frac{1}{n^2}\Big(\sum_k \|y_k\|^4 - \sum_k \sum_i y_{ki}^4 - n \delta_D\Big),

    :math:`s = \min(\beta_D, \delta_D) / \delta_D` and :math:`C = S - s (S - \operatorname{Diag} S)`;
    the per-feature :math:`\sum_k y_{ki}^4` come from the same single pass
    (:attr:`PowerSums.fourth_diag`).

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> X = 5.0 + np.random.default_rng(0).standard_normal((50, 10))
    >>> res = lrmath.ledoit_wolf(X)
    >>> 0.0 <= float(res.shrinkage) <= 1.0
    True
    >>> diagonal = lrmath.ledoit_wolf(X, target="diagonal")  # keeps every variance
    >>> bool(np.allclose(np.diag(diagonal.covariance), X.var(axis=0), rtol=1e-12))
    True
    """
    _check_target(target)
    if isinstance(data, Moments) and data.order < 4:
        raise ValueError("Ledoit-Wolf needs the fourth power sums, which this Moments does not keep (built "
                         "with order=2, or merged with one that was): accumulate the statistics again with "
                         "order=4, or use lrmath.oas, which needs only the second moment")
    if target == "diagonal" and isinstance(data, Moments) and not data.per_feature:
        raise ValueError('target="diagonal" needs the per-feature sums, which this Moments does not keep '
                         "(built with per_feature=False, or loaded from a state without d3 / d4, such as "
                         "format version 1): accumulate the statistics again with per_feature=True")
    sums, xp = _power_sums(data, assume_centered, per_feature=target == "diagonal")
    _check_fourth_sums(sums, xp)
    if target == "diagonal":
        return _ledoit_wolf_diagonal(sums, xp)
    S, mu, gap2 = _empirical(sums, xp)
    n = float(sums.count)
    p = S.shape[-1]
    delta = gap2 / p
    beta = (sums.fourth - xp.sum(sums.second * sums.second, axis=(-2, -1)) / n) / (n * n * p)
    s = _intensity(beta, delta, xp)
    return ShrinkageResult(_blend(S, s, mu, xp), s, mu)


def oas(data, *, assume_centered: bool = False) -> ShrinkageResult:
    r"""Oracle Approximating Shrinkage (OAS) of the empirical covariance toward :math:`\mu I`.

    Parameters
    ----------
    data : array, shape (..., n, p), or Moments
        As in :func:`ledoit_wolf`.
    assume_centered : bool, optional
        As in :func:`ledoit_wolf`.

    Returns
    -------
    ShrinkageResult

    Notes
    -----
    Chen, Wiesel, Eldar & Hero, "Shrinkage algorithms for MMSE covariance
    estimation", IEEE Trans. Signal Process. 58 (2010), eq. (23), in
    scikit-learn's form (the :math:`2/p` factors dropped): with
    :math:`\alpha = \|S\|_F^2 / p^2` and :math:`\mu = \operatorname{tr} S / p`,

    .. math::
        s = \min\Big(\frac{\alpha + \mu^2}{(n + 1)(\alpha - \mu^2/p)}, 1\Big),

    1 when the denominator is 0, and 0 when :math:`p = 1` (where every
    intensity gives the same matrix). :math:`\alpha - \mu^2/p` is evaluated as
    :math:`\|S - \mu I\|_F^2 / p^2`, which is the same number without the
    cancellation and never negative.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> X = np.random.default_rng(0).standard_normal((40, 6))
    >>> bool(np.allclose(np.trace(lrmath.oas(X).covariance), np.trace(np.cov(X.T, bias=True))))
    True
    """
    sums, xp = _power_sums(data, assume_centered)
    S, mu, gap2 = _empirical(sums, xp)
    n = float(sums.count)
    p = S.shape[-1]
    alpha = xp.sum(S * S, axis=(-2, -1)) / (p * p)
    num = alpha + mu * mu
    den = (n + 1.0) * gap2 / (p * p)
    positive = den > 0
    ratio = num / xp.where(positive, den, xp.ones_like(den))
    s = xp.where(positive, xp.clip(ratio, max=1.0), xp.ones_like(den))
    if p == 1:
        s = xp.zeros_like(s)
    return ShrinkageResult(_blend(S, s, mu, xp), s, mu)


def shrink(C, shrinkage: float, *, target: str = "identity"):
    r"""Fixed-intensity shrinkage :math:`(1 - s) C + s \bar c I`, :math:`\bar c = \operatorname{tr} C / p`.

    Parameters
    ----------
    C : array, shape (..., p, p)
        Symmetric matrices (covariances or second moments).
    shrinkage : float
        The intensity :math:`s \in [0, 1]`.
    target : {"identity", "diagonal"}, optional
        :math:`\bar c I` (default) or :math:`\operatorname{Diag}(C)`, which gives
        :math:`(1 - s) C + s \operatorname{Diag}(C)` (every diagonal entry kept).

    Returns
    -------
    array, shape (..., p, p)
        float64 (float32 on devices without float64), on ``C``'s library and device.

    Raises
    ------
    ValueError
        If ``C`` is not square/symmetric or holds NaN/Inf, ``shrinkage``
        is not a number in [0, 1], or ``target`` is unknown.

    Notes
    -----
    The form of FLAR-SVD (Thoma et al., CVPR 2025 Workshops) with the
    intensity chosen by the caller; its trace-preserving target keeps
    :math:`\operatorname{tr} C`. Use :func:`ledoit_wolf` / :func:`oas` to
    choose the intensity from data.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> lrmath.shrink(np.array([[3.0, 1.0], [1.0, 1.0]]), 0.5)
    array([[2.5, 0.5],
           [0.5, 1.5]])
    """
    _check_target(target)
    xp = check_symmetric("C", C)
    try:
        s = float(shrinkage)
    except (TypeError, ValueError):
        raise ValueError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
    Cw = as_work(C, xp)
    if target == "diagonal":
        return Cw - s * _off_diagonal(Cw, xp)
    mu = xp.linalg.trace(Cw) / C.shape[-1]
    return _blend(Cw, s, mu, xp)


# --------------------------------------------------------------------- helpers
def _power_sums(data, assume_centered: bool, per_feature: bool = False) -> tuple[PowerSums, Any]:
    """Power sums of the data about the mean, or about the origin when ``assume_centered``.

    Samples get an accumulator of their own, with the entrywise sums only if ``per_feature``.
    """
    if isinstance(data, Moments):
        if data.count == 0:
            raise ValueError("data is a Moments with count 0: there are no samples to estimate from")
        acc = data
    else:
        xp = check_array("data", data, min_ndim=2)
        n, p = data.shape[-2], data.shape[-1]
        if n == 0 or p == 0:
            raise ValueError(f"data is empty (shape {tuple(data.shape)}): need n >= 1 samples of p >= 1 features")
        acc = Moments(p, batch_shape=tuple(data.shape[:-2]), device=device_of(data), per_feature=per_feature)
        try:  # update detects NaN / Inf from its sums, without a separate pass over data
            acc.update(data)
        except ValueError:
            check_finite("data", data, xp)  # names them as this function's argument
            raise
    sums = acc.sums(about="origin" if assume_centered else "mean")
    return sums, namespace(sums.second)


def _check_fourth_sums(sums: PowerSums, xp) -> None:
    """Refuse fourth sums that underflowed (the data's scale is below ~1e-77), rather than return ``s = 0``.

    Cauchy-Schwarz: ``sum |z_k|^4 >= (sum |z_k|^2)^2 / n``; underflow breaks it (to 0 when every
    fourth power underflows). Half the bound leaves room for rounding and float32 Grams. Below
    ~1e-162 the squares underflow too and the data read as constant (``S = 0``).
    """
    second = xp.linalg.trace(sums.second)
    live = second > 0  # all-zero deviations: nothing to check
    # fourth / second >= second / n, divided through so that no product of two small sums underflows
    ratio = sums.fourth / xp.where(live, second, xp.ones_like(second))
    if bool(xp.any(live & (ratio < 0.5 * second / sums.count))):
        raise ValueError("the data's fourth powers underflow float64 (|x - mean| below about 1e-77): "
                         "multiply the data by a power of two first (the intensity does not depend on the "
                         "scale; the covariance scales with its square)")


def _sample_covariance(sums: PowerSums, xp):
    """``S = second / n``, exactly symmetric for the decompositions downstream."""
    S = sums.second / sums.count
    return (S + xp.matrix_transpose(S)) / 2


def _empirical(sums: PowerSums, xp):
    """``S = second / n``, ``mu = tr S / p`` and ``||S - mu I||_F^2``."""
    S = _sample_covariance(sums, xp)
    p = S.shape[-1]
    mu = xp.linalg.trace(S) / p
    eye = xp.eye(p, dtype=S.dtype, device=device_of(S))
    gap = S - mu[..., None, None] * eye
    return S, mu, xp.sum(gap * gap, axis=(-2, -1))


def _blend(S, s, mu, xp):
    """``(1 - s) S + s mu I`` for scalar or batched ``s`` and ``mu``."""
    eye = xp.eye(S.shape[-1], dtype=S.dtype, device=device_of(S))
    if isinstance(s, float):
        return (1.0 - s) * S + (s * mu)[..., None, None] * eye
    return (1.0 - s)[..., None, None] * S + (s * mu)[..., None, None] * eye


def _check_target(target):
    if not (isinstance(target, str) and target in TARGETS):
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def _off_diagonal(S, xp):
    """``S`` with its diagonal set to zero."""
    eye = xp.eye(S.shape[-1], dtype=S.dtype, device=device_of(S))
    return S * (1.0 - eye)


def _intensity(beta, delta, xp):
    """``min(max(beta, 0), delta) / delta``, 0 where ``delta = 0``: always in [0, 1]."""
    beta = xp.minimum(xp.clip(beta, min=0.0), delta)
    positive = delta > 0
    return xp.where(positive, beta / xp.where(positive, delta, xp.ones_like(delta)), xp.zeros_like(delta))


def _ledoit_wolf_diagonal(sums: PowerSums, xp) -> ShrinkageResult:
    """Ledoit-Wolf's intensity for the target ``Diag(S)`` (see :func:`ledoit_wolf`, Notes)."""
    n = float(sums.count)
    S = _sample_covariance(sums, xp)
    off = _off_diagonal(S, xp)
    delta = xp.sum(off * off, axis=(-2, -1))
    beta = ((sums.fourth - xp.sum(sums.fourth_diag, axis=-1)) / n - delta) / n
    s = _intensity(beta, delta, xp)
    return ShrinkageResult(S - s[..., None, None] * off, s, xp.linalg.diagonal(S))
