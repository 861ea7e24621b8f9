"""Exact Euclidean projection onto a capped simplex, and how FLAT-LLM's Algorithm 1 differs from it.

Statements proved here for ``P(v) = argmin ||w - v||`` over ``{sum w = total, lower <= w <= upper}``:

* feasibility (sum to rounding, bounds exactly) and the KKT conditions: one threshold ``tau``
  with ``w = clip(v - tau, lower, upper)``, on instances of up to 400 entries;
* optimality against scipy.optimize (SLSQP) on small instances;
* idempotence ``P(P(v)) = P(v)``, translation invariance ``P(v + c 1) = P(v)`` and
  non-expansiveness ``||P(u) - P(v)|| <= ||u - v||``;
* FLAT-LLM Eq. 8 names this projection (of ``w_hat = t B / sum t`` with bounds [0, 1]) but its
  Algorithm 1 returns ``min(s t, 1)``: the two agree when no cap is active, and differ whenever a
  cap is active and the uncapped layers have two distinct importances (concrete example:
  ``t = (6, 3, 1)``, ``B = 2``).
"""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.optimize import minimize

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def projection_problems(draw, min_len=1, max_len=40, allow_inf=True):
    """(v, total, lower, upper): bounds scalar or per entry, total anywhere in the feasible range."""
    rng = np.random.default_rng(draw(seeds()))
    L = draw(st.integers(min_len, max_len))
    scale = 10.0 ** draw(st.integers(-3, 3))
    v = rng.standard_normal(L) * scale * draw(st.sampled_from([0.1, 1.0, 10.0]))
    kind = draw(st.sampled_from(["unit", "scalar", "arrays", "simplex"] if allow_inf else ["unit", "scalar", "arrays"]))
    if kind == "unit":
        lower, upper = 0.0, 1.0
        v = v / scale
    elif kind == "scalar":
        lower = float(rng.normal()) * scale
        upper = lower + float(rng.exponential()) * scale
    elif kind == "arrays":
        lower = rng.normal(size=L) * scale
        upper = lower + rng.exponential(size=L) * scale * (rng.random(L) > 0.1)  # some lower == upper
    else:
        lower, upper = 0.0, np.inf
    lo = np.broadcast_to(lower, (L,))
    up = np.broadcast_to(upper, (L,))
    if np.isinf(up).any():
        total = float(np.sum(lo) + rng.exponential() * scale)
    else:
        frac = draw(st.sampled_from([0.0, 1.0, None]))
        frac = rng.random() if frac is None else frac
        total = float(np.sum(lo) + frac * (np.sum(up) - np.sum(lo)))
    return v, total, lower, upper


def sum_tol(v, total, lower, upper):
    finite = [np.abs(np.asarray(b, dtype=float)) for b in (lower, upper)]
    scale = max(np.max(np.abs(v)), abs(total), *(np.max(b[np.isfinite(b)], initial=0.0) for b in finite), 1e-300)
    return tolerance(np.float64, n=v.size) * scale * v.size


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=projection_problems(max_len=400))
def test_feasible_and_kkt(backend, problem):
    """w = clip(v - tau, lower, upper) for one tau, and sum(w) = total."""
    v, total, lower, upper = problem
    w_b = lrmath.capped_simplex_projection(to_backend(v, backend), total,
                                           *(to_backend(b, backend) if np.ndim(b) else b for b in (lower, upper)))
    assert same_library(w_b, to_backend(v, backend))
    w = to_numpy(w_b)
    lo, up = np.broadcast_to(lower, v.shape), np.broadcast_to(upper, v.shape)
    tol = sum_tol(v, total, lower, upper)
    assert np.all(w >= lo) and np.all(w <= up)
    assert abs(math.fsum(w) - total) <= tol
    shift = v - w
    free = (w > lo) & (w < up)
    if free.any():
        tau = float(np.median(shift[free]))
        assert np.all(np.abs(shift[free] - tau) <= tol)
        # an entry at its lower bound would like to be lower still, one at its upper higher still
        at_lo, at_up = (w == lo) & (lo < up), (w == up) & (lo < up)
        assert np.all(v[at_lo] - lo[at_lo] <= tau + tol)
        assert np.all(v[at_up] - up[at_up] >= tau - tol)
    else:  # every entry at a bound: some tau separates the two groups
        at_lo, at_up = (w == lo) & (lo < up), (w == up) & (lo < up)
        if at_lo.any() and at_up.any():
            assert np.max(v[at_lo] - lo[at_lo]) <= np.min(v[at_up] - up[at_up]) + tol


@given(problem=projection_problems(max_len=6, allow_inf=False))
def test_optimal_against_scipy_slsqp(problem):
    v, total, lower, upper = problem
    w = lrmath.capped_simplex_projection(v, total, lower, upper)
    lo, up = np.broadcast_to(lower, v.shape), np.broadcast_to(upper, v.shape)
    x0 = np.clip(np.full_like(v, total / v.size), lo, up)
    res = minimize(lambda x: 0.5 * np.sum((x - v) ** 2), x0, jac=lambda x: x - v, method="SLSQP",
                   bounds=list(zip(lo, up)), constraints=[{"type": "eq", "fun": lambda x: np.sum(x) - total,
                                                           "jac": lambda x: np.ones_like(x)}],
                   options={"ftol": 1e-14, "maxiter": 500})
    x = np.clip(res.x, lo, up)
    scale = max(np.max(np.abs(v)), abs(total), 1.0)
    if abs(np.sum(x) - total) > 1e-9 * scale:
        return  # scipy did not reach a feasible point: nothing to compare against
    ours, theirs = np.sum((w - v) ** 2), np.sum((x - v) ** 2)
    assert ours <= theirs + 1e-8 * scale**2
    # strict convexity: scipy's point cannot be far from the unique minimiser
    assert np.linalg.norm(w - x) <= 1e-3 * scale


@given(problem=projection_problems(), shift=st.floats(-1e3, 1e3), seed=seeds())
def test_idempotent_translation_invariant_nonexpansive(problem, shift, seed):
    v, total, lower, upper = problem
    P = lambda x: lrmath.capped_simplex_projection(x, total, lower, upper)  # noqa: E731
    w = P(v)
    tol = sum_tol(v, total, lower, upper)
    np.testing.assert_allclose(P(w), w, rtol=0, atol=tol)
    scale = max(np.max(np.abs(v)), 1.0)
    np.testing.assert_allclose(P(v + shift * scale), w, rtol=0, atol=tol * (1 + abs(shift)))
    u = v + np.random.default_rng(seed).standard_normal(v.size) * scale
    assert np.linalg.norm(P(u) - w) <= np.linalg.norm(u - v) * (1 + 1e-12) + tol


# ------------------------------------------------ FLAT-LLM Algorithm 1 versus the projection
@st.composite
def importances(draw, max_layers=40):
    """Layer importances, some far above the rest so that caps bind, and a budget in [0, L]."""
    rng = np.random.default_rng(draw(seeds()))
    L = draw(st.integers(1, max_layers))
    t = rng.uniform(0.05, 0.3, size=L)  # the range FLAT reports on Llama-2 7B: 0.08 .. 0.28
    k = draw(st.integers(0, L))
    t[rng.choice(L, size=k, replace=False)] *= 10.0 ** draw(st.floats(0.0, 2.0))
    if draw(st.booleans()):
        t[rng.random(L) < 0.2] = 0.0
    B = L * draw(st.floats(0.0, 1.0))
    return t, B


@given(problem=importances())
def test_projection_is_never_farther_than_algorithm_1(problem):
    t, B = problem
    if t.sum() == 0:
        return
    w_hat = t / t.sum() * B
    proj = lrmath.capped_simplex_projection(w_hat, B)
    alg1 = lrmath.iprs_allocate(t, B)
    tol = tolerance(n=t.size) * max(B, 1.0)
    assert np.sum((proj - w_hat) ** 2) <= np.sum((alg1 - w_hat) ** 2) + tol**2
    capped = np.any(w_hat > 1.0)
    if not capped:  # w_hat is feasible: both return it
        np.testing.assert_allclose(alg1, w_hat, rtol=0, atol=tol)
        np.testing.assert_allclose(proj, w_hat, rtol=0, atol=tol)
    free = alg1 < 1.0 - tol
    if capped and np.unique(t[free]).size >= 2:
        # Algorithm 1 rescales the uncapped layers, the projection shifts them: they differ
        assert np.max(np.abs(proj - alg1)) > tol


def test_documented_example_where_algorithm_1_is_not_the_projection():
    """docs/theorems/capped-simplex-projection.md: t = (6, 3, 1), B = 2, w_hat = (1.2, 0.6, 0.2)."""
    t = np.array([6.0, 3.0, 1.0])
    w_hat = t / t.sum() * 2.0
    alg1 = lrmath.iprs_allocate(t, 2.0)
    proj = lrmath.capped_simplex_projection(w_hat, 2.0)
    np.testing.assert_allclose(alg1, [1.0, 0.75, 0.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(proj, [1.0, 0.7, 0.3], rtol=0, atol=1e-15)
    assert math.isclose(np.sum((alg1 - w_hat) ** 2), 0.065)
    assert math.isclose(np.sum((proj - w_hat) ** 2), 0.06)


def test_plain_simplex_and_fixed_entries():
    w = lrmath.capped_simplex_projection(np.array([0.3, -0.2, 2.0]), 1.0, upper=np.inf)
    np.testing.assert_allclose(w, [0.0, 0.0, 1.0])
    w = lrmath.capped_simplex_projection(np.array([5.0, 0.0, 0.0]), 2.0, lower=np.array([0.0, 0.5, 0.0]),
                                         upper=np.array([1.0, 0.5, 1.0]))
    np.testing.assert_allclose(w, [1.0, 0.5, 0.5])
    w = lrmath.capped_simplex_projection(np.array([3.0, 1.0]), -0.5, lower=-np.inf, upper=np.array([0.0, 1.0]))
    np.testing.assert_allclose(w, [0.0, -0.5])  # tau = 1.5: the first entry stays at its cap


@pytest.mark.parametrize(
    "v, total, kwargs, match",
    [
        (np.ones(3), 4.0, {}, "total"),
        (np.ones(3), -0.1, {}, "total"),
        (np.ones(3), math.nan, {}, "total"),
        (np.array([1.0, np.nan]), 1.0, {}, "v contains NaN"),
        (np.ones(3), 1.0, {"lower": 2.0, "upper": 1.0}, "lower must be <= upper"),
        (np.ones(3), 1.0, {"lower": np.zeros(2)}, "lower must be a scalar or have shape"),
        (np.ones(3), 1.0, {"lower": -np.inf, "upper": np.inf}, "both hold infinities"),
        (np.ones(2), 1.0, {"lower": np.array([-np.inf, 0.0]), "upper": np.array([0.0, np.inf])}, "both"),
        (np.ones((2, 2)), 1.0, {}, "v must be 1-dimensional"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(v, total, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrmath.capped_simplex_projection(v, total, **kwargs)


def test_input_is_not_mutated():
    v, lo, up = np.array([2.0, -1.0, 0.5]), np.zeros(3), np.full(3, 0.8)
    before = v.copy(), lo.copy(), up.copy()
    lrmath.capped_simplex_projection(v, 1.0, lo, up)
    for a, b in zip((v, lo, up), before):
        np.testing.assert_array_equal(a, b)
