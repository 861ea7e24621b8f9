"""Budget allocation: FLAT-LLM's IPRS, the exact capped-simplex projection, and spectrum-driven ranks."""

from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from ._backend import device_of, from_numpy, namespace, to_numpy, work_dtype
from ._validation import check_array, check_finite, dtype_eps
from .search import _check_spectrum, _spectrum_slack

__all__ = ["iprs_allocate", "capped_simplex_projection", "allocate_ranks", "RankAllocation"]


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


# ------------------------------------------------------------------ rank allocation
class RankAllocation(NamedTuple):
    """Result of :func:`allocate_ranks`.

    Attributes
    ----------
    ranks : array of int64, shape (G,)
        Rank of each group.
    dropped : array, shape ()
        Total dropped energy :math:`\\sum_g \\sum_{i > r_g} \\lambda_{g,i}` (float64).
    gap : float
        Certified bound on how far ``dropped`` can be above the optimum:
        ``0.0`` where the allocation is proved optimal (equal costs), else the
        difference to the linear-programming relaxation, which is at most the
        energy of one rank block.
    """

    ranks: Any
    dropped: Any
    gap: float


def _group_spectra(spectra):
    """Host float64 copies of each group's spectrum, and the array whose library results take."""
    if hasattr(spectra, "shape"):
        xp = check_array("spectra", spectra, ndim=2)
        _check_spectrum("spectra", spectra, xp)
        host = to_numpy(spectra).astype(np.float64)
        return [host[g] for g in range(host.shape[0])], spectra
    groups = list(spectra)
    if not groups:
        raise ValueError("spectra is empty")
    namespace(*groups)  # one library for all groups
    out = []
    for g, s in enumerate(groups):
        xp = check_array(f"spectra[{g}]", s, ndim=1)
        _check_spectrum(f"spectra[{g}]", s, xp)
        out.append(to_numpy(s).astype(np.float64))
    return out, groups[0]


def _per_group(name: str, value, G: int, *, integer: bool) -> np.ndarray:
    a = to_numpy(value) if hasattr(value, "shape") else np.asarray(value)
    if a.ndim == 0:
        a = np.broadcast_to(a, (G,))
    if a.shape != (G,):
        raise ValueError(f"{name} must be a scalar or have one entry per group ({G}), got shape {a.shape}")
    if integer:
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        return a.astype(np.int64)
    return a.astype(np.float64)


def allocate_ranks(spectra, budget: float, *, cost=None, multiple: int = 1, min_rank=0,
                   max_rank=None) -> RankAllocation:
    r"""Per-group ranks minimising the total dropped energy under a budget.

    Parameters
    ----------
    spectra : sequence of 1-D arrays, or array of shape (G, d)
        Descending non-negative spectrum of each group (head, matrix, layer):
        eigenvalues of its second moment, or squared singular values of its
        whitened weight. Groups may differ in length.
    budget : float
        Upper bound on :math:`\sum_g \mathrm{cost}_g\, r_g`.
    cost : float or array of shape (G,), optional
        Positive cost of one unit of rank in each group (e.g. ``m + n``
        parameters for a factorised ``m x n`` weight). Default 1.
    multiple : int
        Ranks are multiples of this (8 or 16 for tensor cores).
    min_rank, max_rank : int or array of shape (G,), optional
        Rank bounds per group; ``max_rank`` defaults to (and is clipped at) the
        group's length. ``min_rank`` is rounded up and ``max_rank`` down to the grid.

    Returns
    -------
    RankAllocation
        ``ranks`` (int64), ``dropped`` (total dropped energy) and ``gap`` (bound
        on the distance to the optimum), on the library and device of ``spectra``.

    Raises
    ------
    ValueError
        Non-finite, negative or unsorted spectra; non-positive costs; a group
        whose bounds contain no multiple of ``multiple``; or a ``budget`` below
        the cost of the minimum ranks.

    Notes
    -----
    By FLAT-LLM's Theorem 4.1 / Corollary 4.2 (and Eckart--Young for whitened
    SVD), keeping ``r_g`` components of group ``g`` costs
    :math:`\sum_{i>r_g}\lambda_{g,i}`, so the problem is

    .. math:: \min_r \sum_g \sum_{i>r_g} \lambda_{g,i}
              \quad\text{s.t.}\quad \sum_g c_g r_g \le B .

    Each group's grid ranks split into blocks of ``multiple`` ranks whose gains
    (the block's eigenvalue sum) are non-increasing, because the spectrum is
    sorted; blocks cost :math:`c_g m`. The blocks are taken in order of gain per
    unit cost (ties: lower group, then earlier block), each if it fits; a group
    whose block does not fit takes no more blocks (ranks are prefixes).
    Blocks with zero gain are never bought: among optimal allocations this
    returns the one with the smallest ranks.

    * Equal costs: every block costs the same, so the blocks taken are the most
      valuable ones that fit, a prefix in every group: **optimal** (for
      ``multiple = 1``, the global selection of the largest eigenvalues).
    * Unequal costs: a knapsack. Because gains per unit cost are non-increasing
      within a group, the LP relaxation is solved by the same order with one
      fractional block, so ``OPT - greedy <= LP - greedy <= gain of that block``.
      ``gap`` reports ``LP - greedy``. See ``docs/theorems/spectrum-allocation.md``.

    Spectra entries negative within rounding count as 0, and the walk uses the
    running minimum of each spectrum (a no-op on sorted input); ``dropped`` uses
    the values as given. Runs on a host copy: ranks are small discrete decisions.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> res = lrmath.allocate_ranks([np.array([9.0, 1.0, 0.5]), np.array([4.0, 3.0, 2.0])], 3)
    >>> res.ranks.tolist(), float(res.dropped)
    ([1, 2], 3.5)
    """
    groups, like = _group_spectra(spectra)
    xp = namespace(like)
    G = len(groups)
    budget = _finite_scalar("budget", budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    try:
        m = operator.index(multiple)
    except TypeError:
        raise TypeError(f"multiple must be an integer, got {type(multiple).__name__}") from None
    if m < 1:
        raise ValueError(f"multiple must be >= 1, got {m}")
    c = _per_group("cost", 1.0 if cost is None else cost, G, integer=False)
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise ValueError("cost must be finite and > 0 for every group")
    length = np.array([s.shape[0] for s in groups], dtype=np.int64)
    rmin = _per_group("min_rank", min_rank, G, integer=True)
    rmax = length if max_rank is None else np.minimum(_per_group("max_rank", max_rank, G, integer=True), length)
    if np.any(rmin < 0) or np.any(rmax < 0):
        raise ValueError("min_rank and max_rank must be >= 0")
    start = -(-rmin // m) * m
    stop = (rmax // m) * m
    bad = np.flatnonzero(start > stop)
    if bad.size:
        g = int(bad[0])
        raise ValueError(f"min_rank/max_rank: group {g} has no multiple of {m} in "
                         f"[{int(rmin[g])}, {int(min(rmax[g], length[g]))}]")
    base = sum(Fraction(float(c[g])) * int(start[g]) for g in range(G))
    if base > Fraction(budget):
        raise ValueError(f"budget = {budget} is below the cost of the minimum ranks ({float(base):.6g})")

    clean = [np.minimum.accumulate(np.clip(s, 0.0, None)) if s.size else s for s in groups]
    gains, owner = [], []
    for g, s in enumerate(clean):
        nblocks = int(stop[g] - start[g]) // m
        if nblocks:
            blocks = s[int(start[g]):int(stop[g])].reshape(nblocks, m).sum(axis=1)
            gains.append(blocks)
            owner.append(np.full(nblocks, g, dtype=np.int64))
    gain = np.concatenate(gains) if gains else np.zeros(0)
    grp = np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64)
    block_cost = c[grp] * m
    ratio = gain / block_cost
    # descending ratio; ties by group then block (lexsort is stable, blocks are in order)
    order = np.lexsort((grp, -ratio))
    order = order[gain[order] > 0]

    capacity = budget - float(base)
    # every block up to the first that does not fit is bought (vectorised), then the walk goes on
    spent = np.cumsum(block_cost[order])
    n_fit = int(np.searchsorted(spent, capacity, side="right"))
    taken = order[:n_fit].tolist()  # blocks bought, in order
    ranks = start + m * np.bincount(grp[order[:n_fit]], minlength=G).astype(np.int64)
    remaining = capacity - (float(spent[n_fit - 1]) if n_fit else 0.0)
    closed = np.zeros(G, dtype=bool)
    cheapest = float(block_cost.min()) if block_cost.size else math.inf
    for i in order[n_fit:].tolist():
        if remaining < cheapest:
            break
        g = int(grp[i])
        if closed[g]:
            continue
        if block_cost[i] <= remaining:
            ranks[g] += m
            remaining -= block_cost[i]
            taken.append(i)
        else:
            closed[g] = True
    # float sums may round: verify the budget exactly, return the last blocks if needed
    while taken and sum(Fraction(float(c[g])) * int(ranks[g]) for g in range(G)) > Fraction(budget):
        ranks[int(grp[taken.pop()])] -= m

    equal_costs = bool(np.all(block_cost == block_cost[0])) if block_cost.size else True
    greedy = math.fsum(gain[taken])
    gap = 0.0 if equal_costs else _lp_gap(gain[order], block_cost[order], capacity, greedy)
    dropped = math.fsum(math.fsum(np.clip(s[int(r):], 0.0, None)) for s, r in zip(groups, ranks))
    return RankAllocation(
        ranks=from_numpy(ranks, like, xp, dtype=xp.int64),
        dropped=_to_work(np.asarray(dropped), like),
        gap=gap,
    )


def _lp_gap(gain: np.ndarray, cost: np.ndarray, capacity: float, greedy: float) -> float:
    """LP relaxation value minus the greedy value (items already in ratio order)."""
    used = np.cumsum(cost)
    full = int(np.searchsorted(used, capacity, side="right"))
    lp = math.fsum(gain[:full])
    if full < gain.size:
        before = used[full - 1] if full else 0.0
        lp += gain[full] * max(capacity - before, 0.0) / cost[full]
    return float(max(lp - greedy, 0.0))
