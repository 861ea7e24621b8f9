"""Activation-aware SVD: Eckart-Young in the data-weighted norm ``||(W - What) X||_F``.

Statements proved here (see docs/theorems/whitened-svd.md), on LLM-like weight /
activation pairs (outlier input channels, fewer tokens than channels):

* ``dropped = sum_{i>r} sigma_i(W S)^2`` equals the measured error
  ``||(W - left right) X||_F^2`` (plus ``delta ||W - left right||_F^2`` when damped);
* Eckart-Young: no rank-``r`` competitor does better (random factors, the best
  left factor for a random right factor, small perturbations of the optimum);
* Cholesky, symmetric square root and eigen form give the same error, also when
  ``C`` is singular (the pseudo-inverse attains the optimum);
* the error is non-increasing in ``r``, from ``||W S||_F^2`` at ``r = 0`` to 0;
* the split is balanced: ``left^T left = Sigma_r = (right S)(right S)^T``;
* numpy and torch agree on errors, singular values and the whitened product.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy as to_np
from lrmath.testing import seeds, spd_matrices, tolerance, weight_statistic_pairs
from lrmath.whitening import METHODS
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def problems(draw, max_m=12, max_n=12, max_tokens=48, allow_rank_deficient=True):
    """(W, X, C, r) with r drawn in [0, min(m, n)]."""
    case = draw(weight_statistic_pairs(max_m=max_m, max_n=max_n, max_tokens=max_tokens,
                                       allow_rank_deficient=allow_rank_deficient))
    r = draw(st.integers(0, min(case.W.shape)))
    return case.W, case.X, case.C, r


def weighted_error(W, What, X, delta=0.0):
    D = W - What
    return float(np.sum((D @ X) ** 2) + delta * np.sum(D**2))


def error_scale(W, C):
    """Natural size of rounding in the weighted error: ||W||_F^2 lambda_max(C) >= ||W X||_F^2."""
    return float(np.sum(W**2) * max(np.linalg.eigvalsh(C)[-1], 0.0))


def product(res):
    return to_np(res.left) @ to_np(res.right)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=problems(), whitening=st.sampled_from(METHODS),
       damping=st.one_of(st.just(0.0), st.floats(-8.0, -1.0).map(lambda e: 10.0**e)))
def test_dropped_equals_measured_error(backend, case, whitening, damping):
    """dropped = tail sum of sigma^2 = ||(W - left right) X||^2 + delta ||W - left right||^2."""
    W, X, C, r = case
    res = lrmath.whitened_svd(to_backend(W, backend), to_backend(C, backend), r,
                              whitening=whitening, damping=damping)
    assert same_library(res.left, to_backend(W, backend)) and to_np(res.left).dtype == np.float64
    m, n = W.shape
    assert res.left.shape == (m, r) and res.right.shape == (r, n)
    sigma = to_np(res.singular_values)
    assert sigma.shape == (min(m, n),) and np.all(np.diff(sigma) <= 0) and np.all(sigma >= 0)
    dropped = float(res.dropped)
    assert dropped == pytest.approx(float(np.sum(sigma[r:] ** 2)), rel=1e-12, abs=1e-300)
    measured = weighted_error(W, product(res), X, res.whitener.delta)
    scale = error_scale(W, C + res.whitener.delta * np.eye(n))
    assert abs(measured - dropped) <= tolerance(n=max(n, X.shape[1])) * scale


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=problems(), seed=seeds(), log10_step=st.floats(-3.0, 0.0))
def test_no_rank_r_matrix_does_better(backend, case, seed, log10_step):
    """Eckart-Young in the whitened norm against three kinds of rank-r competitors."""
    W, X, C, r = case
    res = lrmath.whitened_svd(to_backend(W, backend), to_backend(C, backend), r)
    best = weighted_error(W, product(res), X)
    m, n = W.shape
    slack = tolerance(n=max(n, X.shape[1])) * error_scale(W, C)
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    assert best <= weighted_error(W, A @ B, X) + slack
    if r:  # the best left factor for a random right factor B: least squares in the data norm
        BX, WX = B @ X, W @ X
        A_ls = np.linalg.lstsq(BX.T, WX.T, rcond=None)[0].T
        assert best <= weighted_error(W, A_ls @ B, X) + slack
    step = 10.0**log10_step  # a nearby rank-r matrix: perturb both optimal factors
    L, R = to_np(res.left), to_np(res.right)
    L2 = L + step * rng.standard_normal(L.shape) * (np.abs(L).max(initial=0.0) + 1.0)
    R2 = R + step * rng.standard_normal(R.shape) * (np.abs(R).max(initial=0.0) + 1.0)
    assert best <= weighted_error(W, L2 @ R2, X) + slack


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=problems())
def test_every_whitening_gives_the_same_error(backend, case):
    """Cholesky, C^{1/2} and V diag(sqrt(lambda)) reach the same optimum, singular C included."""
    W, X, C, r = case
    errors, dropped = [], []
    for method in METHODS:
        res = lrmath.whitened_svd(to_backend(W, backend), to_backend(C, backend), r, whitening=method)
        errors.append(weighted_error(W, product(res), X))  # the undamped objective
        dropped.append(float(res.dropped))
    scale = error_scale(W, C)
    tol = tolerance(n=max(W.shape[1], X.shape[1])) * scale
    assert max(errors) - min(errors) <= tol
    assert max(dropped) - min(dropped) <= tol


@given(case=problems())
def test_error_is_non_increasing_in_rank(case):
    W, X, C, _ = case
    m, n = W.shape
    k = min(m, n)
    results = [lrmath.whitened_svd(W, C, r) for r in range(k + 1)]
    dropped = [float(res.dropped) for res in results]
    measured = [weighted_error(W, product(res), X) for res in results]
    scale = error_scale(W, C)
    tol = tolerance(n=max(n, X.shape[1])) * scale
    assert all(a >= b for a, b in zip(dropped, dropped[1:]))
    assert all(a >= b - tol for a, b in zip(measured, measured[1:]))
    assert dropped[-1] == 0.0
    assert abs(dropped[0] - float(np.sum((W @ X) ** 2))) <= tol  # r = 0: the whole output energy
    for res in results[1:]:  # one SVD: every rank is a slice of the same singular values
        np.testing.assert_array_equal(res.singular_values, results[0].singular_values)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=problems(), whitening=st.sampled_from(METHODS))
def test_split_is_balanced(backend, case, whitening):
    """left^T left = Sigma_r = (right S)(right S)^T."""
    W, _, C, r = case
    res = lrmath.whitened_svd(to_backend(W, backend), to_backend(C, backend), r, whitening=whitening)
    S = to_np(res.whitener.factor)
    sigma = to_np(res.singular_values)[:r]
    L, RS = to_np(res.left), to_np(res.right) @ S
    s = np.linalg.svd(S, compute_uv=False)[: res.whitener.rank]
    kappa = s[0] / s[-1] if s.size else 1.0
    top = float(sigma[0]) if r else 0.0
    n = W.shape[1]
    assert np.abs(L.T @ L - np.diag(sigma)).max(initial=0.0) <= tolerance(n=n) * top
    assert np.abs(RS @ RS.T - np.diag(sigma)).max(initial=0.0) <= tolerance(n=n, kappa=kappa) * top


@given(case=problems(max_m=10, max_n=10, allow_rank_deficient=False), whitening=st.sampled_from(METHODS))
def test_numpy_and_torch_agree(case, whitening):
    """Errors, singular values and (where the rank-r part is unique) the whitened product agree."""
    torch = pytest.importorskip("torch")
    W, X, C, r = case
    a = lrmath.whitened_svd(W, C, r, whitening=whitening)
    b = lrmath.whitened_svd(torch.from_numpy(W), torch.from_numpy(C), r, whitening=whitening)
    assert isinstance(b.left, torch.Tensor) and b.left.dtype == torch.float64
    n = W.shape[1]
    sigma = a.singular_values
    scale = error_scale(W, C)
    tol = tolerance(n=max(n, X.shape[1]))
    assert abs(float(a.dropped) - float(b.dropped)) <= tol * scale
    np.testing.assert_allclose(sigma, b.singular_values.numpy(), rtol=0, atol=tol * np.sqrt(scale))
    k = min(W.shape)
    if 0 < r < k and sigma[r - 1] > sigma[r] * (1 + 1e-3):  # unique rank-r part: compare it, whitened
        gap = (sigma[r - 1] - sigma[r]) / sigma[0]
        diff = np.sqrt(np.sum(((product(a) - product(b)) @ X) ** 2))  # in the data norm
        assert diff <= tolerance(n=n, kappa=1.0 / gap) * np.sqrt(scale)


@given(C=spd_matrices(max_dim=10), seed=seeds(), whitening=st.sampled_from(METHODS))
def test_whitener_can_be_reused(C, seed, whitening):
    """Passing a Whitener (one factorisation for q, k, v) equals passing C."""
    n = C.shape[0]
    W = np.random.default_rng(seed).standard_normal((7, n))
    r = min(3, n)
    w = lrmath.whiten(C, method=whitening)
    a = lrmath.whitened_svd(W, w, r)
    b = lrmath.whitened_svd(W, C, r, whitening=whitening)
    assert a.whitener is w
    for x, y in [(a.left, b.left), (a.right, b.right), (a.singular_values, b.singular_values)]:
        np.testing.assert_array_equal(x, y)


def test_float32_inputs_are_decomposed_in_float64():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4)).astype(np.float32)
    X = rng.standard_normal((4, 30)).astype(np.float32)
    res = lrmath.whitened_svd(W, X @ X.T, 2)
    assert res.left.dtype == res.right.dtype == res.singular_values.dtype == np.float64


@pytest.mark.parametrize(
    "W, C, r, kwargs, exc, match",
    [
        (np.ones(4), np.eye(4), 1, {}, ValueError, "W must be 2-dimensional"),
        (np.ones((3, 5)), np.eye(4), 1, {}, ValueError, "W must have as many columns"),
        (np.full((3, 4), np.nan), np.eye(4), 1, {}, ValueError, "W contains NaN"),
        (np.ones((3, 4)), np.eye(4), 4, {}, ValueError, "r = 4 is outside"),
        (np.ones((3, 4)), np.eye(4), -1, {}, ValueError, "r = -1 is outside"),
        (np.ones((3, 4)), np.eye(4), 1.5, {}, TypeError, "r must be an integer"),
        (np.ones((3, 4)), np.eye(4), 1, {"whitening": "svd"}, ValueError, "method"),
        (np.ones((3, 4)), np.eye(4), 1, {"damping": -1.0}, ValueError, "damping"),
        (np.ones((3, 4)), np.ones((4, 3)), 1, {}, ValueError, "C must be square"),
    ],
)
def test_bad_input(W, C, r, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lrmath.whitened_svd(W, C, r, **kwargs)


def test_mixed_libraries_raise_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy and torch"):
        lrmath.whitened_svd(np.ones((3, 4)), torch.eye(4, dtype=torch.float64), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated(backend):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 2))
    W, C = to_backend((rng.standard_normal((3, 4)), X @ X.T), backend)
    before = to_np(W).copy(), to_np(C).copy()
    for method in METHODS:
        lrmath.whitened_svd(W, C, 2, whitening=method, damping=1e-3)
    np.testing.assert_array_equal(to_np(W), before[0])
    np.testing.assert_array_equal(to_np(C), before[1])
