"""Rank search (FLAR-SVD, Section 4): bisection, tail-sum ranks, equivalent rank, rounding.

Statements proved here:

* ``bisect_rank`` returns what a linear scan of the grid returns, for monotone truth-valued and
  error-valued criteria, with at most ``ceil(log2 n) + 1`` evaluations (in fact
  ``ceil(log2(n + 1))``), each rank evaluated once; ``rank=None, satisfied=False`` when none holds;
* for an arbitrary criterion the answer is still a boundary witnessed by the evaluations made;
  an error-valued criterion that increases is refused with a ValueError as soon as two ranks
  are evaluated;
* ``rank_for_error`` is the smallest ``r`` with ``sum_{i>r} lambda_i <= tol (* total)``, as a
  brute-force scan finds, batched over leading dimensions;
* ``k_equiv(m, n)`` is the largest ``k`` with ``k (m + n) <= m n``; ``round_rank`` lands on the grid
  within one step, in the stated direction, under the cap.
"""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import seeds, spectra, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def grids(draw):
    lo = draw(st.integers(0, 64))
    multiple = draw(st.integers(1, 16))
    hi = lo + draw(st.integers(0, 600))
    grid = list(range(lo, hi + 1, multiple))
    return lo, hi, multiple, grid


class Counted:
    """A criterion wrapper that records every call."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, r):
        self.calls.append(r)
        return self.f(r)


def call_bound(n):
    return math.ceil(math.log2(n)) + 1


@given(g=grids(), data=st.data())
def test_bisection_equals_linear_scan_on_monotone_criteria(g, data):
    lo, hi, multiple, grid = g
    k = data.draw(st.integers(0, len(grid)))  # index of the first grid rank that holds (len: none)
    first = grid[k] if k < len(grid) else math.inf
    crit = Counted(lambda r: r >= first)
    res = lrmath.bisect_rank(crit, lo, hi, multiple=multiple)
    expected = next((r for r in grid if crit.f(r)), None)
    assert res.rank == expected and res.satisfied == (expected is not None)
    assert res.calls == len(crit.calls) == len(set(crit.calls))  # memoised: no rank twice
    assert res.calls <= call_bound(len(grid))
    assert res.calls <= math.ceil(math.log2(len(grid) + 1))
    assert [r for r, _ in res.history] == crit.calls and set(crit.calls) <= set(grid)


@given(g=grids(), seed=seeds(), data=st.data())
def test_bisection_on_error_criteria_equals_linear_scan(g, seed, data):
    """Non-increasing errors (a tail of random non-negative terms, with plateaus) and a threshold."""
    lo, hi, multiple, grid = g
    rng = np.random.default_rng(seed)
    terms = rng.exponential(size=hi + 2) * (rng.random(hi + 2) < 0.7)
    tail = np.cumsum(terms[::-1])[::-1]  # tail[r] non-increasing in r
    err = Counted(lambda r: float(tail[r]))
    where = data.draw(st.sampled_from(["all hold", "none holds", "inside"]))
    threshold = {"all hold": 2 * tail[lo] + 1, "none holds": tail[hi] / 2,
                 "inside": rng.uniform(tail[hi], tail[lo])}[where]
    if where == "none holds" and tail[hi] == 0:
        threshold = -1.0
    res = lrmath.bisect_rank(err, lo, hi, multiple=multiple, threshold=threshold)
    expected = next((r for r in grid if tail[r] <= threshold), None)
    assert res.rank == expected and res.satisfied == (expected is not None)
    assert res.calls == len(err.calls) <= call_bound(len(grid))


@given(g=grids(), seed=seeds())
def test_arbitrary_criterion_answer_is_witnessed_boundary(g, seed):
    """Without monotonicity the answer is a boundary: it held there, and failed one step below."""
    lo, hi, multiple, grid = g
    table = dict(zip(grid, np.random.default_rng(seed).random(len(grid)) < 0.5))
    res = lrmath.bisect_rank(lambda r: table[r], lo, hi, multiple=multiple)
    seen = dict(res.history)
    if res.satisfied:
        assert seen[res.rank]
        if res.rank > lo:
            assert not seen[res.rank - multiple]
    else:
        assert not seen[grid[-1]]


@given(g=grids(), slope=st.floats(0.01, 100.0))
def test_increasing_error_is_detected(g, slope):
    lo, hi, multiple, grid = g
    threshold = slope * (lo + hi) / 2
    calls = []

    def err(r):
        calls.append(r)
        return slope * r  # increasing: bisection over it would be meaningless

    try:
        res = lrmath.bisect_rank(err, lo, hi, multiple=multiple, threshold=threshold)
    except ValueError as exc:
        assert "not monotone" in str(exc)
        assert len(calls) >= 2
    else:
        assert res.calls == 1  # two evaluations always expose it


def test_noisy_errors_within_rtol_are_accepted_and_beyond_are_refused():
    err = {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.5 * (1 + 1e-9), 4: 0.1}
    res = lrmath.bisect_rank(err.__getitem__, 0, 4, threshold=0.5, rtol=1e-6)
    assert res.rank == 2
    with pytest.raises(ValueError, match="not monotone"):
        lrmath.bisect_rank({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}.__getitem__, 0, 3, threshold=2.5)


def test_documented_flar_example_and_unsatisfied_result():
    res = lrmath.bisect_rank(lambda r: r >= 37, 8, lrmath.k_equiv(256, 256), multiple=8)
    assert (res.rank, res.satisfied) == (40, True)
    res = lrmath.bisect_rank(lambda r: False, 8, 128, multiple=8)
    assert res.rank is None and not res.satisfied and res.calls <= call_bound(16)


@pytest.mark.parametrize("backend", BACKENDS)
@given(s=spectra(max_dim=32, max_log10_cond=12), batch=st.integers(1, 4), seed=seeds(),
       tol=st.floats(0.0, 1.0), relative=st.booleans(), zeros=st.integers(0, 4))
def test_rank_for_error_equals_brute_force_scan(backend, s, batch, seed, tol, relative, zeros):
    rng = np.random.default_rng(seed)
    values = np.stack([np.concatenate([np.sort(s * rng.uniform(0.5, 2.0, s.size))[::-1], np.zeros(zeros)])
                       for _ in range(batch)])
    if not relative:
        tol = tol * float(values.sum(axis=1).max())
    out = lrmath.rank_for_error(to_backend(values, backend), tol, relative=relative)
    assert same_library(out, to_backend(values, backend)) and tuple(out.shape) == (batch,)
    for b, r in enumerate(to_numpy(out).tolist()):
        v = values[b]
        total = math.fsum(v)
        bound = tol * total if relative else tol
        tails = [math.fsum(v[k:]) for k in range(v.size + 1)]
        slack = tolerance(n=v.size) * total  # rounding of the tails near the bound
        # the scan's answer, up to rounding of a tail that lies within slack of the bound
        assert tails[r] <= bound + slack
        assert r == 0 or tails[r - 1] > bound - slack


def test_rank_for_error_exact_cases():
    v = np.array([4.0, 3.0, 2.0, 1.0])
    assert [int(lrmath.rank_for_error(v, t, relative=False)) for t in (0, 1, 2.9, 3, 6, 10)] == [4, 3, 3, 2, 1, 0]
    assert int(lrmath.rank_for_error(np.zeros(3), 0.0)) == 0
    assert lrmath.rank_for_error(np.ones((2, 3, 5)), 0.4).tolist() == [[3] * 3] * 2


@given(m=st.integers(1, 10**6), n=st.integers(1, 10**6))
def test_k_equiv_is_largest_rank_not_larger_than_dense(m, n):
    k = lrmath.k_equiv(m, n)
    assert k * (m + n) <= m * n < (k + 1) * (m + n)


@given(r=st.integers(0, 10**5), multiple=st.integers(1, 64), cap=st.none() | st.integers(0, 10**5),
       mode=st.sampled_from(["down", "up", "nearest"]))
def test_round_rank(r, multiple, cap, mode):
    out = lrmath.round_rank(r, multiple, cap=cap, mode=mode)
    assert isinstance(out, int) and out % multiple == 0 and out >= 0
    unc = lrmath.round_rank(r, multiple, mode=mode)
    assert {"down": unc <= r < unc + multiple, "up": unc - multiple < r <= unc,
            "nearest": abs(unc - r) <= multiple / 2}[mode]
    if mode == "nearest" and 2 * abs(unc - r) == multiple:
        assert unc > r  # ties round up
    if cap is not None:
        assert out <= cap and out == min(unc, (cap // multiple) * multiple)
    arr = lrmath.round_rank(np.array([r, r]), multiple, cap=cap, mode=mode)
    assert arr.tolist() == [out, out]


def test_round_rank_on_torch_keeps_library():
    torch = pytest.importorskip("torch")
    out = lrmath.round_rank(torch.tensor([3, 8, 12, 13]), 8, mode="nearest")
    assert isinstance(out, torch.Tensor) and out.tolist() == [0, 8, 16, 16]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: lrmath.bisect_rank(bool, 5, 4), ValueError, "lo = 5 must be <= hi"),
        (lambda: lrmath.bisect_rank(bool, -1, 4), ValueError, "lo must be >= 0"),
        (lambda: lrmath.bisect_rank(bool, 0, 4, multiple=0), ValueError, "multiple must be >= 1"),
        (lambda: lrmath.bisect_rank(lambda r: math.nan, 0, 4, threshold=1.0), ValueError, "non-finite"),
        (lambda: lrmath.bisect_rank(3, 0, 4), TypeError, "callable"),
        (lambda: lrmath.rank_for_error(np.array([1.0, 2.0]), 0.1), ValueError, "descending"),
        (lambda: lrmath.rank_for_error(np.array([1.0, -1.0]), 0.1), ValueError, "negative"),
        (lambda: lrmath.rank_for_error(np.array([1.0, 0.5]), -0.1), ValueError, "tol"),
        (lambda: lrmath.rank_for_error(np.array([np.nan]), 0.1), ValueError, "values contains NaN"),
        (lambda: lrmath.k_equiv(0, 4), ValueError, "m must be >= 1"),
        (lambda: lrmath.round_rank(-1), ValueError, "r must be >= 0"),
        (lambda: lrmath.round_rank(np.array([1, -1])), ValueError, "r must be >= 0"),
        (lambda: lrmath.round_rank(np.array([1.5])), ValueError, "integers"),
        (lambda: lrmath.round_rank(5, mode="ceil"), ValueError, "mode"),
        (lambda: lrmath.round_rank(5, 0), ValueError, "multiple"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_inputs_are_not_mutated():
    v = np.array([3.0, 2.0, 1e-20, -1e-18])
    r = np.array([5, 9])
    before = v.copy(), r.copy()
    lrmath.rank_for_error(v, 0.1)
    lrmath.round_rank(r, 4)
    np.testing.assert_array_equal(v, before[0])
    np.testing.assert_array_equal(r, before[1])
