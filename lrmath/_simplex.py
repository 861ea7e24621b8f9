"""Kept fractions on the capped simplex: FLAT-LLM's IPRS and the exact Euclidean projection.

Split from ``lrmath.allocation`` (integer ranks from spectra), which re-exports
``iprs_allocate`` and ``capped_simplex_projection``: both split a budget into real
fractions between bounds, not ranks. ``allocate_ranks`` shares the scalar check and
the conversion of results (``_finite_scalar``, ``_to_work``) from here.
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import device_of, from_numpy, namespace, to_numpy, work_dtype
from ._validation import check_array, check_finite, dtype_eps
from .search import _spectrum_slack

__all__ = ["iprs_allocate", "capped_simplex_projection"]


def _finite_scalar(name: str, value) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def _to_work(a: np.ndarray, like):
    xp = namespace(like)
    return from_numpy(a, like, xp, dtype=work_dtype(xp, device_of(like)))


# ---------------------------------------------------------------------------- IPRS
def iprs_allocate(importance, budget: float, cap: float = 1.0):
    r"""FLAT-LLM's Importance-Preserving Rank Selection (Algorithm 1), as published.

    Parameters
    ----------
    importance : array, shape (L,)
        Non-negative layer importances :math:`t_l` (e.g. :func:`lrmath.angular_importance`).
    budget : float
        Total kept fraction :math:`B = L(1 - s)` for a compression ratio ``s``;
        ``0 <= budget <= cap * L``.
    cap : float
        Per-layer upper bound (1: a layer cannot keep more than all of its rank).

    Returns
    -------
    array, shape (L,)
        Kept fractions :math:`w` with :math:`\sum_l w_l = B` (to rounding) and
        :math:`0 \le w_l \le \mathrm{cap}`; float64 on the library and device of
        ``importance``.

    Raises
    ------
    ValueError
        If ``importance`` is not 1-D, is empty, holds NaN/Inf or negative values
        beyond rounding, ``cap <= 0``, or ``budget`` is outside ``[0, cap * L]``.

    Notes
    -----
    Algorithm 1 of FLAT-LLM (Tian et al., 2025): start with all layers active;
    split the remaining budget proportionally,
    :math:`\tilde w_l = t_l B_A / \sum_{j\in A} t_j`; fix every :math:`\tilde w_l > \mathrm{cap}`
    at ``cap`` and remove it from :math:`A`, subtracting its ``cap`` from the
    budget; repeat until nothing exceeds the cap.

    The paper presents this as the Euclidean projection of :math:`\hat w = tB/\sum t`
    onto :math:`\{w \in [0,1]^L : \sum w = B\}` (Eq. 8); it is not in general
    (:func:`capped_simplex_projection` is). It computes exactly
    :math:`w_l = \min(s\, t_l, \mathrm{cap})` with the unique :math:`s` giving
    :math:`\sum_l w_l = B`: caps plus proportional *rescaling* of the rest, where the
    projection *shifts* the rest (``docs/methods/iprs.md``).

    Where the published algorithm would divide 0 by 0 (budget left over after
    every positive-importance layer is capped), the remainder is split evenly
    among the zero-importance layers. Runs on a host copy (``L`` is the number
    of layers): the loop makes at most ``L`` passes.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> lrmath.iprs_allocate(np.array([6.0, 3.0, 1.0]), 2.0)
    array([1.  , 0.75, 0.25])
    """
    xp = check_array("importance", importance, ndim=1)
    L = importance.shape[0]
    if L == 0:
        raise ValueError("importance is empty")
    check_finite("importance", importance, xp)
    cap = _finite_scalar("cap", cap)
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    budget = _finite_scalar("budget", budget)
    if not 0.0 <= budget <= cap * L:
        raise ValueError(f"budget = {budget} is outside [0, cap * L] = [0, {cap * L}]")
    t = to_numpy(importance).astype(np.float64)
    slack = _spectrum_slack(importance.dtype, L) * float(np.max(np.abs(t)))
    if np.any(t < -slack):
        raise ValueError(f"importance has negative entries (min {t.min():.3g})")
    t = np.clip(t, 0.0, None)

    w = np.zeros(L)
    active = np.ones(L, dtype=bool)
    remaining = budget
    while active.any():
        total = float(np.sum(t[active]))
        if total > 0:
            proposal = np.where(active, t / total * remaining, 0.0)
        else:  # only zero importances left: 0/0 in the paper, an even split here
            proposal = np.where(active, remaining / int(active.sum()), 0.0)
        over = active & (proposal > cap)
        if not over.any():
            w[active] = proposal[active]
            break
        w[over] = cap
        active &= ~over
        remaining = max(remaining - cap * int(over.sum()), 0.0)
    return _to_work(w, importance)


# ------------------------------------------------------------ capped simplex projection
def _bound(name: str, value, L: int) -> np.ndarray:
    if hasattr(value, "shape"):
        b = to_numpy(value).astype(np.float64)
        if b.shape not in ((), (L,)):
            raise ValueError(f"{name} must be a scalar or have shape ({L},), got {tuple(b.shape)}")
    else:
        b = np.asarray(float(value))
    if np.any(np.isnan(b)):
        raise ValueError(f"{name} contains NaN")
    return np.broadcast_to(b, (L,)).copy()


def capped_simplex_projection(v, total: float, lower=0.0, upper=1.0):
    r"""Euclidean projection onto :math:`\{w : \sum_i w_i = \mathrm{total},\ l_i \le w_i \le u_i\}`.

    Parameters
    ----------
    v : array, shape (L,)
        Point to project.
    total : float
        Required sum, ``sum(lower) <= total <= sum(upper)``.
    lower, upper : float or array of shape (L,)
        Bounds, ``lower <= upper``. One of them may hold infinities
        (``upper=inf`` gives the plain simplex), not both.

    Returns
    -------
    array, shape (L,)
        :math:`w^\star = \mathrm{clip}(v - \tau, l, u)` with the threshold :math:`\tau`
        that makes the sum equal ``total``; float64 on the library and device of ``v``.

    Raises
    ------
    ValueError
        Non-finite ``v`` or ``total``, NaN bounds, ``lower > upper``, infinities
        in both bounds, or ``total`` outside ``[sum(lower), sum(upper)]``.

    Notes
    -----
    KKT: :math:`w_i = \mathrm{clip}(v_i - \tau, l_i, u_i)` for the one :math:`\tau` where
    the non-increasing, piecewise linear sum hits ``total``. Its breakpoints
    :math:`v_i - u_i`, :math:`v_i - l_i` are sorted, the sum is evaluated at all of
    them by prefix sums, and :math:`\tau` is solved for exactly on the segment
    found: :math:`O(L \log L)`, no iteration tolerance. Runs on a host copy
    (``L`` counts layers or heads). This is the problem FLAT-LLM's Eq. 8 states;
    its Algorithm 1 (:func:`iprs_allocate`) does not solve it in general. See
    ``docs/theorems/capped-simplex-projection.md``.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> lrmath.capped_simplex_projection(np.array([1.2, 0.6, 0.2]), 2.0)
    array([1. , 0.7, 0.3])
    """
    xp = check_array("v", v, ndim=1)
    check_finite("v", v, xp)
    L = v.shape[0]
    total = _finite_scalar("total", total)
    x = to_numpy(v).astype(np.float64)
    lo, up = _bound("lower", lower, L), _bound("upper", upper, L)
    if np.any(lo > up):
        raise ValueError("lower must be <= upper elementwise")
    if np.any(np.isinf(lo)) and np.any(np.isinf(up)) or np.any(lo == np.inf) or np.any(up == -np.inf):
        raise ValueError("lower and upper cannot both hold infinities: keep one side finite "
                         "(e.g. upper=inf for the plain simplex)")
    bounds = np.concatenate([lo, up])
    scale = max(abs(total), float(np.max(np.abs(bounds[np.isfinite(bounds)]), initial=0.0)), 1.0)
    slack = 8 * max(L, 1) * dtype_eps(np.float64) * scale
    low_sum, up_sum = math.fsum(lo), math.fsum(up)
    if not low_sum - slack <= total <= up_sum + slack:
        raise ValueError(f"total = {total} is outside [sum(lower), sum(upper)] = [{low_sum}, {up_sum}]")
    if L == 0:
        return _to_work(x, v)
    # an infinite bound can be replaced by the one the other side implies (same feasible set)
    if np.any(np.isinf(up)):
        up = np.minimum(up, total - (low_sum - lo))
    if np.any(np.isinf(lo)):
        lo = np.maximum(lo, total - (up_sum - up))
    tau = _threshold(x, lo, up, total)
    return _to_work(np.clip(x - tau, lo, up), v)


def _threshold(x: np.ndarray, lo: np.ndarray, up: np.ndarray, total: float) -> float:
    """The tau with sum(clip(x - tau, lo, up)) == total, by sorted breakpoints."""
    movable = lo < up  # entries with lo == up are fixed and play no part
    if not movable.any():
        return 0.0
    total = total - math.fsum(lo[~movable])
    x, lo, up = x[movable], lo[movable], up[movable]
    a, c = x - up, x - lo  # tau <= a_i: entry at upper; tau >= c_i: at lower
    ia, ic = np.argsort(a, kind="stable"), np.argsort(c, kind="stable")
    a_s, c_s = a[ia], c[ic]
    zero = np.zeros(1)
    pre_u = np.concatenate([zero, np.cumsum(up[ia])])
    pre_xa = np.concatenate([zero, np.cumsum(x[ia])])
    pre_l = np.concatenate([zero, np.cumsum(lo[ic])])
    pre_xc = np.concatenate([zero, np.cumsum(x[ic])])
    b = np.sort(np.concatenate([a, c]))
    ka = np.searchsorted(a_s, b, side="left")  # a_i < tau: not at upper
    kc = np.searchsorted(c_s, b, side="right")  # c_i <= tau: at lower
    f = (pre_u[-1] - pre_u[ka]) + pre_l[kc] + (pre_xa[ka] - pre_xc[kc]) - (ka - kc) * b
    # f is non-increasing along b: last breakpoint with f >= total
    k = int(np.searchsorted(-f, -total, side="right")) - 1
    k = min(max(k, 0), b.size - 1)
    if k == b.size - 1 or f[k] == total:
        return float(b[k])
    mid = 0.5 * (b[k] + b[k + 1])
    at_up, at_lo = a >= mid, c <= mid
    free = ~(at_up | at_lo)
    n_free = int(free.sum())
    if n_free == 0:  # flat segment: only reachable through rounding in f
        return float(b[k])
    fixed_sum = math.fsum(up[at_up]) + math.fsum(lo[at_lo])
    tau = (math.fsum(x[free]) + fixed_sum - total) / n_free
    # one correction step against rounding in the sums
    w = np.clip(x - tau, lo, up)
    free = (w > lo) & (w < up)
    if free.any():
        tau += (math.fsum(w) - total) / int(free.sum())
    return float(tau)
