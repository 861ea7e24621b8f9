"""FLAT-LLM's IPRS (Algorithm 1) and the spectrum-driven rank allocation.

IPRS, statements proved here:

* the contract: ``sum(w) = B`` to rounding, ``0 <= w <= cap``; a budget outside ``[0, cap L]`` raises;
* it is the published loop (a literal transcription agrees), and what that loop computes is
  ``w = min(s t, cap)`` for one ``s`` (so ``w`` is monotone in ``t`` and in ``B``); zero
  importances get budget only once every positive one is capped, then an even split.

``allocate_ranks``, statements proved here (``docs/theorems/spectrum-allocation.md``):

* feasible: ``sum cost_g r_g <= budget`` in exact rational arithmetic, ranks on the grid of
  ``multiple`` within ``[min_rank, max_rank]``; ``dropped`` is the tail sum of the chosen ranks;
* equal costs: optimal (brute force over every grid allocation of small instances; on large ones,
  every kept eigenvalue is at least every dropped one that was within reach);
* unequal costs: ``dropped - optimum <= gap <= the largest gain of one rank block`` (brute force).
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import make_spectrum, seeds, tolerance, DECAYS
from proofs_tests.backends import BACKENDS, same_library, to_backend


# ---------------------------------------------------------------------------------- IPRS
@st.composite
def iprs_problems(draw, max_layers=48):
    rng = np.random.default_rng(draw(seeds()))
    L = draw(st.integers(1, max_layers))
    t = rng.uniform(0.05, 0.3, size=L)
    k = draw(st.integers(0, L))
    t[rng.choice(L, size=k, replace=False)] *= 10.0 ** draw(st.floats(0.0, 2.0))
    if draw(st.booleans()):
        t[rng.random(L) < draw(st.floats(0.0, 1.0))] = 0.0
    t *= 10.0 ** draw(st.integers(-3, 3))
    cap = draw(st.sampled_from([1.0, 0.5, 2.0, 0.3]))
    frac = draw(st.sampled_from([0.0, 1.0, None]))  # the ends of the budget range, or inside
    B = cap * L * (rng.random() if frac is None else frac)
    return t, B, cap


def published_algorithm_1(t, B, cap):
    """FLAT-LLM Algorithm 1 transcribed literally (0/0 read as an even split, as lrmath documents)."""
    w = np.zeros_like(t)
    active = list(range(t.size))
    while active:
        T = sum(t[i] for i in active)
        prop = {i: (t[i] / T * B if T > 0 else B / len(active)) for i in active}
        over = [i for i in active if prop[i] > cap]
        if not over:
            for i in active:
                w[i] = prop[i]
            break
        for i in over:
            w[i] = cap
        active = [i for i in active if i not in over]
        B = max(B - cap * len(over), 0.0)
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=iprs_problems())
def test_iprs_contract_and_published_loop(backend, problem):
    t, B, cap = problem
    w_b = lrmath.iprs_allocate(to_backend(t, backend), B, cap)
    assert same_library(w_b, to_backend(t, backend))
    w = to_numpy(w_b)
    tol = tolerance(n=t.size) * max(B, cap)
    assert np.all(w >= 0.0) and np.all(w <= cap)
    assert abs(math.fsum(w) - B) <= tol
    np.testing.assert_allclose(w, published_algorithm_1(t, B, cap), rtol=0, atol=tol)


@given(problem=iprs_problems())
def test_iprs_is_min_of_scaled_importance_and_cap(problem):
    """Algorithm 1 returns w = min(s t, cap): one common ratio w/t on the uncapped layers."""
    t, B, cap = problem
    w = lrmath.iprs_allocate(t, B, cap)
    tol = tolerance(n=t.size)
    pos = t > 0
    if not pos.any():
        np.testing.assert_allclose(w, B / t.size, rtol=tol)
        return
    free = pos & (w < cap * (1 - tol))
    if free.any():
        s = w[free] / t[free]
        np.testing.assert_allclose(s, np.median(s), rtol=tol)
        # capped layers: s t >= cap, i.e. they would have exceeded the cap
        assert np.all(t[pos & ~free] * np.median(s) >= cap * (1 - tol))
    if not np.all(w[pos] >= cap * (1 - tol)):
        assert np.all(w[~pos] == 0.0)  # zero importance gets nothing while any positive layer is uncapped
    else:  # every positive layer capped: the rest is split evenly
        rest = w[~pos]
        assert rest.size == 0 or np.ptp(rest) <= tol * cap


@given(problem=iprs_problems(), other=st.floats(0.0, 1.0))
def test_iprs_is_monotone_in_budget_and_importance(problem, other):
    t, B, cap = problem
    B2 = other * cap * t.size
    w1, w2 = lrmath.iprs_allocate(t, B, cap), lrmath.iprs_allocate(t, B2, cap)
    tol = tolerance(n=t.size) * cap
    lo, hi = (w1, w2) if B <= B2 else (w2, w1)
    assert np.all(lo <= hi + tol)
    order = np.argsort(t, kind="stable")
    if (t > 0).all():
        assert np.all(np.diff(w1[order]) >= -tol)


@pytest.mark.parametrize(
    "t, B, cap, match",
    [
        (np.array([0.1, 0.2]), 2.5, 1.0, "budget"),
        (np.array([0.1, 0.2]), -0.1, 1.0, "budget"),
        (np.array([0.1, 0.2]), 1.0, 0.0, "cap"),
        (np.array([0.1, -0.2]), 1.0, 1.0, "importance has negative"),
        (np.array([0.1, np.nan]), 1.0, 1.0, "importance contains NaN"),
        (np.zeros(0), 0.0, 1.0, "importance is empty"),
        (np.ones((2, 2)), 1.0, 1.0, "importance must be 1-dimensional"),
    ],
)
def test_iprs_bad_input(t, B, cap, match):
    with pytest.raises(ValueError, match=match):
        lrmath.iprs_allocate(t, B, cap)


# ------------------------------------------------------------------------- allocate_ranks
@st.composite
def small_allocations(draw, equal_costs=None):
    """2-3 groups of 0-5 eigenvalues (ties and zeros likely), costs, multiple, bounds, budget."""
    rng = np.random.default_rng(draw(seeds()))
    equal = draw(st.booleans()) if equal_costs is None else equal_costs
    G = draw(st.integers(1 if equal else 2, 3))
    spectra = []
    for _ in range(G):
        d = draw(st.integers(0, 5))
        s = np.sort(rng.integers(0, 4, size=d).astype(float))[::-1] if draw(st.booleans()) else \
            np.sort(rng.exponential(size=d))[::-1]
        spectra.append(s.copy())
    cost = np.full(G, float(draw(st.integers(1, 3)))) if equal else \
        rng.integers(1, 9, size=G) / draw(st.sampled_from([1.0, 4.0]))  # dyadic: exact sums
    m = draw(st.integers(1, 3))
    d = np.array([s.size for s in spectra])
    rmax = np.minimum(d, rng.integers(0, 6, size=G)) if draw(st.booleans()) else None
    top = d if rmax is None else rmax
    rmin = np.array([rng.integers(0, t + 1) for t in top]) if draw(st.booleans()) else 0
    start = -(-np.broadcast_to(rmin, (G,)) // m) * m
    stop = (top // m) * m
    if np.any(start > stop):
        return None
    lo, hi = float(np.dot(cost, start)), float(np.dot(cost, stop))
    budget = lo + draw(st.floats(0.0, 1.2)) * (hi - lo)
    return spectra, budget, cost, m, rmin, rmax, start, stop


def brute_force(spectra, budget, cost, m, start, stop):
    best = math.inf
    for ranks in itertools.product(*(range(a, b + 1, m) for a, b in zip(start, stop))):
        if sum(Fraction(float(c)) * r for c, r in zip(cost, ranks)) <= Fraction(budget):
            best = min(best, math.fsum(math.fsum(s[r:]) for s, r in zip(spectra, ranks)))
    return best


@pytest.mark.parametrize("equal_costs", [True, False], ids=["equal-costs", "unequal-costs"])
@given(data=st.data())
def test_allocation_against_brute_force(equal_costs, data):
    case = data.draw(small_allocations(equal_costs=equal_costs))
    if case is None:
        return
    spectra, budget, cost, m, rmin, rmax, start, stop = case
    res = lrmath.allocate_ranks(spectra, budget, cost=cost, multiple=m, min_rank=rmin, max_rank=rmax)
    r = np.asarray(res.ranks)
    assert r.dtype == np.int64
    assert sum(Fraction(float(c)) * int(k) for c, k in zip(cost, r)) <= Fraction(budget)
    assert np.all(r % m == 0) and np.all(r >= start) and np.all(r <= stop)
    dropped = math.fsum(math.fsum(s[k:]) for s, k in zip(spectra, r))
    total = math.fsum(math.fsum(s) for s in spectra)
    tol = tolerance(n=sum(s.size for s in spectra)) * max(total, 1e-300)
    assert abs(float(res.dropped) - dropped) <= tol
    opt = brute_force(spectra, budget, cost, m, start, stop)
    assert dropped >= opt - tol
    gains = [math.fsum(s[a:a + m]) for s, lo, hi in zip(spectra, start, stop) for a in range(lo, hi, m)]
    if equal_costs:
        assert res.gap == 0.0
        assert dropped <= opt + tol
    else:
        assert dropped - opt <= res.gap + tol
        assert res.gap <= max(gains, default=0.0) + tol


@st.composite
def large_spectra(draw):
    rng = np.random.default_rng(draw(seeds()))
    G = draw(st.integers(1, 16))
    spectra = [make_spectrum(int(rng.integers(1, 65)), float(rng.uniform(0, 8)), str(rng.choice(DECAYS)),
                             float(10.0 ** rng.integers(-2, 3))) for _ in range(G)]
    return spectra, draw(st.floats(0.0, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=large_spectra())
def test_equal_costs_keep_the_globally_largest_eigenvalues(backend, case):
    spectra, frac = case
    budget = int(frac * sum(s.size for s in spectra))
    res = lrmath.allocate_ranks([to_backend(s, backend) for s in spectra], budget)
    assert same_library(res.ranks, to_backend(spectra[0], backend))
    r = to_numpy(res.ranks)
    assert r.sum() == budget  # every eigenvalue is positive: the whole budget is used
    kept = np.concatenate([s[:k] for s, k in zip(spectra, r)])
    dropped = np.concatenate([s[k:] for s, k in zip(spectra, r)])
    if kept.size and dropped.size:
        assert kept.min() >= dropped.max()
    assert res.gap == 0.0
    np.testing.assert_allclose(float(res.dropped), dropped.sum(), rtol=tolerance(n=dropped.size + 1))


@given(case=large_spectra(), seed=seeds())
def test_unequal_costs_gap_certificate_and_budget(case, seed):
    spectra, frac = case
    cost = np.random.default_rng(seed).integers(1, 100, size=len(spectra)).astype(float)
    budget = frac * float(np.dot(cost, [s.size for s in spectra]))
    res = lrmath.allocate_ranks(spectra, budget, cost=cost, multiple=4)
    r = np.asarray(res.ranks)
    assert float(np.dot(cost, r)) <= budget and np.all(r % 4 == 0)
    gains = [s[a:a + 4].sum() for s in spectra for a in range(0, (s.size // 4) * 4, 4)]
    assert 0.0 <= res.gap <= max(gains, default=0.0) * (1 + tolerance(n=4))


def test_greedy_can_be_suboptimal_within_its_certificate():
    """Knapsack: block A (gain 2, cost 1) has the better ratio, B (gain 6, cost 4) the better value."""
    res = lrmath.allocate_ranks([np.array([2.0]), np.array([6.0])], 4, cost=[1.0, 4.0])
    assert res.ranks.tolist() == [1, 0] and float(res.dropped) == 6.0  # the optimum drops 2
    assert res.gap == 4.5  # LP: 2 + (3/4) 6 = 6.5 kept, greedy keeps 2
    assert 6.0 - 2.0 <= res.gap <= 6.0


def test_two_dimensional_input_and_documented_example():
    res = lrmath.allocate_ranks(np.array([[9.0, 1.0, 0.5], [4.0, 3.0, 2.0]]), 3)
    assert res.ranks.tolist() == [1, 2] and float(res.dropped) == 3.5
    # zero-gain ranks are never bought: the smallest optimal ranks
    res = lrmath.allocate_ranks([np.array([1.0, 0.0, 0.0])], 3)
    assert res.ranks.tolist() == [1]


@pytest.mark.parametrize(
    "spectra, budget, kwargs, match",
    [
        ([np.array([1.0, 2.0])], 1, {}, "descending"),
        ([np.array([1.0, -0.5])], 1, {}, "negative"),
        ([np.array([1.0, np.nan])], 1, {}, "NaN"),
        ([np.array([2.0, 1.0])], -1, {}, "budget"),
        ([np.array([2.0, 1.0])], 1, {"min_rank": 2}, "budget"),
        ([np.array([2.0, 1.0])], 1, {"min_rank": 1, "multiple": 4}, "min_rank/max_rank"),
        ([np.array([2.0, 1.0])], 1, {"cost": 0.0}, "cost"),
        ([np.array([2.0, 1.0])], 1, {"cost": [1.0, 2.0]}, "cost must be a scalar or have one entry"),
        ([], 1, {}, "spectra is empty"),
        (np.ones((2, 2, 2)), 1, {}, "2-dimensional"),
    ],
)
def test_allocation_bad_input(spectra, budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrmath.allocate_ranks(spectra, budget, **kwargs)


def test_inputs_are_not_mutated():
    t = np.array([0.3, 0.1, 0.0])
    s = [np.array([3.0, 1.0, -1e-18]), np.array([2.0, 2.0])]
    before = t.copy(), [x.copy() for x in s]
    lrmath.iprs_allocate(t, 1.5)
    lrmath.allocate_ranks(s, 2, cost=[1.0, 2.0])
    np.testing.assert_array_equal(t, before[0])
    for a, b in zip(s, before[1]):
        np.testing.assert_array_equal(a, b)
