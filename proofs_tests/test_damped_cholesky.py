"""Batched damped Cholesky contract (:func:`lrmath.damped_cholesky`).

Statements proved here (see docs/theorems/whitening.md, "Batched damped Cholesky"):

* every factor is lower triangular with a positive diagonal and
  ``L_h L_h^T = A_h + alpha_h m_h I`` (``m_h`` the mean diagonal), on positive
  definite, rank-deficient and zero matrices mixed in one batch;
* ``alpha_h`` is the *first* value of ``[damping] + CHOLESKY_SCHEDULE`` that
  factorises ``A_h``: every earlier one fails, so no matrix is damped more
  than it needs, and one failing matrix does not damp the others (the batch
  equals each matrix factorised on its own);
* zero matrices give the identity, ``alpha = 0`` and ``alive = False``;
* damping is relative: ``a A`` gives the same ``alpha`` and ``sqrt(a) L``;
* on a single matrix it is :func:`lrmath.whiten`'s Cholesky whenever that
  succeeds (same factor, same damping);
* matrices no PSD statistic can be (indefinite beyond rounding) raise a
  ValueError naming their batch index, as does bad input; inputs are not mutated.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import cholesky_each
from lrmath._backend import to_numpy as to_np
from lrmath.testing import psd_matrices, spd_matrices, tolerance
from lrmath.whitening import CHOLESKY_SCHEDULE
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def mixed_batches(draw, max_dim=10, max_batch=5):
    """A batch mixing positive definite, rank-deficient and all-zero matrices of one size."""
    d = draw(st.integers(1, max_dim))
    kinds = draw(st.lists(st.sampled_from(["spd", "psd", "zero"]), min_size=1, max_size=max_batch))
    out = np.empty((len(kinds), d, d))
    for i, kind in enumerate(kinds):
        if kind == "spd":
            out[i] = draw(spd_matrices(dim=d))
        elif kind == "psd":
            out[i] = draw(psd_matrices(dim=d, allow_zero=False))
        else:
            out[i] = 0.0
    return out


def dampings():
    return st.one_of(st.just(0.0), st.floats(-12.0, -3.0).map(lambda e: 10.0**e))


def _schedule(damping):
    return [damping] + [a for a in CHOLESKY_SCHEDULE if a > damping]


@pytest.mark.parametrize("backend", BACKENDS)
@given(A=mixed_batches(), damping=dampings())
def test_each_factor_reproduces_its_damped_matrix(backend, A, damping):
    A_in = to_backend(A, backend)
    before = A.copy()
    res = lrmath.damped_cholesky(A_in, damping)
    assert same_library(res.factor, A_in)
    np.testing.assert_array_equal(to_np(A_in), before)  # not mutated
    L, alpha, alive = to_np(res.factor), to_np(res.damping), to_np(res.alive)
    assert L.shape == A.shape and alpha.shape == alive.shape == A.shape[:1]
    for h in range(A.shape[0]):
        if not alive[h]:
            assert not np.any(A[h]) and alpha[h] == 0.0
            np.testing.assert_array_equal(L[h], np.eye(A.shape[-1]))
            continue
        assert np.any(A[h])
        assert alpha[h] in _schedule(damping)
        np.testing.assert_array_equal(np.triu(L[h], 1), 0.0)
        assert np.all(np.diag(L[h]) > 0)
        target = A[h] + alpha[h] * np.mean(np.diag(A[h])) * np.eye(A.shape[-1])
        # backward-stable Cholesky: residual of order d eps ||target||
        err = np.linalg.norm(L[h] @ L[h].T - target) / np.linalg.norm(target)
        assert err <= tolerance(np.float64, n=A.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@given(A=mixed_batches(), damping=dampings())
def test_no_matrix_is_damped_more_than_it_needs(backend, A, damping):
    """``alpha_h`` is the first working step; the batch equals each matrix alone."""
    res = lrmath.damped_cholesky(to_backend(A, backend), damping)
    alpha, alive = to_np(res.damping), to_np(res.alive)
    for h in np.flatnonzero(alive):
        steps = _schedule(damping)
        m = np.mean(np.diag(A[h]))
        for earlier in steps[:steps.index(alpha[h])]:
            shifted = to_backend(A[h] + earlier * m * np.eye(A.shape[-1]), backend)
            assert not bool(to_np(cholesky_each(shifted)[1]))
        alone = lrmath.damped_cholesky(to_backend(A[h], backend), damping)
        assert float(to_np(alone.damping)) == alpha[h]
        np.testing.assert_allclose(to_np(alone.factor), to_np(res.factor)[h], rtol=0, atol=1e-12 * np.abs(A[h]).max() ** 0.5)


@given(A=mixed_batches(), e=st.integers(-6, 6))
def test_damping_is_relative(A, e):
    """Scaling by ``4^e`` commutes exactly with every rounding of the factorisation (``sqrt`` of it
    is ``2^e``), so the record is identical and the factor is exactly ``2^e L``."""
    base, scaled = lrmath.damped_cholesky(A), lrmath.damped_cholesky(4.0**e * A)
    np.testing.assert_array_equal(base.damping, scaled.damping)
    np.testing.assert_array_equal(base.alive, scaled.alive)
    live = base.alive
    np.testing.assert_array_equal(scaled.factor[live], 2.0**e * base.factor[live])


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=st.one_of(spd_matrices(max_dim=12), psd_matrices(max_dim=12, allow_zero=False)), damping=dampings())
def test_single_matrix_matches_whiten(backend, C, damping):
    C_in = to_backend(C, backend)
    w = lrmath.whiten(C_in, method="cholesky", damping=damping)
    if w.method != "cholesky":  # whiten fell back to its eigen form: no damping of the schedule worked
        with pytest.raises(ValueError, match="not positive semidefinite"):
            lrmath.damped_cholesky(C_in, damping)
        return
    res = lrmath.damped_cholesky(C_in, damping)
    assert float(to_np(res.damping)) == w.damping and bool(to_np(res.alive))
    np.testing.assert_array_equal(to_np(res.factor), to_np(w.factor))


def test_float32_gram_of_collinear_rows_needs_and_gets_damping():
    """The case that motivated it: a float32 Gram of 3 collinear tokens is PSD only to rounding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16).astype(np.float32)
    X = np.stack([x, 2 * x, -x])
    G = (X.T @ X).astype(np.float64)
    res = lrmath.damped_cholesky(np.stack([G, np.eye(16)]))
    assert res.damping[0] > 0 and res.damping[1] == 0.0
    assert res.alive.tolist() == [True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrices_that_no_statistic_can_be_are_refused_by_index(backend):
    good = np.eye(3)
    indefinite = np.diag([1.0, 1.0, -1.0])  # mean diagonal > 0, one eigenvalue -1: no damping helps
    negative = -np.eye(3)
    for bad, index in ((indefinite, 1), (negative, 1)):
        with pytest.raises(ValueError, match=rf"matrices \[{index}\]"):
            lrmath.damped_cholesky(to_backend(np.stack([good, bad, good]), backend))


@pytest.mark.parametrize("bad, match", [
    (np.ones(3), "at least 2 dimensions"),
    (np.ones((2, 3)), "square"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), "NaN or Inf"),
])
def test_bad_input_raises_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        lrmath.damped_cholesky(bad)


def test_negative_damping_is_refused():
    with pytest.raises(ValueError, match="damping"):
        lrmath.damped_cholesky(np.eye(2), -1e-3)
