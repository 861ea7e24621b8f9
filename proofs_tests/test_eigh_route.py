"""The batched eigensolver behind ``pca_truncate``: a Jacobi answer is used only when it is backward stable.

Contract (``lrmath._eigh``): ``backward_error_ok`` accepts an LAPACK eigendecomposition and refuses
one whose residual, orthogonality or ordering is off by more than a rounding-level amount; a
batched Jacobi answer that fails it is replaced by one ``eigh`` per matrix; on CUDA, a batch of
heads larger than 32 x 32 takes CuPy's batched solver and the answer satisfies FLAT-LLM's
Theorem 4.1 (``dropped`` is the truncation error) like every other path.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath import _eigh
from lrmath.testing import random_orthogonal, seeds, spectra, tolerance
from proofs_tests.backends import BACKENDS, to_backend


@st.composite
def psd_batches(draw, min_d=1, max_d=24, max_heads=4):
    rng = np.random.default_rng(draw(seeds()))
    h, d = draw(st.integers(2, max_heads)), draw(st.integers(min_d, max_d))
    C = np.empty((h, d, d))
    for i in range(h):
        Q = random_orthogonal(rng, d)
        C[i] = (Q * draw(spectra(dim=d, max_log10_cond=8.0))) @ Q.T
    return (C + np.swapaxes(C, 1, 2)) / 2


@given(C=psd_batches())
def test_lapack_answers_pass_and_perturbed_ones_fail(C):
    w, V = np.linalg.eigh(C)
    assert _eigh.backward_error_ok(C, w, V)
    d = C.shape[-1]
    if np.any(np.diff(w, axis=-1) > 0):
        assert not _eigh.backward_error_ok(C, w[..., ::-1], V[..., ::-1])  # descending: refused
    # a rotation mixing two eigenvectors of far-apart eigenvalues leaves V orthogonal but not an eigenbasis
    if w[0, -1] - w[0, 0] > 1e-6 * np.linalg.norm(C[0]):
        c, s = np.cos(0.1), np.sin(0.1)
        bad = V.copy()
        bad[0, :, [0, -1]] = c * V[0, :, [0, -1]] + s * np.array([-1.0, 1.0])[:, None] * V[0, :, [-1, 0]]
        assert not _eigh.backward_error_ok(C, w, bad)
    skewed = V.copy()
    skewed[-1, :, 0] *= 1 + 1e-6  # not orthonormal
    assert not _eigh.backward_error_ok(C, w, skewed)


@given(C=psd_batches())
def test_a_refused_batched_answer_falls_back_to_one_eigh_per_matrix(C):
    w, V = np.linalg.eigh(C)
    garbage = (np.zeros_like(w), np.zeros_like(V))
    w2, V2 = _eigh._checked_or_loop(C, np, garbage)
    np.testing.assert_allclose(w2, w, rtol=0, atol=tolerance(np.float64, n=C.shape[-1]) * np.abs(w).max())
    assert _eigh.backward_error_ok(C, w2, V2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("torch-cuda", "cupy")])
@given(C=psd_batches(min_d=33, max_d=_eigh._JACOBI_MAX_DIM, max_heads=9), r_frac=st.floats(0, 1))
def test_gpu_head_batches_keep_theorem_4_1(backend, C, r_frac):
    """Theorem 4.1 on the Jacobi route: ``dropped`` equals ``||Y - Y Q Q^T||^2`` with ``C = Y^T Y``."""
    d = C.shape[-1]
    r = int(round(r_frac * d))
    w, V = np.linalg.eigh(C)
    Y = np.swapaxes(V * np.sqrt(np.clip(w, 0, None))[:, None, :], 1, 2)  # Y^T Y = C, d rows per head
    res = lrmath.pca_truncate(to_backend(C, backend), r)
    Q = lrmath._backend.to_numpy(res.basis)
    per_head = np.sum((Y - Y @ Q @ np.swapaxes(Q, 1, 2)) ** 2, axis=(1, 2))
    tol = tolerance(np.float64, n=d * d) * float(np.trace(C, axis1=1, axis2=2).max())
    np.testing.assert_allclose(per_head, lrmath._backend.to_numpy(res.dropped), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id == "torch-cuda"])
@pytest.mark.parametrize("heads,d", [(3, 64), (9, 64), (32, 128)])
def test_torch_cuda_borrows_cupys_batched_solver_and_it_passes(backend, heads, d):
    """The fast route is really taken on a lent GPU (not silently refused) for the benchmark's shapes."""
    pytest.importorskip("cupy")
    rng = np.random.default_rng(heads * d)
    Y = rng.standard_normal((heads, 4 * d, d)) * np.geomspace(1.0, 0.01, d)
    C = to_backend(np.swapaxes(Y, 1, 2) @ Y, backend)
    out = _eigh._borrow_cupy(C)
    assert out is not None
    assert _eigh.backward_error_ok(C, *out)
