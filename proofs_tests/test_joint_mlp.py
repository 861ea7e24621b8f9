"""LatentLLM joint up/down MLP compression: the surrogate L4 never increases (ReLU MLPs).

``L4 = alpha (||W_u X - Z||^2 + lam_u ||W_u||^2) + beta ||Z' - relu(Z)||^2
     + gamma (||W_d Z' - Y||^2 + lam_d ||W_d||^2)`` over rank-limited ``W_u``, ``W_d``.
Statements proved here:

* each block update is the exact minimiser over its block: the ReLU ``Z`` closed form (against a
  dense grid), the ridge ``Z'`` update (normal equations), the rank-limited ``W`` fits (no rival
  of the same rank does better);
* hence the reported ``L4`` trace is non-increasing, and it is the ``L4`` of the returned state;
* the first point is the per-matrix activation-aware SVD; full ranks without damping are exact.
"""

import lrmath.updown as updown

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend

from lrmath.updown import joint_mlp


@st.composite
def relu_mlps(draw, max_d=6, max_ff=10, max_tokens=30):
    """A ReLU MLP (W_up, W_down), inputs X (d, N) with an outlier channel at times, ranks, weights."""
    rng = np.random.default_rng(draw(seeds()))
    d = draw(st.integers(1, max_d))
    d_ff = draw(st.integers(1, max_ff))
    d_out = draw(st.integers(1, max_d))
    N = draw(st.integers(1, max_tokens))
    W_up = rng.standard_normal((d_ff, d)) / np.sqrt(d)
    W_down = rng.standard_normal((d_out, d_ff)) / np.sqrt(d_ff)
    X = rng.standard_normal((d, N)) * 10.0 ** draw(st.integers(-2, 2))
    if draw(st.booleans()):
        X[rng.integers(d)] *= 10.0 ** draw(st.floats(0.5, 2.0))
    ranks = (draw(st.integers(0, min(d_ff, d))), draw(st.integers(0, min(d_out, d_ff))))
    weights = tuple(draw(st.sampled_from([0.1, 1.0, 10.0])) for _ in range(3))
    damping = draw(st.sampled_from([0.0, 1e-3, 1e-1]))
    return W_up, W_down, X, ranks, weights, damping


def relu(A):
    return np.maximum(A, 0.0)


def surrogate(res, X, Y, weights):
    """L4 of the returned state, recomputed on the host from its definition."""
    alpha, beta, gamma = weights
    lam_u, lam_d = res.lam
    Wu = to_numpy(res.up_left) @ to_numpy(res.up_right)
    Wd = to_numpy(res.down_left) @ to_numpy(res.down_right)
    Z, Za = to_numpy(res.Z), to_numpy(res.Z_act)
    return (alpha * (np.sum((Wu @ X - Z) ** 2) + lam_u * np.sum(Wu**2))
            + beta * np.sum((Za - relu(Z)) ** 2)
            + gamma * (np.sum((Wd @ Za - Y) ** 2) + lam_d * np.sum(Wd**2)))


def energy_scale(W_up, W_down, X, weights):
    """The size of the numbers L4 is made of (its rounding unit)."""
    Z = W_up @ X
    return max(weights) * (np.sum(Z**2) + np.sum((W_down @ relu(Z)) ** 2) + np.sum(X**2)) + 1e-300


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=relu_mlps(), max_iter=st.integers(0, 8))
def test_surrogate_non_increasing_and_equal_to_returned_state(backend, case, max_iter):
    W_up, W_down, X, ranks, (alpha, beta, gamma), damping = case
    args = to_backend((W_up, W_down, X), backend)
    res = joint_mlp(*args, ranks, alpha=alpha, beta=beta, gamma=gamma, damping=damping,
                    max_iter=max_iter, tol=0.0)
    assert same_library(res.up_left, args[0])
    trace = to_numpy(res.objective)
    assert trace.shape == (res.iterations + 1,) and res.iterations <= max_iter
    scale = energy_scale(W_up, W_down, X, (alpha, beta, gamma))
    tol = tolerance(n=X.size + W_up.size, kappa=10.0)
    assert np.all(np.diff(trace) <= tol * scale), trace
    Y = W_down @ relu(W_up @ X)
    assert abs(surrogate(res, X, Y, (alpha, beta, gamma)) - trace[-1]) <= tol * scale
    Wu = to_numpy(res.up_left) @ to_numpy(res.up_right)
    Wd = to_numpy(res.down_left) @ to_numpy(res.down_right)
    assert np.linalg.matrix_rank(Wu, tol=1e-9 * max(np.abs(Wu).max(initial=0), 1e-300)) <= ranks[0]
    assert np.linalg.matrix_rank(Wd, tol=1e-9 * max(np.abs(Wd).max(initial=0), 1e-300)) <= ranks[1]
    out = float(np.sum((Wd @ relu(Wu @ X) - Y) ** 2))
    assert abs(out - float(to_numpy(res.output_error)[-1])) <= tol * scale


@given(case=relu_mlps(), max_iter=st.integers(0, 5), seed=seeds())
def test_weight_blocks_are_optimal_for_the_returned_auxiliaries(case, max_iter, seed):
    """The sweep ends with the W fits: given (Z, Z'), no rank-r rival or nearby factors do better."""
    W_up, W_down, X, ranks, weights, damping = case
    res = joint_mlp(W_up, W_down, X, ranks, damping=damping, max_iter=max_iter)
    Y = W_down @ relu(W_up @ X)
    lam_u, lam_d = res.lam
    rng = np.random.default_rng(seed)
    scale = energy_scale(W_up, W_down, X, (1.0, 1.0, 1.0))
    tol = tolerance(n=X.size + W_up.size, kappa=10.0) * scale
    blocks = [(res.up_left, res.up_right, X, res.Z, lam_u, ranks[0]),
              (res.down_left, res.down_right, res.Z_act, Y, lam_d, ranks[1])]
    for left, right, inputs, target, lam, r in blocks:
        def fit(W):
            return float(np.sum((W @ inputs - target) ** 2) + lam * np.sum(W**2))

        best = fit(left @ right)
        m, n = left.shape[0], right.shape[1]
        size = np.sqrt(np.sum(target**2) / max(np.sum(inputs**2), 1e-300))
        for step in (1e-4, 1e-2, 1.0):  # nearby rank-r factors
            L = left + step * size * rng.standard_normal(left.shape)
            R = right + step * rng.standard_normal(right.shape)
            assert fit(L @ R) >= best - tol
        rival = size * rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / max(np.sqrt(r * n), 1)
        assert fit(rival) >= best - tol


@given(seed=seeds(), shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       alpha=st.sampled_from([0.1, 1.0, 10.0]), beta=st.sampled_from([0.1, 1.0, 10.0]))
def test_relu_update_is_the_entrywise_minimiser(seed, shape, alpha, beta):
    """argmin_z alpha (z - a)^2 + beta (b - relu(z))^2, checked against a dense grid."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal(shape) * 3, rng.standard_normal(shape) * 3
    Z = updown._update_preactivation(A, B, alpha, beta, xp)

    def f(z):
        return alpha * (z - A[..., None]) ** 2 + beta * (B[..., None] - relu(z)) ** 2

    grid = np.concatenate([np.linspace(-15, 15, 3001), [0.0]])
    grid_best = f(grid).min(axis=-1)
    found = f(Z[..., None])[..., 0]
    assert np.all(found <= grid_best + 1e-12 * (1 + grid_best))
    # and it beats the notes' uncased formulas wherever those leave their half-line
    for candidate in (A, (alpha * A + beta * B) / (alpha + beta)):
        assert np.all(found <= f(candidate[..., None])[..., 0] + 1e-12)


@given(seed=seeds(), dims=st.tuples(st.integers(1, 5), st.integers(0, 5), st.integers(1, 8), st.integers(1, 6)),
       beta=st.sampled_from([0.1, 1.0, 10.0]), gamma=st.sampled_from([0.1, 1.0, 10.0]))
def test_activation_update_solves_the_ridge_normal_equations(seed, dims, beta, gamma):
    import array_api_compat.numpy as xp

    m, r, n, N = dims
    r = min(r, m, n)
    rng = np.random.default_rng(seed)
    L, R = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    target, Y = rng.standard_normal((n, N)), rng.standard_normal((m, N))
    Zp = updown._update_activation(target, (L, R), Y, beta, gamma, xp)
    W = L @ R
    system = beta * np.eye(n) + gamma * W.T @ W
    rhs = beta * target + gamma * W.T @ Y
    kappa = np.linalg.cond(system)
    np.testing.assert_allclose(system @ Zp, rhs, rtol=0,
                               atol=tolerance(n=n * m, kappa=kappa) * (np.abs(rhs).max() + np.abs(system).max()))


@given(case=relu_mlps())
def test_first_point_is_the_per_matrix_activation_aware_svd(case):
    """objective[0] = alpha * whitened-SVD error of W_up + gamma * that of W_down (no damping)."""
    W_up, W_down, X, ranks, (alpha, beta, gamma), _ = case
    res = joint_mlp(W_up, W_down, X, ranks, alpha=alpha, beta=beta, gamma=gamma, damping=0.0, max_iter=0)
    A = relu(W_up @ X)
    up = lrmath.whitened_svd(W_up, X @ X.T, ranks[0])
    down = lrmath.whitened_svd(W_down, A @ A.T, ranks[1])
    expected = alpha * float(up.dropped) + gamma * float(down.dropped)
    scale = energy_scale(W_up, W_down, X, (alpha, beta, gamma))
    assert abs(float(res.objective[0]) - expected) <= tolerance(n=X.size + W_up.size, kappa=10.0) * scale


@given(case=relu_mlps())
def test_full_ranks_without_damping_are_exact(case):
    W_up, W_down, X, _, weights, _ = case
    d_ff, d = W_up.shape
    full = (min(d_ff, d), min(W_down.shape[0], d_ff))
    res = joint_mlp(W_up, W_down, X, full, damping=0.0, max_iter=2)
    scale = energy_scale(W_up, W_down, X, (1.0, 1.0, 1.0))
    tol = tolerance(n=X.size + W_up.size, kappa=10.0) * scale
    assert float(res.objective[0]) <= tol and float(res.output_error[0]) <= tol


def test_joint_sweeps_improve_on_independent_svds():
    """On a ReLU MLP with a bottleneck, the surrogate falls well below its start."""
    rng = np.random.default_rng(0)
    W_up, W_down, X = rng.standard_normal((24, 8)), rng.standard_normal((8, 24)), rng.standard_normal((8, 200))
    res = joint_mlp(W_up, W_down, X, (4, 6), max_iter=30)
    assert res.objective[-1] < 0.5 * res.objective[0]
    assert np.all(np.diff(res.objective) <= 1e-9 * res.objective[0])


def test_float32_and_torch_inputs_give_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    W_up, W_down, X = (rng.standard_normal(s).astype(np.float32) for s in ((6, 4), (4, 6), (4, 20)))
    assert joint_mlp(W_up, W_down, X, 2, max_iter=1).up_left.dtype == np.float64
    res = joint_mlp(*(torch.from_numpy(a) for a in (W_up, W_down, X)), 2, max_iter=1)
    assert res.down_right.dtype == torch.float64 and res.objective.dtype == torch.float64


def test_package_attribute_is_callable_even_after_submodule_import():
    assert callable(lrmath.joint_mlp)
    rng = np.random.default_rng(2)
    res = lrmath.joint_mlp(rng.standard_normal((5, 3)), rng.standard_normal((3, 5)), rng.standard_normal((3, 9)), 1)
    assert res.up_left.shape == (5, 1)


_W, _D, _X = np.ones((6, 4)), np.ones((3, 6)), np.ones((4, 10))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones(4), _D, _X, 1), {}, "W_up must be 2-dimensional"),
        ((_W, np.ones((3, 5)), _X, 1), {}, "W_down"),
        ((_W, _D, np.ones((5, 10)), 1), {}, "X must have d = 4"),
        ((_W, _D, _X, 1), {"Y": np.ones((3, 9))}, "Y must have shape"),
        ((_W, _D, np.full((4, 10), np.nan), 1), {}, "X contains NaN"),
        ((_W, _D, _X, (5, 1)), {}, "ranks\\[0\\]"),
        ((_W, _D, _X, (1, 4)), {}, "ranks\\[1\\]"),
        ((_W, _D, _X, 5), {}, "ranks"),
        ((_W, _D, _X, 1), {"alpha": 0.0}, "alpha"),
        ((_W, _D, _X, 1), {"beta": -1.0}, "beta"),
        ((_W, _D, _X, 1), {"gamma": float("inf")}, "gamma"),
        ((_W, _D, _X, 1), {"damping": -1e-3}, "damping"),
        ((_W, _D, _X, 1), {"tol": -1.0}, "tol"),
        ((_W, _D, _X, 1), {"max_iter": -1}, "max_iter"),
        ((_W, _D, _X, 1), {"activation": "gelu"}, "activation"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        joint_mlp(*args, **kwargs)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s) for s in ((6, 4), (3, 6), (4, 12), (3, 12))]
    before = [a.copy() for a in arrays]
    joint_mlp(*arrays[:3], (2, 2), Y=arrays[3], max_iter=2)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
