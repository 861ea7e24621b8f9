"""FLAT-LLM Theorem 4.1 and Corollary 4.2: PCA truncation error = sum of the dropped eigenvalues.

Statement: for ``Y`` (N, d), ``C = Y^T Y`` and the top-``r`` eigenvectors ``Q_r``,
``||Y - Y Q_r Q_r^T||_F^2 = sum_{i>r} lambda_i``; summed over heads (Corollary 4.2)
for a batch. Also: no other rank-``r`` orthogonal projection does better (optimality),
the error is non-increasing in ``r``, and numpy / torch give the same subspace.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath.testing import (
    assert_subspaces_close,
    random_orthogonal,
    seeds,
    spd_matrices,
    spectra,
    tolerance,
)
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def head_outputs(draw, max_heads=4, max_d=16, max_tokens=48):
    """Per-head outputs Y (h, N, d) with a drawn spectrum per head."""
    rng = np.random.default_rng(draw(seeds()))
    h = draw(st.integers(1, max_heads))
    d = draw(st.integers(1, max_d))
    N = draw(st.integers(1, max_tokens))
    Y = np.empty((h, N, d))
    for i in range(h):
        s = draw(spectra(dim=d, max_log10_cond=6.0))
        Y[i] = rng.standard_normal((N, d)) @ (random_orthogonal(rng, d) * np.sqrt(s)).T
    r = draw(st.integers(0, d))
    return Y, r


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=head_outputs())
def test_truncation_error_equals_dropped_eigenvalues(backend, case):
    """Theorem 4.1 per head and Corollary 4.2 over the batch of heads."""
    Y, r = case
    C = np.swapaxes(Y, -1, -2) @ Y
    res = lrmath.pca_truncate(to_backend(C, backend), r)
    assert same_library(res.basis, to_backend(C, backend))
    Q = np.asarray(to_np(res.basis))
    resid = Y - Y @ Q @ np.swapaxes(Q, -1, -2)
    per_head = np.sum(resid**2, axis=(-2, -1))
    scale = np.trace(C, axis1=-2, axis2=-1)  # total energy: the error's natural unit
    tol = tolerance(np.float64, n=C.shape[-1] * Y.shape[-2])
    np.testing.assert_allclose(per_head, to_np(res.dropped), rtol=0, atol=tol * float(scale.max()) + 1e-300)
    # Corollary 4.2: the multi-head error is the sum over heads.
    assert abs(per_head.sum() - float(to_np(res.dropped).sum())) <= tol * float(scale.sum()) + 1e-300


@given(case=head_outputs(max_heads=1), seed=seeds())
def test_no_rank_r_projection_does_better(case, seed):
    """Optimality: a random rank-r orthogonal projection never beats the PCA basis."""
    Y, r = case
    Y = Y[0]
    C = Y.T @ Y
    res = lrmath.pca_truncate(C, r)
    d = C.shape[0]
    P = random_orthogonal(np.random.default_rng(seed), d)[:, :r]
    err_random = np.sum((Y - Y @ P @ P.T) ** 2)
    assert float(res.dropped) <= err_random * (1 + tolerance(n=d)) + tolerance(n=d) * np.trace(C)


@given(C=spd_matrices(max_dim=16))
def test_dropped_energy_non_increasing_in_rank(C):
    d = C.shape[0]
    dropped = [float(lrmath.pca_truncate(C, r).dropped) for r in range(d + 1)]
    assert all(a >= b for a, b in zip(dropped, dropped[1:]))
    assert dropped[-1] == 0.0
    np.testing.assert_allclose(dropped[0], np.trace(C), rtol=tolerance(n=d))


@given(C=spd_matrices(max_dim=12, max_log10_cond=4.0, batch_shape=(3,)), data=st.data())
def test_numpy_and_torch_agree_on_subspace(C, data):
    """Backends agree on the subspace (projectors), not on eigenvector signs."""
    torch = pytest.importorskip("torch")
    d = C.shape[-1]
    s = np.linalg.eigvalsh(C)[:, ::-1]
    # compare only where the subspace is well defined: a gap after position r
    gaps = [r for r in range(1, d) if np.all(s[:, r - 1] > s[:, r] * (1 + 1e-3))]
    r = data.draw(st.sampled_from(gaps)) if gaps else d
    a = lrmath.pca_truncate(C, r)
    b = lrmath.pca_truncate(torch.from_numpy(C), r)
    assert isinstance(b.basis, torch.Tensor) and b.basis.dtype == torch.float64
    gap = np.min(s[:, r - 1] - (s[:, r] if r < d else 0.0)) / s.max()
    assert_subspaces_close(a.basis, b.basis, atol=tolerance(n=d, kappa=1.0 / gap))
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues.numpy(), rtol=0, atol=tolerance(n=d) * s.max())


def test_float32_input_is_decomposed_in_float64():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((50, 6)).astype(np.float32)
    res = lrmath.pca_truncate(Y.T @ Y, 2)
    assert res.basis.dtype == np.float64 and res.eigenvalues.dtype == np.float64


@pytest.mark.parametrize(
    "C, r, match",
    [
        (np.ones((3, 4)), 1, "square"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), 1, "symmetric"),
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), 1, "NaN"),
        (np.eye(3), 4, "outside"),
        (np.eye(3), -1, "outside"),
        (np.ones(3), 1, "at least 2"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(C, r, match):
    with pytest.raises(ValueError, match=match):
        lrmath.pca_truncate(C, r)


def test_input_is_not_mutated():
    C = np.array([[2.0, 1.0], [1.0, 2.0]])
    before = C.copy()
    lrmath.pca_truncate(C, 1)
    np.testing.assert_array_equal(C, before)


def to_np(x):
    from lrmath._backend import to_numpy

    return to_numpy(x)
