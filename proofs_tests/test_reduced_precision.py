"""Half-precision torch inputs (bfloat16, float16) are read exactly.

LLM weights and activations are stored in bfloat16, and numpy has no such dtype. Every core
entry point below reads a half-precision tensor as the float32 tensor of the same values (which
holds them exactly) and works in float64 from there, so its answer is the answer for those
float32 values, to float64 rounding. Before stop 24 the host-side checks (symmetry, pivots)
raised ``TypeError: Got unsupported ScalarType BFloat16``.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath.testing import seeds, spd_matrices, tolerance

torch = pytest.importorskip("torch")

HALF = [torch.bfloat16, torch.float16]


def _both(a, dtype):
    """``(half tensor, float32 tensor of the same values)``."""
    half = torch.as_tensor(a).to(dtype)
    return half, half.float()


def _np(x):
    return x.detach().cpu().double().numpy()


# condition <= 10 and n <= 8: rounding C to 8 bits of mantissa cannot make it indefinite
@pytest.mark.parametrize("dtype", HALF, ids=str)
@given(C=spd_matrices(max_dim=8, max_log10_cond=1.0), data=st.data())
def test_pca_and_whitened_svd_read_half_precision_exactly(dtype, C, data):
    n = C.shape[0]
    r = data.draw(st.integers(0, n))
    W = np.random.default_rng(data.draw(seeds())).standard_normal((data.draw(st.integers(1, 6)), n))
    Ch, Cf = _both(C, dtype)
    Wh, Wf = _both(W, dtype)
    tol = tolerance(n=n) * float(np.abs(_np(Cf)).max())

    ph, pf = lrmath.pca_truncate(Ch, r), lrmath.pca_truncate(Cf, r)
    assert ph.basis.dtype == torch.float64
    np.testing.assert_allclose(float(ph.dropped), float(pf.dropped), rtol=0, atol=tol)
    Ph, Pf = _np(ph.basis) @ _np(ph.basis).T, _np(pf.basis) @ _np(pf.basis).T
    lam = np.sort(np.linalg.eigvalsh(_np(Cf)))[::-1]
    # Davis-Kahan: with an eigengap above 1e-8 max|C| the float64 rounding moves the subspace by < 1e-6
    if 0 < r < n and lam[r - 1] - lam[r] > 1e-8 * float(np.abs(_np(Cf)).max()):
        np.testing.assert_allclose(Ph, Pf, rtol=0, atol=1e-6)

    k = min(r, W.shape[0])
    sh = lrmath.whitened_svd(Wh, Ch, k, whitening="cholesky")
    sf = lrmath.whitened_svd(Wf, Cf, k, whitening="cholesky")
    scale = float(np.abs(_np(Wf)).max()) ** 2 * tol
    np.testing.assert_allclose(float(sh.dropped), float(sf.dropped), rtol=1e-9, atol=scale)
    np.testing.assert_allclose(_np(sh.left) @ _np(sh.right), _np(sf.left) @ _np(sf.right), rtol=0,
                               atol=1e-9 * max(1.0, float(np.abs(_np(Wf)).max())))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@given(seed=seeds(), n=st.integers(2, 60), p=st.integers(1, 8))
def test_statistics_read_half_precision_exactly(dtype, seed, n, p):
    X = np.random.default_rng(seed).standard_normal((n, p))
    Xh, Xf = _both(X, dtype)
    for estimator in (lrmath.ledoit_wolf, lrmath.oas):
        rh, rf = estimator(Xh), estimator(Xf)
        np.testing.assert_allclose(_np(rh.covariance), _np(rf.covariance), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(rh.shrinkage), float(rf.shrinkage), rtol=1e-9, atol=1e-12)
    mh, mf = lrmath.Moments(p), lrmath.Moments(p)
    mh.update(Xh)
    mf.update(Xf)
    np.testing.assert_allclose(_np(lrmath.ledoit_wolf(mh).covariance), _np(lrmath.ledoit_wolf(mf).covariance),
                               rtol=1e-12, atol=1e-12)
    G = Xf.double().T @ Xf.double()
    G = G + torch.trace(G) / p * torch.eye(p, dtype=G.dtype)  # rounding to 8 bits keeps it definite
    Gh = G.to(dtype)
    np.testing.assert_array_equal(_np(lrmath.damped_cholesky(Gh).factor),
                                  _np(lrmath.damped_cholesky(Gh.float()).factor))
