"""Budget allocation: FLAT-LLM's IPRS, the exact capped-simplex projection, and spectrum-driven ranks.

The spectrum-driven ranks (:func:`allocate_ranks`) are defined here; IPRS and the
projection, which split a budget into real fractions, live in ``lrmath._simplex``
and are re-exported here.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from ._backend import from_numpy, namespace, to_numpy
from ._simplex import _finite_scalar, _to_work, capped_simplex_projection, iprs_allocate
from ._validation import check_array
from .search import _check_spectrum

__all__ = ["iprs_allocate", "capped_simplex_projection", "allocate_ranks", "RankAllocation"]


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
