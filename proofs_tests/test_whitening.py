"""Whitening contract: ``S S^T = C + delta I`` for every method, relative damping, no crash on PSD ``C``.

Statements proved here (see docs/theorems/whitening.md):

* every method returns ``S`` with ``S S^T = C + delta I`` (``delta`` the absolute
  damping it records), on positive definite and on semidefinite, rank-deficient
  and all-zero ``C``; the factor has its method's structure;
* ``solve`` inverts ``apply`` on the range of ``S``: ``solve(apply(W)) = W P`` with
  ``P`` the projector onto ``range(C + delta I)``, and ``S S^+ S = S``;
* damping is relative: ``whiten(a C)`` is ``whiten(C)`` scaled by ``sqrt(a)``,
  with the same record and ``delta`` scaled by ``a``;
* Cholesky never crashes: it raises the damping along the documented schedule,
  then falls back to the eigen form, and the record says which;
* numpy and torch agree; float32 is factorised in float64; bad input raises a
  ValueError naming the argument; inputs are never mutated.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy as to_np
from lrmath.testing import psd_matrices, seeds, spd_matrices, tolerance
from lrmath.whitening import CHOLESKY_SCHEDULE, METHODS
from proofs_tests.backends import BACKENDS, same_library, to_backend


def covariances(max_dim=16):
    """Positive definite (condition up to 1e8) or rank-deficient / zero Gram matrices."""
    return st.one_of(spd_matrices(max_dim=max_dim), psd_matrices(max_dim=max_dim))


def methods():
    return st.sampled_from(METHODS)


def dampings():
    """No damping, or a relative damping clearly above the eigen-form cutoff."""
    return st.one_of(st.just(0.0), st.floats(-8.0, -1.0).map(lambda e: 10.0**e))


def check_record(w, C, method, damping):
    """The record is consistent with the documented schedule and fallback."""
    assert w.requested_method == method
    mean_diag = max(float(np.mean(np.diag(C))), 0.0)
    np.testing.assert_allclose(w.delta, w.damping * mean_diag, rtol=1e-14, atol=0)
    if method != "cholesky":
        assert (w.method, w.fallback, w.attempts, w.damping) == (method, None, 1, damping)
    elif w.fallback is None:
        assert (w.method, w.attempts, w.damping) == ("cholesky", 1, damping)
    elif w.fallback == "damping":
        tried = [a for a in CHOLESKY_SCHEDULE if a > damping]
        assert w.method == "cholesky" and w.damping in tried
        assert w.attempts == 2 + tried.index(w.damping)
    else:
        assert w.fallback == "eigh" and w.method == "eigh" and w.damping == damping
        assert w.attempts >= 2
    assert 0 <= w.rank <= C.shape[0]


def check_structure(w):
    S = to_np(w.factor)
    n = S.shape[0]
    if w.method == "cholesky":
        assert np.all(np.triu(S, 1) == 0) and np.all(np.diag(S) > 0)
        assert w.rank == n
    elif w.method == "sqrt":
        assert np.array_equal(S, S.T)
        assert np.min(np.linalg.eigvalsh(S), initial=0.0) >= -tolerance(n=n) * np.abs(S).max(initial=0.0)
    else:
        G = S.T @ S  # orthogonal columns: V diag(sqrt(lambda))
        off = G - np.diag(np.diag(G))
        assert np.abs(off).max(initial=0.0) <= tolerance(n=n) * np.abs(G).max(initial=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=covariances(), method=methods(), damping=dampings())
def test_factor_reproduces_damped_matrix(backend, C, method, damping):
    """S S^T = C + delta I for every method on SPD, PSD, rank-deficient and zero C."""
    Cb = to_backend(C, backend)
    w = lrmath.whiten(Cb, method=method, damping=damping)
    assert same_library(w.factor, Cb) and to_np(w.factor).dtype == np.float64
    check_record(w, C, method, damping)
    check_structure(w)
    S = to_np(w.factor)
    n = C.shape[0]
    target = C + w.delta * np.eye(n)
    lam_max = max(np.linalg.eigvalsh(target)[-1], 0.0)
    assert np.abs(S @ S.T - target).max() <= tolerance(n=n) * lam_max


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=covariances(max_dim=12), method=methods(), damping=dampings(), seed=seeds(), m=st.integers(1, 6))
def test_solve_inverts_apply_on_range(backend, C, method, damping, seed, m):
    """solve(apply(W)) = W P (P: projector onto range(C + delta I)) and S S^+ S = S."""
    W = np.random.default_rng(seed).standard_normal((m, C.shape[0]))
    w = lrmath.whiten(to_backend(C, backend), method=method, damping=damping)
    Wb = to_backend(W, backend)
    back = to_np(w.solve(w.apply(Wb)))
    n = C.shape[0]
    lam, V = np.linalg.eigh(C + w.delta * np.eye(n))
    lam, V = lam[::-1], V[:, ::-1]
    if w.method != "cholesky":
        # rank = the numerical rank: SPD spectra stop at 1e-8 lambda_max, PSD noise sits near eps
        assert w.rank == int(np.sum(lam > 1e-10 * max(lam[0], 0.0)))
    P = V[:, : w.rank] @ V[:, : w.rank].T
    s = np.linalg.svd(to_np(w.factor), compute_uv=False)[: w.rank]
    kappa = s[0] / s[-1] if w.rank else 1.0
    tol = tolerance(n=n, kappa=kappa)
    norm_W = np.linalg.norm(W)
    assert np.abs(back - W @ P).max() <= tol * norm_W
    again = to_np(w.apply(to_backend(back, backend)))
    assert np.abs(again - to_np(w.apply(Wb))).max() <= tol * norm_W * (s[0] if w.rank else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds(), m=st.integers(0, 7), n=st.integers(1, 9), lower=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), layout=st.sampled_from(["C", "F", "strided"]))
def test_triangular_product_is_the_plain_product(backend, seed, m, n, lower, dtype, layout):
    """``matmul_triangular(A, T)`` (BLAS ``trmm`` for numpy, behind ``Whitener.apply`` with a Cholesky
    factor) is ``A @ T`` for any layout of ``A``, to the rounding of an n-term dot product; inputs untouched."""
    from lrmath._backend import matmul_triangular

    rng = np.random.default_rng(seed)
    T = (np.tril if lower else np.triu)(rng.standard_normal((n, n))).astype(dtype)
    A = rng.standard_normal((m, 2 * n)).astype(dtype)
    A = {"C": A[:, :n].copy(), "F": np.asfortranarray(A[:, :n]), "strided": A[:, ::2]}[layout]
    A_b, T_b = to_backend(A, backend), to_backend(T, backend)
    got = matmul_triangular(A_b, T_b, lower=lower)
    assert same_library(got, A_b) and tuple(got.shape) == (m, n)
    bound = tolerance(dtype, n) * (np.abs(A) @ np.abs(T)) + np.finfo(dtype).tiny
    assert np.all(np.abs(to_np(got).astype(np.float64) - A.astype(np.float64) @ T.astype(np.float64)) <= bound)
    np.testing.assert_array_equal(to_np(A_b), A)


@given(C=covariances(max_dim=12), method=methods(), damping=dampings(), k=st.integers(-6, 6))
def test_damping_is_relative(C, method, damping, k):
    """whiten(4^k C) = 2^k whiten(C): same record, delta scaled by 4^k (exact power-of-two scaling)."""
    a = 4.0**k
    w1 = lrmath.whiten(C, method=method, damping=damping)
    w2 = lrmath.whiten(a * C, method=method, damping=damping)
    for name in ("method", "fallback", "attempts", "damping", "rank"):
        assert getattr(w1, name) == getattr(w2, name), name
    np.testing.assert_allclose(w2.delta, a * w1.delta, rtol=1e-15, atol=0)
    S1, S2 = w1.factor, w2.factor
    n = C.shape[0]
    scale = np.abs(S1).max(initial=0.0)
    if w1.method in ("cholesky", "sqrt"):  # unique factors
        assert np.abs(S2 - 2.0**k * S1).max(initial=0.0) <= tolerance(n=n) * 2.0**k * scale
    else:  # eigenvectors are defined up to sign / rotation: compare S S^T
        assert np.abs(S2 @ S2.T - a * (S1 @ S1.T)).max() <= tolerance(n=n) * a * scale**2


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=psd_matrices(max_dim=16), damping=dampings())
def test_cholesky_never_crashes_on_semidefinite(backend, C, damping):
    """Rank-deficient and all-zero C: Cholesky returns a finite factor and records the fallback."""
    w = lrmath.whiten(to_backend(C, backend), method="cholesky", damping=damping)
    S = to_np(w.factor)
    assert np.all(np.isfinite(S))
    check_record(w, C, "cholesky", damping)
    if not np.any(C):
        assert w.fallback == "eigh" and w.rank == 0 and not np.any(S)
        assert not np.any(to_np(w.solve(to_backend(np.ones((2, C.shape[0])), backend))))


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=spd_matrices(min_dim=2, max_dim=12), data=st.data())
def test_dead_channel_takes_the_first_damping_step(backend, C, data):
    """An exactly zero input channel makes Cholesky fail exactly; the first step, 1e-12, fixes it."""
    j = data.draw(st.integers(0, C.shape[0] - 1))
    C = C.copy()
    C[j, :] = 0.0
    C[:, j] = 0.0
    w = lrmath.whiten(to_backend(C, backend), method="cholesky")
    assert (w.method, w.fallback, w.attempts, w.damping) == ("cholesky", "damping", 2, CHOLESKY_SCHEDULE[0])


@pytest.mark.parametrize("method", ["sqrt", "eigh"])
def test_small_negative_eigenvalue_is_clipped_and_recorded(method):
    C = np.diag([2.0, -1e-3])  # within PSD_SLACK * mean(diag C): a float32 Gram can be this far off
    w = lrmath.whiten(C, method=method)
    assert (w.method, w.fallback, w.rank) == (method, None, 1)
    assert w.clipped == 1e-3
    np.testing.assert_allclose(w.factor @ w.factor.T, np.diag([2.0, 0.0]), rtol=0, atol=tolerance(n=2) * 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(C=covariances(max_dim=12), method=methods(), seed=seeds(), depth=st.floats(0.02, 100.0))
def test_matrix_not_psd_beyond_rounding_is_refused(backend, C, method, seed, depth):
    """``C - c v v^T`` with ``v^T (C - c v v^T) v`` below ``-2 PSD_SLACK mean(diag C)``: every method refuses.

    ``damped_cholesky`` refuses the same matrix (no damping up to ``PSD_SLACK`` makes it
    positive definite), so the two entry points agree on what is not a second moment.
    """
    n = C.shape[0]
    v = np.random.default_rng(seed).standard_normal(n)
    v /= np.linalg.norm(v)
    mean_diag = float(np.trace(C)) / n
    B = C - (v @ C @ v + depth * mean_diag + 1e-3) * np.outer(v, v)
    B = (B + B.T) / 2
    with pytest.raises(ValueError, match="not positive semidefinite"):
        lrmath.whiten(to_backend(B, backend), method=method)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        lrmath.damped_cholesky(to_backend(B, backend))


@given(C=spd_matrices(max_dim=12, max_log10_cond=6.0), method=methods(), damping=dampings())
def test_numpy_and_torch_agree(C, method, damping):
    torch = pytest.importorskip("torch")
    a = lrmath.whiten(C, method=method, damping=damping)
    b = lrmath.whiten(torch.from_numpy(C), method=method, damping=damping)
    assert isinstance(b.factor, torch.Tensor) and b.factor.dtype == torch.float64
    for name in ("method", "fallback", "attempts", "damping", "rank"):
        assert getattr(a, name) == getattr(b, name), name
    np.testing.assert_allclose(a.delta, b.delta, rtol=tolerance(n=C.shape[0]), atol=0)
    Sa, Sb = a.factor, b.factor.numpy()
    n = C.shape[0]
    lam_max = np.linalg.eigvalsh(C)[-1]
    assert np.abs(Sa @ Sa.T - Sb @ Sb.T).max() <= tolerance(n=n) * lam_max
    if method != "eigh":  # unique factors compare directly
        assert np.abs(Sa - Sb).max() <= tolerance(n=n, kappa=np.sqrt(np.linalg.cond(C))) * np.sqrt(lam_max)


@pytest.mark.parametrize("method", METHODS)
def test_float32_is_factorised_in_float64_with_a_float32_cutoff(method):
    X = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    C = X @ X.T  # rank 3, with float32 rounding noise in the null space
    w = lrmath.whiten(C, method=method)
    assert w.factor.dtype == np.float64
    if w.method != "cholesky":
        assert w.rank == 3
        assert w.cutoff == pytest.approx(10 * 6 * 2.0**-23 * np.linalg.eigvalsh(C.astype(np.float64))[-1], rel=1e-6)


def test_apply_and_solve_broadcast_over_leading_dimensions():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 20))
    W = rng.standard_normal((3, 2, 5))
    for method in METHODS:
        w = lrmath.whiten(X @ X.T, method=method)
        np.testing.assert_allclose(w.apply(W), W @ w.factor, rtol=0, atol=1e-12)
        np.testing.assert_allclose(w.solve(w.apply(W)), W, rtol=0, atol=1e-10)
        assert w.solve(np.zeros((0, 5))).shape == (0, 5)


@pytest.mark.parametrize(
    "C, kwargs, match",
    [
        (np.ones((3, 4)), {}, "square"),
        (np.ones(3), {}, "C must be 2-dimensional"),
        (np.ones((2, 3, 3)), {}, "C must be 2-dimensional"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), {}, "symmetric"),
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), {}, "C contains NaN"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), {}, "C contains NaN or Inf"),
        (np.eye(3), {"damping": -1e-3}, "damping"),
        (np.eye(3), {"damping": float("nan")}, "damping"),
        (np.eye(3), {"method": "qr"}, "method"),
        (np.zeros((0, 0)), {}, "C is empty"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(C, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrmath.whiten(C, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_bad_operands_of_apply_and_solve(method):
    w = lrmath.whiten(np.eye(3), method=method)
    with pytest.raises(ValueError, match="W must have 3 columns"):
        w.apply(np.ones((2, 4)))
    with pytest.raises(ValueError, match="Y must have 3 columns"):
        w.solve(np.ones((2, 2)))
    with pytest.raises(ValueError, match="W contains NaN"):
        w.apply(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="Y contains NaN or Inf"):
        w.solve(np.full((2, 3), np.inf))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy and torch"):
        w.apply(torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_not_mutated(backend, method):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4, 2))
    C = to_backend(X @ X.T, backend)  # rank deficient: exercises the fallbacks too
    W = to_backend(rng.standard_normal((3, 4)), backend)
    before_C, before_W = to_np(C).copy(), to_np(W).copy()
    w = lrmath.whiten(C, method=method, damping=1e-3)
    w.solve(w.apply(W))
    np.testing.assert_array_equal(to_np(C), before_C)
    np.testing.assert_array_equal(to_np(W), before_W)
