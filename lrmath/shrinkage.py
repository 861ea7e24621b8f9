"""Shrinkage covariance estimators: Ledoit-Wolf, OAS and a fixed intensity, from samples or streams."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._backend import as_work, device_of, namespace
from ._validation import check_array, check_finite, check_symmetric
from .moments import Moments, PowerSums

__all__ = ["ShrinkageResult", "ledoit_wolf", "oas", "shrink"]


class ShrinkageResult(NamedTuple):
    r"""Result of :func:`ledoit_wolf` and :func:`oas`.

    Attributes
    ----------
    covariance : array, shape (..., p, p)
        The shrunk covariance :math:`(1 - s) S + s \mu I`.
    shrinkage : array, shape (...)
        The intensity :math:`s \in [0, 1]`.
    target : array, shape (...)
        The scalar :math:`\mu = \operatorname{tr} S / p` of the target
        :math:`\mu I` (not the matrix, which is ``target * I``).
    """

    covariance: Any
    shrinkage: Any
    target: Any


def ledoit_wolf(data, *, assume_centered: bool = False) -> ShrinkageResult:
    r"""Ledoit-Wolf shrinkage of the empirical covariance toward :math:`\mu I`.

    Parameters
    ----------
    data : array, shape (..., n, p), or Moments
        Samples as rows (leading dimensions are independent batches), or a
        :class:`~lrmath.Moments` that has accumulated them (one pass over the
        data suffices).
    assume_centered : bool, optional
        If True, use the sums about the origin: :math:`S = X^\top X / n`
        (scikit-learn's semantics). Default: centre on the sample mean.

    Returns
    -------
    ShrinkageResult
        float64 (float32 on devices without float64) on the library and
        device of the data.

    Raises
    ------
    ValueError
        On empty data, a ``Moments`` with count 0, wrong ndim or NaN/Inf.

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

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> X = 5.0 + np.random.default_rng(0).standard_normal((50, 10))
    >>> res = lrmath.ledoit_wolf(X)
    >>> 0.0 <= float(res.shrinkage) <= 1.0
    True
    """
    sums, xp = _power_sums(data, assume_centered)
    S, mu, gap2 = _empirical(sums, xp)
    n = float(sums.count)
    p = S.shape[-1]
    delta = gap2 / p
    beta = (sums.fourth - xp.sum(sums.second * sums.second, axis=(-2, -1)) / n) / (n * n * p)
    beta = xp.minimum(xp.clip(beta, min=0.0), delta)
    positive = delta > 0
    s = xp.where(positive, beta / xp.where(positive, delta, xp.ones_like(delta)), xp.zeros_like(delta))
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


def shrink(C, shrinkage: float):
    r"""Fixed-intensity shrinkage :math:`(1 - s) C + s \bar c I`, :math:`\bar c = \operatorname{tr} C / p`.

    Parameters
    ----------
    C : array, shape (..., p, p)
        Symmetric matrices (covariances or second moments).
    shrinkage : float
        The intensity :math:`s \in [0, 1]`.

    Returns
    -------
    array, shape (..., p, p)
        float64 (float32 on devices without float64), on ``C``'s library and device.

    Raises
    ------
    ValueError
        If ``C`` is not square/symmetric or holds NaN/Inf, or ``shrinkage``
        is not a number in [0, 1].

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
    xp = check_symmetric("C", C)
    try:
        s = float(shrinkage)
    except (TypeError, ValueError):
        raise ValueError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
    Cw = as_work(C, xp)
    mu = xp.linalg.trace(Cw) / C.shape[-1]
    return _blend(Cw, s, mu, xp)


# --------------------------------------------------------------------- helpers
def _power_sums(data, assume_centered: bool) -> tuple[PowerSums, Any]:
    """Power sums of the data about the mean, or about the origin when ``assume_centered``."""
    if isinstance(data, Moments):
        if data.count == 0:
            raise ValueError("data is a Moments with count 0: there are no samples to estimate from")
        acc = data
    else:
        xp = check_array("data", data, min_ndim=2)
        n, p = data.shape[-2], data.shape[-1]
        if n == 0 or p == 0:
            raise ValueError(f"data is empty (shape {tuple(data.shape)}): need n >= 1 samples of p >= 1 features")
        acc = Moments(p, batch_shape=tuple(data.shape[:-2]), device=device_of(data))
        try:  # update detects NaN / Inf from its sums, without a separate pass over data
            acc.update(data)
        except ValueError:
            check_finite("data", data, xp)  # names them as this function's argument
            raise
    sums = acc.sums(about="origin" if assume_centered else "mean")
    return sums, namespace(sums.second)


def _empirical(sums: PowerSums, xp):
    """``S = second / n``, ``mu = tr S / p`` and ``||S - mu I||_F^2``."""
    S = sums.second / sums.count
    S = (S + xp.matrix_transpose(S)) / 2  # exact symmetry for the decompositions downstream
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
