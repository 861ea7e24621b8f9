"""Ledoit-Wolf toward the diagonal (Schaefer & Strimmer 2005, target D): the definition, in one pass.

Statements: ``lrmath.ledoit_wolf(X, target="diagonal")`` has the intensity
``min(beta_D, delta_D) / delta_D`` of its definition (``delta_D`` the squared off-diagonal entries
of ``S``, ``beta_D`` the summed squared deviations of the rows' products from them, divided by
``n^2``), computed in exact arithmetic, within a tolerance set by the cancellation in ``beta_D``;
it keeps every variance and scales every covariance by ``1 - s``; it is the same from samples on
every backend and from a ``Moments`` stream in any split; it is invariant to translation and to a
common scale of the data, equivariant under a permutation of the features, and SPD for ``s > 0``
when every variance is positive; ``shrink(..., target="diagonal")`` is the convex combination.
"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import samples, seeds, spd_matrices, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend
from proofs_tests.test_shrinkage import exact_rows_and_covariance, streamed  # shifted samples, split


def diagonal_lw(X, **kw):
    return lrmath.ledoit_wolf(X, target="diagonal", **kw)


def exact_intensity(X, assume_centered):
    """The intensity by its definition, term by term, in rational arithmetic."""
    n, p = X.shape
    rows, S = exact_rows_and_covariance(X, assume_centered)
    pairs = [(i, j) for i in range(p) for j in range(p) if i != j]
    delta = sum(S[i][j] ** 2 for i, j in pairs)
    beta = sum((r[i] * r[j] - S[i][j]) ** 2 for r in rows for i, j in pairs) / (n * n)
    return Fraction(0) if delta == 0 else min(beta, delta) / delta


def cancellation(X, assume_centered=False):
    """How much rounding of the one-pass ``beta_D`` can move ``s``: (its terms) / (n^2 delta_D).

    ``beta_D n^2 = sum|z|^4 - sum z^4 - n delta_D`` cancels, so its rounding is relative to the
    terms, not to their difference; divided by ``delta_D`` it bounds the error of ``s`` (>= 1).
    """
    Z = X if assume_centered else X - X.mean(axis=0)
    n = X.shape[0]
    S = Z.T @ Z / n
    off = S - np.diag(np.diag(S))
    delta = np.sum(off * off)
    r2 = np.sum(Z * Z, axis=1)
    terms = np.sum(r2 * r2) + np.sum(Z**4) + n * delta
    return max(1.0, terms / (n * n * delta)) if delta > 0 else 1.0


@given(case=samples(min_n=1, max_n=20, max_p=5), assume_centered=st.booleans())
def test_intensity_equals_its_definition_in_exact_arithmetic(case, assume_centered):
    """Error of s within tolerance(n p) times the cancellation of beta_D's one-pass form."""
    X = case.X
    exact = exact_intensity(X, assume_centered)
    got = float(diagonal_lw(X, assume_centered=assume_centered).shrinkage)
    n, p = X.shape
    assert abs(got - float(exact)) <= tolerance(n=n * p) * cancellation(X, assume_centered), (got, float(exact))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=streamed(), assume_centered=st.booleans())
def test_streaming_and_every_backend_equal_the_numpy_estimate(backend, case, assume_centered):
    (X, shift, _), parts = case
    acc = lrmath.Moments(X.shape[1], per_feature=True)
    for part in parts:
        acc.update(to_backend(part, backend))
    ref = diagonal_lw(X, assume_centered=assume_centered)
    tol = tolerance(n=X.shape[0], kappa=1.0 + shift)
    s_scale = cancellation(X, assume_centered)  # the intensity's numerator cancels (see above)
    for got in (diagonal_lw(to_backend(X, backend), assume_centered=assume_centered),
                diagonal_lw(acc, assume_centered=assume_centered)):
        assert same_library(got.covariance, to_backend(X, backend))
        assert abs(float(got.shrinkage) - float(ref.shrinkage)) <= tol * s_scale
        cov = to_numpy(ref.covariance)
        atol = tol * s_scale * (np.abs(cov).max() + 1e-300)
        np.testing.assert_allclose(to_numpy(got.covariance), cov, rtol=0, atol=atol)


@given(case=samples(min_n=1, max_n=60, max_p=12), assume_centered=st.booleans())
def test_keeps_every_variance_scales_covariances_and_is_spd(case, assume_centered):
    X = case.X
    res = diagonal_lw(X, assume_centered=assume_centered)
    s = float(res.shrinkage)
    assert 0.0 <= s <= 1.0
    Z = X if assume_centered else X - X.mean(axis=0)
    S = Z.T @ Z / X.shape[0]
    S = (S + S.T) / 2
    scale = np.abs(S).max() + 1e-300
    tol = tolerance(n=X.shape[0], kappa=1.0 + case.mean_shift)
    np.testing.assert_allclose(np.diag(res.covariance), np.diag(S), rtol=0, atol=tol * scale)
    np.testing.assert_allclose(to_numpy(res.target), np.diag(S), rtol=0, atol=tol * scale)
    expected = (1.0 - s) * S + s * np.diag(np.diag(S))
    np.testing.assert_allclose(res.covariance, expected, rtol=0, atol=tol * scale)
    # (1 - s) S is PSD and s Diag(S) >= s min_i S_ii I: the smallest eigenvalue is at least that
    evals = np.linalg.eigvalsh(res.covariance)
    rounding = tolerance(n=X.shape[1]) * max(evals[-1], 0.0) + tol * scale * X.shape[1]
    assert evals[0] >= s * np.diag(S).min() - rounding


@given(case=samples(min_n=2, max_n=60, max_p=10, max_log10_shift=0.0), seed=seeds(),
       log10_scale=st.floats(-3.0, 3.0), log10_shift=st.floats(-1.0, 3.0))
def test_invariant_to_translation_and_common_scale_equivariant_to_permutation(case, seed, log10_scale,
                                                                              log10_shift):
    X = case.X
    rng = np.random.default_rng(seed)
    c = 10.0**log10_shift * (X.std() + 1e-300) * rng.standard_normal(X.shape[1])
    a = 10.0**log10_scale
    perm = rng.permutation(X.shape[1])
    base = diagonal_lw(X)
    moved = diagonal_lw(a * X[:, perm] + c)
    kappa = 1.0 + np.abs(c).max() / (a * X.std() + 1e-300)
    tol = tolerance(n=X.shape[0], kappa=kappa) * cancellation(X)
    assert abs(float(moved.shrinkage) - float(base.shrinkage)) <= tol
    ref = a * a * base.covariance[np.ix_(perm, perm)]
    np.testing.assert_allclose(moved.covariance, ref, rtol=0, atol=tol * (np.abs(ref).max() + 1e-300))


@given(batch=st.integers(1, 3), case=samples(min_n=2, max_n=30, max_p=6))
def test_batched_data_equals_one_estimate_per_head(batch, case):
    X = case.X
    heads = np.stack([X * (h + 1) + h for h in range(batch)])
    acc = lrmath.Moments(X.shape[1], batch_shape=(batch,), per_feature=True).update(heads)
    for together in (diagonal_lw(heads), diagonal_lw(acc)):
        assert together.shrinkage.shape == (batch,) and together.target.shape == (batch, X.shape[1])
        for h in range(batch):
            alone = diagonal_lw(heads[h])
            tol = tolerance(n=X.shape[0], kappa=1 + case.mean_shift + batch) * cancellation(X)
            assert abs(float(together.shrinkage[h]) - float(alone.shrinkage)) <= tol
            scale = np.abs(alone.covariance).max() + 1e-300
            np.testing.assert_allclose(together.covariance[h], alone.covariance, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=spd_matrices(max_dim=12), s=st.floats(0.0, 1.0))
def test_shrink_toward_the_diagonal_is_the_convex_combination(backend, C, s):
    out = lrmath.shrink(to_backend(C, backend), s, target="diagonal")
    assert same_library(out, to_backend(C, backend))
    out = to_numpy(out)
    d = C.shape[0]
    np.testing.assert_array_equal(np.diag(out), np.diag(C))
    np.testing.assert_allclose(out, (1 - s) * C + s * np.diag(np.diag(C)), rtol=0,
                               atol=tolerance(n=d) * np.abs(C).max())


def test_one_feature_and_uncorrelated_features_need_no_shrinkage():
    """p = 1: nothing to shrink (s = 0). Exactly diagonal S: delta_D = 0, s = 0, the result is S."""
    X = np.random.default_rng(0).standard_normal((40, 1)) + 3.0
    res = diagonal_lw(X)
    assert float(res.shrinkage) == 0.0
    np.testing.assert_allclose(res.covariance, np.cov(X.T, bias=True).reshape(1, 1), rtol=1e-12)
    Y = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # S = diag(0.5, 2) exactly
    assert float(diagonal_lw(Y).shrinkage) == 0.0


@pytest.mark.parametrize("call", [
    lambda: lrmath.ledoit_wolf(np.ones((3, 2)), target="eye"),
    lambda: lrmath.ledoit_wolf(np.ones((3, 2)), target=None),
    lambda: lrmath.shrink(np.eye(2), 0.5, target="scalar"),
])
def test_unknown_target_is_refused(call):
    with pytest.raises(ValueError, match="target must be one of"):
        call()
