"""Tucker-2 joint subspaces (LatentLLM joint QK): HOSVD + HOOI never increases the objective.

Statements proved here, for a stack ``G_i`` (h, d1, d2) and orthonormal-row ``A`` (r1, d1),
``B`` (r2, d2) with cores ``H_i = A G_i B^T``:

* the objective ``sum_i ||G_i - A^T H_i B||_F^2`` is non-increasing over HOOI sweeps, and the
  reported trace is the true residual of the returned factors;
* each sweep's last update is optimal for its block (Ky Fan): no orthonormal ``B'`` captures more
  energy with the returned ``A``;
* one head is Eckart-Young (error = tail of squared singular values), full ranks are exact;
* the factor form ``G_i = Wq_i^T Wk_i`` gives the same problem as the dense stack;
* with weights ``P P^T = C = X X^T`` the objective is the attention-map error
  ``sum_i ||X^T (G_i - Ghat_i) X||_F^2``, and ``A``, ``A_dual`` map back consistently.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import random_orthogonal, seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def head_stacks(draw, max_h=4, max_p=5, max_d=8):
    """Per-head factors Wq (h, p, d1), Wk (h, p, d2) with heads of different scales, and ranks."""
    rng = np.random.default_rng(draw(seeds()))
    h = draw(st.integers(1, max_h))
    p = draw(st.integers(1, max_p))
    d1 = draw(st.integers(1, max_d))
    d2 = draw(st.integers(1, max_d))
    spread = draw(st.floats(0.0, 2.0))
    scale = 10.0 ** rng.uniform(-spread, spread, size=h)
    Wq = rng.standard_normal((h, p, d1)) * scale[:, None, None]
    Wk = rng.standard_normal((h, p, d2))
    ranks = (draw(st.integers(0, d1)), draw(st.integers(0, d2)))
    return Wq, Wk, ranks


def dense(Wq, Wk):
    return np.swapaxes(Wq, -1, -2) @ Wk


def assert_orthonormal_rows(M, tol):
    M = to_numpy(M)
    np.testing.assert_allclose(M @ M.T, np.eye(M.shape[0]), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=head_stacks(), factored=st.booleans())
def test_objective_non_increasing_and_equal_to_residual(backend, case, factored):
    Wq, Wk, ranks = case
    G = dense(Wq, Wk)
    arg = to_backend((Wq, Wk), backend) if factored else to_backend(G, backend)
    res = lrmath.joint_subspaces(arg, ranks)
    assert same_library(res.A, arg[0] if factored else arg)
    A, B, H, trace = (to_numpy(x) for x in (res.A, res.B, res.H, res.objective))
    total = float(np.sum(G**2))
    tol = tolerance(n=G.size)
    assert trace.shape == (res.iterations + 1,)
    assert np.all(np.diff(trace) <= tol * total), trace
    assert_orthonormal_rows(A, tol)
    assert_orthonormal_rows(B, tol)
    # without weights the cores are the projections and the duals are the bases
    np.testing.assert_allclose(H, A @ G @ B.T, rtol=0, atol=tol * np.sqrt(total) + 1e-300)
    np.testing.assert_array_equal(to_numpy(res.A_dual), A)
    resid = float(np.sum((G - A.T @ H @ B) ** 2))
    assert abs(resid - trace[-1]) <= tol * total + 1e-300


@given(case=head_stacks(), seed=seeds())
def test_last_update_is_block_optimal(case, seed):
    """Ky Fan: given the returned A, no orthonormal B' captures more energy than B."""
    Wq, Wk, ranks = case
    G = dense(Wq, Wk)
    res = lrmath.joint_subspaces((Wq, Wk), ranks, max_iter=3)
    captured = float(np.sum(res.H**2))
    Bp = random_orthogonal(np.random.default_rng(seed), G.shape[-1])[: ranks[1]]
    rival = float(np.sum((res.A @ G @ Bp.T) ** 2))
    assert rival <= captured + tolerance(n=G.size) * float(np.sum(G**2))


@given(case=head_stacks(max_h=1))
def test_single_head_is_eckart_young(case):
    Wq, Wk, (r1, r2) = case
    G = dense(Wq, Wk)[0]
    sigma = np.linalg.svd(G, compute_uv=False)
    best = float(np.sum(sigma[min(r1, r2):] ** 2))
    res = lrmath.joint_subspaces(G[None], (r1, r2))
    total = float(np.sum(sigma**2))
    tol = tolerance(n=G.size)
    assert abs(float(res.objective[0]) - best) <= tol * total  # HOSVD is already optimal
    assert abs(float(res.objective[-1]) - best) <= tol * total


@given(case=head_stacks(), factored=st.booleans())
def test_full_ranks_are_exact(case, factored):
    Wq, Wk, _ = case
    G = dense(Wq, Wk)
    res = lrmath.joint_subspaces((Wq, Wk) if factored else G, (G.shape[1], G.shape[2]))
    tol = tolerance(n=G.size)
    assert float(res.objective[-1]) <= tol * float(np.sum(G**2))
    np.testing.assert_allclose(res.A.T @ res.H @ res.B, G, rtol=0, atol=tol * np.abs(G).max())


@given(case=head_stacks())
def test_factor_form_matches_dense_form(case):
    """Same HOSVD objective from the factors as from the d1 x d2 matrices (where it is well defined)."""
    Wq, Wk, (r1, r2) = case
    G = dense(Wq, Wk)
    a = lrmath.joint_subspaces(G, (r1, r2), max_iter=0)
    b = lrmath.joint_subspaces((Wq, Wk), (r1, r2), max_iter=0)
    total = float(np.sum(G**2))

    def gap(M, r):  # relative eigengap of the HOSVD matrix at r (infinite when r is 0 or full)
        w = np.linalg.eigvalsh(M)[::-1]
        if r in (0, len(w)) or w[0] <= 0:
            return 1.0
        return max(w[r - 1] - w[r], 0.0) / w[0]

    g = min(gap(np.einsum("hij,hkj->ik", G, G), r1), gap(np.einsum("hji,hjk->ik", G, G), r2))
    tol = tolerance(n=G.size, kappa=1.0 / max(g, 1e-300))
    assert abs(float(a.objective[0]) - float(b.objective[0])) <= tol * total
    for res in (a, b):
        resid = float(np.sum((G - res.A.T @ res.H @ res.B) ** 2))
        assert abs(resid - float(res.objective[0])) <= tolerance(n=G.size) * total


@st.composite
def weighted_cases(draw):
    """Head factors plus calibration inputs X1 (d1, N), X2 (d2, N) with outlier channels."""
    Wq, Wk, ranks = draw(head_stacks())
    rng = np.random.default_rng(draw(seeds()))
    d1, d2 = Wq.shape[-1], Wk.shape[-1]
    N = draw(st.integers(max(d1, d2) + 1, 40))
    X1 = rng.standard_normal((d1, N))
    X2 = rng.standard_normal((d2, N))
    if draw(st.booleans()):
        X1[rng.integers(d1)] *= 10.0 ** draw(st.floats(0.5, 2.0))
    method = draw(st.sampled_from(["sqrt", "cholesky", "eigh-array"]))
    return Wq, Wk, ranks, X1, X2, method


def weight_for(C, method, backend):
    if method == "eigh-array":  # a raw non-symmetric factor V diag(sqrt(lambda)) as an array
        w, V = np.linalg.eigh(C)
        return to_backend(V * np.sqrt(np.clip(w, 0.0, None)), backend)
    return lrmath.whiten(to_backend(C, backend), method=method)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=weighted_cases(), factored=st.booleans())
def test_weighted_objective_is_attention_map_error(backend, case, factored):
    Wq, Wk, ranks, X1, X2, method = case
    G = dense(Wq, Wk)
    P1 = weight_for(X1 @ X1.T, method, backend)
    P2 = weight_for(X2 @ X2.T, method, backend)
    arg = to_backend((Wq, Wk), backend) if factored else to_backend(G, backend)
    res = lrmath.joint_subspaces(arg, ranks, weights=(P1, P2))
    A, B, H, Ad, Bd, trace = (to_numpy(x) for x in res[:6])
    r1, r2 = ranks
    kappa = np.sqrt(np.linalg.cond(X1 @ X1.T) * np.linalg.cond(X2 @ X2.T))
    tol = tolerance(n=G.size + X1.size, kappa=kappa)
    weighted_total = float(np.sum((X1.T @ G @ X2) ** 2))
    assert np.all(np.diff(trace) <= tolerance(n=G.size) * weighted_total), trace
    assert_orthonormal_rows(A, tolerance(n=G.size))
    assert_orthonormal_rows(B, tolerance(n=G.size))
    np.testing.assert_allclose(A @ Ad.T, np.eye(r1), rtol=0, atol=tol)
    np.testing.assert_allclose(B @ Bd.T, np.eye(r2), rtol=0, atol=tol)
    # the cores come from the data through the duals: H_i = A_dual G_i B_dual^T
    scale = np.linalg.norm(Ad, 2) * np.linalg.norm(Bd, 2) * np.abs(G).max() if r1 * r2 else 1.0
    np.testing.assert_allclose(Ad @ G @ Bd.T, H, rtol=0, atol=tol * G.shape[1] * scale)
    attention_error = float(np.sum((X1.T @ (G - A.T @ H @ B) @ X2) ** 2))
    assert abs(attention_error - trace[-1]) <= tol * weighted_total + 1e-300


@given(case=head_stacks())
def test_identity_weights_change_nothing(case):
    Wq, Wk, ranks = case
    eye1, eye2 = np.eye(Wq.shape[-1]), np.eye(Wk.shape[-1])
    a = lrmath.joint_subspaces((Wq, Wk), ranks)
    b = lrmath.joint_subspaces((Wq, Wk), ranks, weights=(eye1, eye2))
    total = float(np.sum(dense(Wq, Wk) ** 2))
    np.testing.assert_allclose(a.objective, b.objective, rtol=0, atol=tolerance(n=Wq.size) * total)


def test_stops_on_captured_energy_without_cancellation():
    """A near-exact fit (residual ~1e-20 of the energy, below rounding of ||G||^2 - E): the sweep
    still stops promptly, because it watches the captured energy, not the noisy residual."""
    rng = np.random.default_rng(3)
    U, V = random_orthogonal(rng, 6)[:, :2], random_orthogonal(rng, 6)[:, :2]
    G = np.stack([U @ rng.standard_normal((2, 2)) @ V.T for _ in range(3)])
    G += 1e-10 * rng.standard_normal(G.shape)
    res = lrmath.joint_subspaces(G, 2, tol=1e-12)
    assert res.converged and res.iterations <= 3
    assert float(res.objective[-1]) <= tolerance(n=G.size) * float(np.sum(G**2))


def test_float32_and_torch_inputs_give_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    G = rng.standard_normal((2, 4, 3)).astype(np.float32)
    assert lrmath.joint_subspaces(G, 2).A.dtype == np.float64
    assert lrmath.joint_subspaces(torch.from_numpy(G), 2).H.dtype == torch.float64


@pytest.mark.parametrize(
    "G, ranks, kwargs, match",
    [
        (np.ones((3, 4)), 1, {}, "3-dimensional"),
        (np.ones((2, 3, 4)), (4, 1), {}, "ranks\\[0\\]"),
        (np.ones((2, 3, 4)), (1, 5), {}, "ranks\\[1\\]"),
        (np.ones((2, 3, 4)), 4, {}, "ranks"),
        (np.ones((2, 3, 4)), (1, 2, 3), {}, "ranks"),
        (np.full((2, 3, 4), np.nan), 1, {}, "G contains NaN"),
        ((np.ones((2, 1, 3)), np.ones((3, 1, 4))), 1, {}, "agree in"),
        ((np.ones((2, 1, 3)), np.ones((2, 1, 4)), np.ones(1)), 1, {}, "pair"),
        ((np.ones((2, 1, 3)), np.full((2, 1, 4), np.inf)), 1, {}, "G\\[1\\]"),
        (np.ones((2, 3, 4)), 1, {"weights": (np.eye(2), None)}, "weights\\[0\\]"),
        (np.ones((2, 3, 4)), 1, {"weights": (None, np.full((4, 4), np.nan))}, "weights\\[1\\]"),
        (np.ones((2, 3, 4)), 1, {"weights": (np.zeros((3, 3)), None)}, "singular"),
        (np.ones((2, 3, 4)), 1, {"weights": np.eye(3)}, "pair"),
        (np.ones((2, 3, 4)), 1, {"max_iter": -1}, "max_iter"),
        (np.ones((2, 3, 4)), 1, {"tol": -1.0}, "tol"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(G, ranks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrmath.joint_subspaces(G, ranks, **kwargs)


def test_whitener_rank_below_requested_rank_is_refused():
    X = np.random.default_rng(0).standard_normal((5, 2))
    w = lrmath.whiten(X @ X.T, method="sqrt")  # rank 2
    with pytest.raises(ValueError, match="ranks"):
        lrmath.joint_subspaces(np.ones((1, 5, 5)), 3, weights=(w, None))


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(1)
    Wq, Wk, P = rng.standard_normal((2, 2, 4)), rng.standard_normal((2, 2, 3)), rng.standard_normal((4, 4))
    before = [x.copy() for x in (Wq, Wk, P)]
    lrmath.joint_subspaces((Wq, Wk), (2, 2), weights=(P, None))
    lrmath.joint_subspaces(dense(Wq, Wk), (2, 2), weights=(P, None))
    for x, y in zip((Wq, Wk, P), before):
        np.testing.assert_array_equal(x, y)
