"""Rank search: equivalent rank, rounding to hardware multiples, bisection, tail-sum ranks (FLAR-SVD, Section 4)."""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, NamedTuple

import numpy as np

from ._backend import as_work, to_numpy
from ._validation import check_array, check_finite, check_nonnegative_scalar, dtype_eps

__all__ = ["k_equiv", "round_rank", "BisectResult", "bisect_rank", "rank_for_error"]

ROUND_MODES = ("down", "up", "nearest")


def _int(name: str, value, lower: int | None = None) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if lower is not None and v < lower:
        raise ValueError(f"{name} must be >= {lower}, got {v}")
    return v


def k_equiv(m: int, n: int) -> int:
    r"""Largest rank whose factorised form is no larger than the dense matrix.

    Parameters
    ----------
    m, n : int
        Shape of the dense weight, both >= 1.

    Returns
    -------
    int
        :math:`\lfloor m n / (m + n) \rfloor`, computed in exact integer arithmetic.

    Notes
    -----
    FLAR-SVD (Thoma et al., CVPR 2025 Workshops), Section 4: the factors
    :math:`U_k \in \mathbb{R}^{m\times k}`, :math:`V_k \in \mathbb{R}^{k\times n}` hold
    :math:`k(m+n)` numbers, so :math:`k(m+n) \le mn` iff :math:`k \le k_{\mathrm{equiv}}`.
    A layer whose chosen rank reaches this value should stay dense.

    Examples
    --------
    >>> import lrmath
    >>> lrmath.k_equiv(4096, 4096), lrmath.k_equiv(768, 3072)
    (2048, 614)
    """
    m = _int("m", m, 1)
    n = _int("n", n, 1)
    return (m * n) // (m + n)


def round_rank(r, multiple: int = 8, cap: int | None = None, mode: str = "down"):
    """Round a rank (or an integer array of ranks) to a multiple of ``multiple``.

    Parameters
    ----------
    r : int or integer array (numpy, torch, cupy)
        Rank(s) >= 0.
    multiple : int
        Granularity, >= 1 (8, 16, 32 suit tensor cores).
    cap : int, optional
        Upper bound: a rounded value above ``cap`` becomes the largest multiple
        of ``multiple`` that is ``<= cap`` (so the result is always on the grid).
    mode : {"down", "up", "nearest"}
        ``down``: largest multiple ``<= r`` (FLAR-SVD; may give 0, which means
        "drop the layer's contribution": callers that need at least one block
        use ``up`` or ``max(multiple, .)``). ``up``: smallest multiple ``>= r``.
        ``nearest``: the closer of the two, ties rounded up.

    Returns
    -------
    int or array
        Same kind as ``r`` (a Python ``int`` for an integer, an array of the
        same library and device otherwise).

    Examples
    --------
    >>> import lrmath
    >>> [lrmath.round_rank(100, 8, mode=m) for m in ("down", "up", "nearest")]
    [96, 104, 104]
    >>> lrmath.round_rank(100, 8, cap=100, mode="up")
    96
    """
    multiple = _int("multiple", multiple, 1)
    if mode not in ROUND_MODES:
        raise ValueError(f"mode must be one of {ROUND_MODES}, got {mode!r}")
    if cap is not None:
        cap = _int("cap", cap, 0)
    if hasattr(r, "shape"):
        xp = check_array("r", r)
        if not xp.isdtype(r.dtype, "integral"):
            raise ValueError(f"r must hold integers, got dtype {r.dtype}")
        if r.size and bool(xp.any(r < 0)):
            raise ValueError("r must be >= 0")
    else:
        r = _int("r", r, 0)
    is_array = hasattr(r, "shape")
    down = (r // multiple) * multiple
    if mode == "down":
        out = down
    elif mode == "up":
        out = ((r + multiple - 1) // multiple) * multiple
    elif is_array:  # nearest, ties up: the upper neighbour is at least as close
        out = xp.where(2 * (r - down) >= multiple, down + multiple, down)
    else:
        out = down + multiple if 2 * (r - down) >= multiple else down
    if cap is not None:
        top = (cap // multiple) * multiple
        out = xp.clip(out, max=top) if is_array else min(out, top)
    return out


class BisectResult(NamedTuple):
    """Result of :func:`bisect_rank`.

    Attributes
    ----------
    rank : int or None
        Smallest grid rank where the criterion holds; ``None`` when it fails
        even at the largest grid rank (``satisfied`` is then ``False``).
    calls : int
        Number of distinct criterion evaluations made.
    satisfied : bool
        Whether the criterion holds at ``rank``.
    history : tuple of (int, object)
        Every evaluation in call order: the rank and what the criterion returned.
    """

    rank: int | None
    calls: int
    satisfied: bool
    history: tuple


def bisect_rank(criterion: Callable[[int], Any], lo: int, hi: int, *, multiple: int = 1,
                threshold: float | None = None, rtol: float = 0.0) -> BisectResult:
    r"""Smallest rank on the grid ``lo, lo + multiple, ... <= hi`` where a monotone criterion holds.

    Parameters
    ----------
    criterion : callable
        ``criterion(r)`` for an int ``r``. Without ``threshold`` it returns a
        truth value that is False below some rank and True from it on. With
        ``threshold`` it returns an error (a real number) that must be
        non-increasing in ``r``; the condition is ``error <= threshold``.
    lo, hi : int
        Range of ranks, ``0 <= lo <= hi``. ``hi`` need not be on the grid.
    multiple : int
        Grid step (8 in FLAR-SVD).
    threshold : float, optional
        Switches to the error form of ``criterion`` described above, which lets
        the search detect a non-monotone criterion.
    rtol : float
        Relative slack of the monotonicity check: ``e(a) < e(b) * (1 - rtol)``
        (with ``a < b``) counts as an increase. Use it for errors measured with
        noise (e.g. a feature MSE in float32).

    Returns
    -------
    BisectResult
        ``rank`` (``None`` when even the largest grid rank fails), ``calls``,
        ``satisfied`` and the evaluation ``history``.

    Raises
    ------
    ValueError
        If ``lo > hi``, a value is negative or not an integer, the criterion
        returns a non-finite error, or (with ``threshold``) two evaluated ranks
        ``a < b`` show ``error(a) < error(b)``: the criterion is not monotone,
        and a bisection over it would return an arbitrary rank.

    Notes
    -----
    FLAR-SVD (Thoma et al., CVPR 2025 Workshops), Section 4 bisects the rank of
    each layer over multiples of 8 up to :math:`k_{\mathrm{equiv}}`, relying on the
    Eckart--Young tail :math:`\sum_{i>k}\sigma_i^2` being non-increasing in ``k``.

    With ``n`` grid points there are ``n + 1`` possible answers (one per grid
    point, or none), so the search makes at most
    :math:`\lceil \log_2(n+1) \rceil \le \lceil \log_2 n \rceil + 1` evaluations, each
    rank at most once (memoised). A truth-valued criterion can never be caught
    being non-monotone by a bisection: every answer it sees is consistent with
    some monotone criterion. An error-valued one can: its values at the
    evaluated ranks must be non-increasing, and are checked after every call.

    Examples
    --------
    >>> import lrmath
    >>> res = lrmath.bisect_rank(lambda r: r >= 37, 8, 128, multiple=8)
    >>> res.rank, res.satisfied, res.calls <= 5
    (40, True, True)
    >>> lrmath.bisect_rank(lambda r: 100.0 / (r + 1), 0, 64, threshold=2.0).rank
    49
    """
    if not callable(criterion):
        raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
    lo = _int("lo", lo, 0)
    hi = _int("hi", hi, 0)
    multiple = _int("multiple", multiple, 1)
    if lo > hi:
        raise ValueError(f"lo = {lo} must be <= hi = {hi}")
    if threshold is not None:
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
    rtol = check_nonnegative_scalar("rtol", rtol)
    n = (hi - lo) // multiple + 1
    memo: dict[int, Any] = {}
    history: list[tuple[int, Any]] = []

    def holds(i: int) -> bool:
        r = lo + i * multiple
        if r not in memo:
            value = criterion(r)
            history.append((r, value))
            if threshold is not None:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"criterion returned a non-finite error {value!r} at rank {r}")
                _check_monotone(memo, r, value, rtol)
            memo[r] = value
        value = memo[r]
        return bool(value) if threshold is None else value <= threshold

    # invariant: every index < left fails, index right holds (right == n: none known to hold)
    left, right = 0, n
    while left < right:
        mid = (left + right) // 2
        if holds(mid):
            right = mid
        else:
            left = mid + 1
    satisfied = left < n
    return BisectResult(rank=lo + left * multiple if satisfied else None, calls=len(memo),
                        satisfied=satisfied, history=tuple(history))


def _check_monotone(memo: dict, r: int, value: float, rtol: float) -> None:
    """Raise if the new error contradicts a non-increasing criterion at an evaluated rank."""
    for s, other in memo.items():
        (a, ea), (b, eb) = sorted([(s, other), (r, value)])
        if ea < eb - rtol * abs(eb):
            raise ValueError(
                f"criterion is not monotone: error({a}) = {ea:.6g} < error({b}) = {eb:.6g}, "
                "but the error must be non-increasing in the rank for a bisection to be valid"
            )


def _spectrum_slack(dtype, d: int) -> float:
    """Relative slack for rounding in computed spectra: negative or out-of-order entries up to this."""
    return 32.0 * max(d, 1) * dtype_eps(dtype)


def _check_spectrum(name: str, values, xp) -> None:
    """Finite, non-negative and descending along the last axis, up to rounding slack."""
    check_finite(name, values, xp)
    if not math.prod(values.shape):
        return
    v = to_numpy(values).astype(np.float64)
    scale = np.max(np.abs(v), axis=-1, keepdims=True)
    slack = _spectrum_slack(values.dtype, values.shape[-1]) * scale
    if np.any(v < -slack):
        raise ValueError(f"{name} has negative entries beyond rounding (min {v.min():.3g})")
    if values.shape[-1] > 1 and np.any(np.diff(v, axis=-1) > slack):
        raise ValueError(f"{name} must be sorted in descending order along its last axis "
                         "(flip the output of eigh / eigvalsh)")


def rank_for_error(values, tol: float, relative: bool = True):
    r"""Smallest rank whose dropped tail is within a tolerance, from tail sums (no search).

    Parameters
    ----------
    values : array, shape (..., d)
        Descending non-negative spectra: eigenvalues of second moments, or
        squared singular values. Leading dimensions are a batch.
    tol : float
        Allowed dropped energy, ``>= 0``.
    relative : bool
        If True, ``tol`` is a fraction of the total ``sum(values)`` (so the
        kept fraction is at least ``1 - tol``).

    Returns
    -------
    array of int64, shape (...)
        :math:`r^\star = \min\{r \in [0, d] : \sum_{i>r}\lambda_i \le \tau\}` with
        :math:`\tau = \mathrm{tol}\cdot\sum_i\lambda_i` if ``relative`` else ``tol``;
        on the library and device of ``values``.

    Raises
    ------
    ValueError
        If ``values`` holds NaN/Inf, is not descending or has negative entries
        beyond rounding, or ``tol`` is negative or not finite.

    Notes
    -----
    The Eckart--Young error of the best rank-``r`` approximation
    (:math:`\sum_{i>r}\sigma_i^2`, FLAR-SVD Section 4) and the PCA truncation
    error (:math:`\sum_{i>r}\lambda_i`, FLAT-LLM Theorem 4.1) are tail sums, so a
    criterion of that form needs no bisection. Tails are accumulated from the
    smallest entry up (no ``total - prefix`` cancellation) and are exactly
    non-increasing in floating point, so :math:`r^\star` is the number of tails
    above :math:`\tau`. Entries that are negative within rounding count as 0.
    FLAT-LLM's reference code states the same rule as a kept fraction
    (``tol = 0.96`` kept there is ``tol = 0.04`` here).

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> int(lrmath.rank_for_error(np.array([4.0, 3.0, 2.0, 1.0]), 0.3))
    2
    """
    xp = check_array("values", values, min_ndim=1)
    tol = check_nonnegative_scalar("tol", tol)
    _check_spectrum("values", values, xp)
    v = xp.clip(as_work(values, xp), min=0.0)
    # tails[..., r] = sum_{i >= r} v_i (0-based: keeping r entries drops v_r, ..., v_{d-1})
    tails = xp.flip(xp.cumulative_sum(xp.flip(v, axis=-1), axis=-1, include_initial=True), axis=-1)
    bound = tol * tails[..., 0:1] if relative else tol
    return xp.sum(xp.astype(tails > bound, xp.int64), axis=-1)
