"""Ledoit-Wolf (2004) and OAS (Chen et al. 2010) shrinkage: scikit-learn's numbers, from samples or streams.

Statements: on data whose mean is up to 1000 times its spread, ``lrmath.ledoit_wolf`` and
``lrmath.oas`` equal ``sklearn.covariance.ledoit_wolf`` / ``oas`` to 1e-9 (with and without
``assume_centered``); the same estimate comes from a ``Moments`` stream in any split; the centred
estimators are translation invariant; the intensity lies in [0, 1] and the shrunk matrix is SPD
(smallest eigenvalue >= s * mu) for p > 1; FLAR-SVD's reference intensity has a numerator that is
exactly zero, so it is rounding noise.
"""

import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf, oas as sk_oas, shrunk_covariance

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import samples, seeds, spd_matrices, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend

ESTIMATORS = {"ledoit_wolf": (lrmath.ledoit_wolf, sk_ledoit_wolf), "oas": (lrmath.oas, sk_oas)}
SKLEARN_RTOL = 1e-9

shifted_samples = samples(min_n=1, max_n=80, max_p=16)


def sklearn_estimate(name, X, assume_centered):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "only one sample" for n = 1
        return ESTIMATORS[name][1](X, assume_centered=assume_centered)


def assert_same_estimate(got, cov, shrinkage, rtol, what):
    """Covariances agree relative to their largest entry; intensities (already in [0, 1]) absolutely."""
    scale = np.abs(cov).max() + 1e-300
    np.testing.assert_allclose(to_numpy(got.covariance), cov, rtol=0, atol=rtol * scale, err_msg=what)
    assert abs(float(got.shrinkage) - float(shrinkage)) <= rtol, (what, float(got.shrinkage), shrinkage)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=shifted_samples, assume_centered=st.booleans())
def test_equals_scikit_learn_on_shifted_data(backend, case, assume_centered):
    X = case.X
    for name, (estimator, _) in ESTIMATORS.items():
        ours = estimator(to_backend(X, backend), assume_centered=assume_centered)
        assert same_library(ours.covariance, to_backend(X, backend))
        cov, shrinkage = sklearn_estimate(name, X, assume_centered)
        assert_same_estimate(ours, cov, shrinkage, SKLEARN_RTOL, f"{name} vs scikit-learn")
        np.testing.assert_allclose(float(ours.target), np.trace(cov) / X.shape[1], rtol=SKLEARN_RTOL)


@st.composite
def streamed(draw):
    case = draw(shifted_samples)
    rng = np.random.default_rng(draw(seeds()))
    cuts = np.sort(rng.integers(0, case.X.shape[0] + 1, size=draw(st.integers(0, 5))))
    return case, np.split(case.X, cuts)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=streamed(), assume_centered=st.booleans())
def test_streaming_equals_batch(backend, case, assume_centered):
    """One pass of ``Moments`` over any split of the rows gives the estimate from all samples."""
    (X, shift, _), parts = case
    acc = lrmath.Moments(X.shape[1])
    for part in parts:
        acc.update(to_backend(part, backend))
    tol = tolerance(np.float64, n=X.shape[0], kappa=1.0 + shift)
    for name, (estimator, _) in ESTIMATORS.items():
        stream = estimator(acc, assume_centered=assume_centered)
        batch = estimator(to_backend(X, backend), assume_centered=assume_centered)
        assert same_library(stream.covariance, batch.covariance)
        assert_same_estimate(stream, to_numpy(batch.covariance), to_numpy(batch.shrinkage), tol, name)


@pytest.mark.parametrize("name", ESTIMATORS)
@given(case=samples(min_n=1, max_n=80, max_p=16, max_log10_shift=0.0), seed=seeds(),
       log10_shift=st.floats(-1.0, 3.0))
def test_centred_estimators_are_translation_invariant(name, case, seed, log10_shift):
    """Adding one vector to every sample changes neither the covariance nor the intensity."""
    X = case.X
    c = 10.0**log10_shift * X.std() * np.random.default_rng(seed).standard_normal(X.shape[1])
    a = ESTIMATORS[name][0](X)
    b = ESTIMATORS[name][0](X + c)
    kappa = 1.0 + np.abs(c).max() / (X.std() + 1e-300)
    assert_same_estimate(b, a.covariance, a.shrinkage, tolerance(n=X.shape[0], kappa=kappa), "translated")


@pytest.mark.parametrize("target", ["identity", "diagonal"])
@given(case=samples(min_n=2, max_n=40, max_p=8, max_log10_shift=0.0), k=st.integers(-500, 200))
def test_ledoit_wolf_is_exact_under_power_of_two_scaling_or_refuses(target, case, k):
    """Scaling the data by ``2^k`` (exact) scales the covariance by ``4^k`` and keeps the intensity
    while the fourth powers are normal numbers; where every fourth power underflows (the squares
    still normal) it raises instead of returning another intensity (before stop 24: ``s = 0``).
    """
    X = case.X / np.abs(case.X).max()  # max |x| = 1, so max |2^k x| = 2^k
    if np.abs(X - X.mean(axis=0)).max() <= 2.0 ** -20:
        return  # (nearly) constant data: the spread, not max |x|, sets where powers underflow
    a = lrmath.ledoit_wolf(X, target=target)
    scaled = np.ldexp(X, k)
    try:
        b = lrmath.ledoit_wolf(scaled, target=target)
    except ValueError as err:
        assert "underflow" in str(err) and k < -250, k
        return
    # |2^k x|^4 < 2^-1074 for every x once k <= -269 - 20 (the centred spread may be 2^-20 of the max)
    assert k > -289, f"fourth powers all underflow at k = {k}, yet no error"
    if k >= -230:
        np.testing.assert_allclose(float(b.shrinkage), float(a.shrinkage), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.ldexp(b.covariance, -2 * k), a.covariance, rtol=1e-12,
                                   atol=1e-15 * np.abs(a.covariance).max())


@pytest.mark.parametrize("name", ESTIMATORS)
@given(case=samples(min_n=1, max_n=40, max_p=16), assume_centered=st.booleans())
def test_intensity_in_unit_interval_and_result_spd(name, case, assume_centered):
    """s in [0, 1]; lambda_min((1-s) S + s mu I) >= s mu (up to rounding of lambda_max), so the
    result is SPD whenever s mu is above that rounding, also with fewer samples than features."""
    X = case.X
    res = ESTIMATORS[name][0](X, assume_centered=assume_centered)
    s, mu = float(res.shrinkage), float(res.target)
    assert 0.0 <= s <= 1.0
    evals = np.linalg.eigvalsh(res.covariance)
    rounding = tolerance(n=X.shape[1]) * evals[-1]
    assert evals[0] >= s * mu - rounding
    if X.shape[1] > 1 and s * mu > rounding:
        assert evals[0] > 0
        assert np.all(np.linalg.cholesky(res.covariance).diagonal() > 0)


def exact_rows_and_covariance(X, assume_centered):
    """The (centred) rows and ``S`` of the float64 data as exact rationals."""
    n, p = X.shape
    rows = [[Fraction(float(v)) for v in row] for row in X]
    if not assume_centered:
        mean = [sum(r[j] for r in rows) / n for j in range(p)]
        rows = [[r[j] - mean[j] for j in range(p)] for r in rows]
    return rows, [[sum(r[i] * r[j] for r in rows) / n for j in range(p)] for i in range(p)]


def exact_ledoit_wolf_shrinkage(X, assume_centered):
    """The Ledoit-Wolf intensity of the float64 data in rational arithmetic."""
    n, p = X.shape
    rows, S = exact_rows_and_covariance(X, assume_centered)
    mu = sum(S[i][i] for i in range(p)) / p
    delta = sum((S[i][j] - (mu if i == j else 0)) ** 2 for i in range(p) for j in range(p)) / p
    fourth = sum(sum(v * v for v in r) ** 2 for r in rows)
    beta = (fourth - n * sum(S[i][j] ** 2 for i in range(p) for j in range(p))) / (n * n * p)
    return Fraction(0) if delta == 0 else min(beta, delta) / delta


@given(case=samples(min_n=1, max_n=24, max_p=5), assume_centered=st.booleans())
def test_ledoit_wolf_intensity_is_accurate_in_exact_arithmetic(case, assume_centered):
    """Relative error of s is within tolerance(n, kappa) where kappa is the cancellation in beta."""
    X = case.X
    exact = exact_ledoit_wolf_shrinkage(X, assume_centered)
    got = float(lrmath.ledoit_wolf(X, assume_centered=assume_centered).shrinkage)
    Z = X if assume_centered else X - X.mean(axis=0)
    r2 = np.sum(Z * Z, axis=1)
    S = Z.T @ Z / len(Z)
    n, p = X.shape
    # beta * n^2 p = sum|z|^4 - n ||S||^2 cancels: its rounding is relative to the terms, not to beta.
    # Divided by delta this bounds the error of s; for beta > 0 it equals kappa * s with
    # kappa = (terms) / (difference), and it stays meaningful when beta is exactly 0.
    terms = np.sum(r2 * r2) + n * np.sum(S * S)
    delta = np.sum((S - np.trace(S) / p * np.eye(p)) ** 2) / p
    scale = terms / (n * n * p * delta) if delta > 0 else 0.0
    tol = tolerance(n=n * p)
    assert abs(got - float(exact)) <= tol * scale + 1e-300, (got, float(exact))


@given(batch=st.integers(1, 3), case=samples(min_n=2, max_n=30, max_p=6))
def test_batched_data_equals_one_estimate_per_head(batch, case):
    X = case.X
    heads = np.stack([X * (h + 1) + h for h in range(batch)])
    acc = lrmath.Moments(X.shape[1], batch_shape=(batch,)).update(heads)
    for name, (estimator, _) in ESTIMATORS.items():
        for together in (estimator(heads), estimator(acc)):
            assert together.shrinkage.shape == (batch,)
            for h in range(batch):
                alone = estimator(heads[h])
                assert_same_estimate(alone, together.covariance[h], together.shrinkage[h],
                                     tolerance(n=X.shape[0], kappa=1 + case.mean_shift + batch), name)


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=spd_matrices(max_dim=12), s=st.floats(0.0, 1.0))
def test_shrink_is_the_fixed_intensity_convex_combination(backend, C, s):
    """Matches scikit-learn's shrunk_covariance, keeps the trace, moves eigenvalues to (1-s) l + s mu."""
    out = lrmath.shrink(to_backend(C, backend), s)
    assert same_library(out, to_backend(C, backend))
    out = to_numpy(out)
    d = C.shape[0]
    scale = np.abs(C).max()
    np.testing.assert_allclose(out, shrunk_covariance(C, s), rtol=0, atol=tolerance(n=d) * scale)
    assert abs(np.trace(out) - np.trace(C)) <= tolerance(n=d) * np.trace(C)
    expected = (1 - s) * np.linalg.eigvalsh(C) + s * np.trace(C) / d
    np.testing.assert_allclose(np.linalg.eigvalsh(out), expected, rtol=0, atol=tolerance(n=d) * scale)


@given(case=samples(min_n=2, max_n=60, max_p=16))
def test_flar_svd_reference_intensity_has_a_zero_numerator(case):
    """FLAR-SVD's clip(1e10 (tr S - tr T) / ||S - T||_F^2, 0, 1) with T = mean(diag S) I:
    tr T = tr S exactly, so only rounding (<= p ulps of tr S) is left in the numerator."""
    X = case.X
    p = X.shape[1]
    S = np.cov(X.T, bias=True).reshape(p, p)
    mu = np.trace(S) / p
    exact_num = sum(Fraction(float(v)) for v in np.diag(S)) - p * (sum(Fraction(float(v)) for v in np.diag(S)) / p)
    assert exact_num == 0
    rounding = abs(np.trace(S) - np.trace(mu * np.eye(p)))
    assert rounding <= 2 * p * np.finfo(np.float64).eps * np.trace(S)


def test_flar_svd_reference_intensity_is_not_ledoit_wolf():
    """Explanation: on a concrete draw, the reference formula's intensity has nothing to do with the data."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((20, 50)) * np.linspace(0.1, 3.0, 50)  # n < p: heavy shrinkage is due
    S = np.cov(X.T, bias=True)
    T = np.trace(S) / 50 * np.eye(50)
    flar = np.clip(1e10 * (np.trace(S) - np.trace(T)) / np.sum((S - T) ** 2), 0, 1)
    real = float(lrmath.ledoit_wolf(X).shrinkage)
    assert flar < 1e-2 < real  # the reference intensity is rounding noise, Ledoit-Wolf is ~0.74


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lrmath.ledoit_wolf(np.zeros((0, 3))), "data is empty"),
        (lambda: lrmath.oas(np.zeros((3, 0))), "data is empty"),
        (lambda: lrmath.ledoit_wolf(np.zeros(3)), "data must have at least 2"),
        (lambda: lrmath.oas(np.array([[1.0, np.nan]])), "data contains NaN"),
        (lambda: lrmath.ledoit_wolf(lrmath.Moments(3)), "count 0"),
        (lambda: lrmath.shrink(np.eye(2), 1.5), "shrinkage"),
        (lambda: lrmath.shrink(np.eye(2), -0.1), "shrinkage"),
        (lambda: lrmath.shrink(np.eye(2), float("nan")), "shrinkage"),
        (lambda: lrmath.shrink(np.eye(2), "a lot"), "shrinkage"),
        (lambda: lrmath.shrink(np.array([[1.0, 2.0], [0.0, 1.0]]), 0.5), "C is not symmetric"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 4)) + 100.0
    C = np.cov(X.T)
    acc = lrmath.Moments(4).update(X)
    saved = (X.copy(), C.copy(), acc.to_dict())
    for estimator in (lrmath.ledoit_wolf, lrmath.oas):
        estimator(X)
        estimator(acc, assume_centered=True)
    lrmath.shrink(C, 0.3)
    np.testing.assert_array_equal(X, saved[0])
    np.testing.assert_array_equal(C, saved[1])
    for key, value in acc.to_dict().items():
        np.testing.assert_array_equal(value, saved[2][key])


def test_float32_input_gives_float64_result():
    X = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32)
    for estimator in (lrmath.ledoit_wolf, lrmath.oas):
        res = estimator(X)
        assert res.covariance.dtype == np.float64 and res.shrinkage.dtype == np.float64
    assert lrmath.shrink(np.eye(3, dtype=np.float32), 0.5).dtype == np.float64
