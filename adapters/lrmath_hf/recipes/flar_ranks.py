"""FLAR's rank rules on a parameter budget: the paper's rescale and the equal-slope allocation.

Separate from :mod:`.flar` (the recipe) because they are pure functions of ranks,
shapes and spectra, tested on their own.
"""

from __future__ import annotations

import numpy as np
import torch

import lrmath

__all__ = ["imposed_ranks", "non_increasing", "rescale_ranks", "sample_energy", "slope_ranks"]


def _cost(ranks, shapes) -> int:
    return sum(r * (m + n) if r is not None else m * n for r, (m, n) in zip(ranks, shapes))


def rescale_ranks(ranks, shapes, budget: float, *, multiple: int = 8, caps=None):
    r"""FLAR's rescale: one factor on all searched ranks so the parameters meet ``budget``.

    ``ranks``: searched ranks (``None``: needed ``k_equiv`` or more); ``shapes``:
    ``(m, n)``; ``caps``: largest rank each linear may be factorised at (latency).
    Returns ranks, ``None`` for dense.

    Notes
    -----
    With :math:`c_\ell(r) = r (m_\ell + n_\ell)` for :math:`8 \le r \le \min(\mathrm{cap}_\ell, k_{\mathrm{equiv}} - 1)`
    and :math:`m_\ell n_\ell` (dense) otherwise, :math:`\sum_\ell c_\ell(\lfloor \alpha r_\ell \rfloor_8)`
    is non-decreasing in :math:`\alpha`; the largest :math:`\alpha` within budget is
    bisected, then the largest rounding remainders get one more step while the budget allows.
    """
    keq = [lrmath.k_equiv(m, n) for m, n in shapes]
    base = np.array([k if r is None else r for r, k in zip(ranks, keq)], dtype=float)
    top = [k - 1 if caps is None else min(c, k - 1) for c, k in zip(caps or keq, keq)]

    def at(alpha):
        out = [max(multiple, int(alpha * b) // multiple * multiple) for b in base]
        return [r if r <= t else None for r, t in zip(out, top)]

    lo, hi = 0.0, float(max(keq)) / max(base.min(), 1.0) + 1.0
    if _cost(at(lo), shapes) > budget:
        return at(lo)  # even the smallest ranks miss the budget
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(at(mid), shapes) <= budget else (lo, mid)
    out = at(lo)
    spent = _cost(out, shapes)
    remainder = (lo * base - np.array([r or 0 for r in out])) / multiple  # what rounding took
    for i in np.argsort(-remainder, kind="stable"):
        step = multiple * sum(shapes[i])
        if out[i] is not None and out[i] + multiple <= top[i] and spent + step <= budget:
            out[i], spent = out[i] + multiple, spent + step
    return out


def slope_ranks(spectra, shapes, budget: float, *, multiple: int = 8, caps=None):
    r"""Ranks with equal marginal error per parameter (``allocation="slope"``).

    ``spectra``: per linear, descending :math:`g_\ell \sigma_{\ell,i}^2` (the modelled
    error of dropping component ``i``); other arguments as in :func:`rescale_ranks`.

    Notes
    -----
    Minimises :math:`\sum_\ell g_\ell \sum_{i > r_\ell} \sigma_{\ell,i}^2` s.t.
    :math:`\sum_\ell c_\ell(r_\ell) \le B` with :func:`lrmath.allocate_ranks` (a
    certified greedy).  The top grid rank below ``k_equiv`` may cost about ``m n``:
    there the linear stays dense.  A linear allotted more than its latency cap
    turns dense, its ``m n`` leaves the budget, and the others are re-allocated
    until no cap is exceeded.  A cap below ``multiple`` (no grid rank is faster)
    keeps its linear dense whatever the budget.
    """
    keq = [lrmath.k_equiv(m, n) for m, n in shapes]
    top = [lrmath.round_rank(k, multiple) for k in keq]  # the top grid point means dense
    caps = top if caps is None else caps
    # not faster even at the smallest grid rank (or k_equiv below it): dense from the start, never "closest"
    dense: set[int] = {i for i, c in enumerate(caps) if c < multiple}
    while True:
        live = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(shapes[i][0] * shapes[i][1] for i in dense)
        if not live or left < multiple * sum(sum(shapes[i]) for i in live):
            return [None if i in dense else multiple for i in range(len(shapes))]  # the closest one can get
        alloc = lrmath.allocate_ranks([spectra[i] for i in live], left, cost=np.array([float(sum(shapes[i])) for i in live]),
                                      multiple=multiple, min_rank=multiple, max_rank=np.array([top[i] for i in live]))
        ranks = dict(zip(live, (int(r) for r in alloc.ranks)))
        over = {i for i, r in ranks.items() if r >= keq[i] or r > caps[i]}
        if not over - {i for i, r in ranks.items() if r >= keq[i]}:
            return [None if i in dense or ranks[i] >= keq[i] else ranks[i] for i in range(len(shapes))]
        dense |= {i for i in over if ranks[i] < keq[i]}


def sample_energy(sigma, right, sample):
    r"""Error of dropping each whitened-SVD component, measured under the sample covariance ``sample``.

    ``sigma`` (k,) and ``right`` (k, n) are all components of :func:`lrmath.whitened_svd`
    under a shrunk covariance ``C = L L^T`` (``right_i = sigma_i^{1/2} b_i``,
    ``b_i = v_i^T L^{-1}``); ``sample`` (n, n) is the covariance the error is taken
    under.

    Notes
    -----
    :math:`W - W_r = \sum_{i>r} \sigma_i u_i b_i` with orthonormal :math:`u_i`, so
    :math:`\operatorname{tr}((W - W_r) S_0 (W - W_r)^\top) = \sum_{i>r} \sigma_i^2 b_i S_0 b_i^\top`:
    the error stays a tail sum, with :math:`e_i = \sigma_i\, \mathrm{right}_i S_0 \mathrm{right}_i^\top`
    (:math:`= \sigma_i^2` when :math:`S_0 = C`). Shrinkage adds :math:`s T` to every
    direction; under :math:`S_0` the components that owe their size to it lose it again.
    """
    return sigma * ((right @ sample) * right).sum(-1)


def non_increasing(energy):
    """The closest non-increasing sequence (least squares, pool adjacent violators), clipped at 0.

    :func:`sample_energy` need not be sorted; the allocators need a descending
    spectrum (non-increasing marginal gains). Pooling keeps every tail sum at a
    block boundary, so the modelled error at those ranks is unchanged; a negative
    pooled value (rounding of a PSD statistic) becomes 0.
    """
    blocks: list[list[float]] = []  # [mean, length]
    for value in (float(v) for v in energy):
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    out = [max(m, 0.0) for m, n in blocks for _ in range(int(n))]
    return torch.tensor(out, dtype=torch.float64)


def imposed_ranks(ranks, keys, shapes) -> list[int | None]:
    """A user's ``ranks`` (``{"layer.role": rank or "dense"}``) checked against the encoder linears.

    Returns the ranks in ``keys`` order (``(layer, role)`` pairs, ``shapes`` their ``(m, n)``),
    ``None`` for dense; a missing or unknown name, or a rank outside ``[1, min(m, n)]``, raises.
    """
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks must be a dict {{'layer.role': rank or 'dense'}}, got {type(ranks).__name__}")
    names = [f"{layer}.{role}" for layer, role in keys]
    missing, unknown = sorted(set(names) - set(ranks)), sorted(set(ranks) - set(names))
    if missing or unknown:
        raise ValueError(f"ranks must name every encoder linear exactly once; missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unknown {unknown[:4]}{' ...' if len(unknown) > 4 else ''}")
    out = []
    for name, (m, n) in zip(names, shapes):
        rank = ranks[name]
        if rank == "dense" or rank is None:
            out.append(None)
        elif isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and 1 <= rank <= min(m, n):
            out.append(int(rank))
        else:
            raise ValueError(f"ranks[{name!r}] must be 'dense' or an int in [1, {min(m, n)}], got {rank!r}")
    return out
