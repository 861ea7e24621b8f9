"""Nystrom channel selection (FLAT-LLM appendix C): ridge leverage scores and the least-squares refit.

Statements proved here, for ``C = H H^T`` (d channels, N tokens), kept set ``S`` and
``R = C[:, S] (C[S, S] + lam I)^-1`` with ``lam = ridge * tr(C) / d``:

* ``R`` is the ridge least-squares optimum: ``(C[S, S] + lam I) R^T = C[S, :]`` and no other
  map ``M`` has a smaller ``||H - M H[S]||_F^2 + lam ||M||_F^2``; ``error`` and ``objective``
  are that residual and that objective;
* exactness: ``ridge = 0``, ``k = d`` gives ``R = I`` and zero error;
* along the nested top-k selections the objective (the Nystrom error at ``ridge = 0``) never
  increases, and ``||R||_F^2 <= d / ridge`` (no blow-up with few tokens);
* the scores are ``diag(C (C + lam I)^-1)``, in ``[0, 1]``, summing to the effective dimension;
* the relative ridge makes everything invariant to the scale of ``C``.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def channel_data(draw, *, full_rank=False, max_d=10, max_tokens=30):
    """Channel activations H (d, N) like an MLP's intermediate: outlier channels, maybe few tokens."""
    rng = np.random.default_rng(draw(seeds()))
    d = draw(st.integers(1, max_d))
    N = draw(st.integers(d + 2 if full_rank else 1, max_tokens + d))
    H = rng.standard_normal((d, N))
    if draw(st.booleans()):
        H[rng.choice(d, size=max(1, d // 4), replace=False)] *= 10.0 ** draw(st.floats(0.5, 2.0))
    H *= 10.0 ** draw(st.integers(-3, 3))
    return H


def ridge_objective(H, S, M, lam):
    return float(np.sum((H - M @ H[S]) ** 2) + lam * np.sum(M**2))


@pytest.mark.parametrize("backend", BACKENDS)
@given(H=channel_data(), data=st.data())
def test_map_is_the_ridge_least_squares_optimum(backend, H, data):
    d = H.shape[0]
    k = data.draw(st.integers(0, d))
    ridge = data.draw(st.sampled_from([1e-4, 1e-2, 1.0]))
    C = H @ H.T
    res = lrmath.nystrom_select(to_backend(C, backend), k, ridge=ridge)
    assert same_library(res.reconstruction, to_backend(C, backend))
    S, R = to_numpy(res.indices), to_numpy(res.reconstruction)
    lam, total = res.lam, float(np.trace(C))
    np.testing.assert_allclose(lam, ridge * total / d, rtol=1e-12)
    assert S.shape == (k,) and R.shape == (d, k) and np.all(np.diff(S) > 0)
    kappa = (np.linalg.eigvalsh(C)[-1] + lam) / lam
    tol = tolerance(n=d * H.shape[1], kappa=kappa)
    # normal equations (C_SS + lam I) R^T = C_S:
    normal = (C[np.ix_(S, S)] + lam * np.eye(k)) @ R.T - C[S]
    assert np.abs(normal).max(initial=0.0) <= tol * np.abs(C).max()
    # the reported residual and objective are those of the returned map
    J = ridge_objective(H, S, R, lam)
    assert abs(float(res.error) - float(np.sum((H - R @ H[S]) ** 2))) <= tol * total
    assert abs(float(res.objective) - J) <= tol * total
    # no perturbed map does better (strictly convex objective: R is its minimiser)
    E = np.random.default_rng(k).standard_normal(R.shape)
    for step in (1e-3, 1e-1, 1.0):
        M = R + step * E * np.sqrt(total / max(lam, 1e-300)) / max(np.sqrt(d * k), 1)
        assert ridge_objective(H, S, M, lam) >= J - tol * total


@given(H=channel_data(full_rank=True, max_d=8))
def test_exact_at_full_selection_without_ridge(H):
    C = H @ H.T
    d = C.shape[0]
    res = lrmath.nystrom_select(C, d, ridge=0.0)
    np.testing.assert_array_equal(res.indices, np.arange(d))
    tol = tolerance(n=d * H.shape[1], kappa=np.linalg.cond(C))
    np.testing.assert_allclose(res.reconstruction, np.eye(d), rtol=0, atol=tol)
    assert float(res.error) <= tol * np.trace(C)


@given(H=channel_data(max_d=8), ridge=st.sampled_from([0.0, 1e-3, 1e-2, 1.0]))
def test_nested_selection_objective_non_increasing(H, ridge):
    """Adding channels never hurts: J(S) >= J(S + {j}); at ridge 0 this is the Nystrom error."""
    C = H @ H.T
    d = C.shape[0]
    total = float(np.trace(C))
    previous, values = set(), []
    for k in range(d + 1):
        try:
            res = lrmath.nystrom_select(C, k, ridge=ridge)
        except ValueError:  # ridge 0 with a singular C[S, S]: only possible beyond rank(C)
            assert ridge == 0.0 and k > np.linalg.matrix_rank(C, tol=1e-8 * np.abs(C).max()) - 1
            break
        kept = set(to_numpy(res.indices).tolist())
        assert previous <= kept  # nested
        previous = kept
        values.append(float(res.objective))
        if ridge == 0.0:
            assert float(res.error) == float(res.objective)
        else:  # J(R) <= J(0) = tr C bounds the map: ||R||_F^2 <= d / ridge
            assert float(np.sum(res.reconstruction**2)) <= (d / ridge) * (1 + 1e-9)
    assert values[0] == total
    kappa = 1.0 if ridge else max(np.linalg.cond(C), 1.0)
    tol = tolerance(n=d * H.shape[1], kappa=min(kappa, 1e8))
    assert all(b <= a + tol * total for a, b in zip(values, values[1:])), values


@given(H=channel_data(), ridge=st.sampled_from([0.0, 1e-2, 1.0]), data=st.data())
def test_scores_are_ridge_leverage_scores(H, ridge, data):
    C = H @ H.T
    d = C.shape[0]
    # (the scores do not depend on k; at ridge 0 a k beyond rank(C) has no refit)
    res = lrmath.nystrom_select(C, data.draw(st.integers(0, d)) if ridge else 0, ridge=ridge)
    scores = np.asarray(res.scores)
    assert np.all(scores >= -1e-12) and np.all(scores <= 1 + 1e-12)
    mu = np.clip(np.linalg.eigvalsh(C), 0.0, None)
    if ridge > 0:
        lam = res.lam
        reference = np.diag(np.linalg.solve(C + lam * np.eye(d), C))  # C symmetric: diag is the same
        np.testing.assert_allclose(scores, reference, rtol=0, atol=tolerance(n=d, kappa=(mu[-1] + lam) / lam))
        effective_dimension = np.sum(mu / (mu + lam))
    else:
        effective_dimension = np.sum(mu > 10 * d * np.finfo(float).eps * mu[-1])
    np.testing.assert_allclose(scores.sum(), effective_dimension, rtol=tolerance(n=d), atol=1e-12)
    # the kept channels are the top-k scores
    kept = np.asarray(res.indices)
    if 0 < len(kept) < d:
        dropped = np.setdiff1d(np.arange(d), kept)
        assert scores[kept].min() >= scores[dropped].max()


@given(H=channel_data(), seed=seeds())
def test_equivariant_under_channel_permutation(H, seed):
    """Relabelling channels relabels scores; the kept set follows (ties aside)."""
    C = H @ H.T
    d = C.shape[0]
    perm = np.random.default_rng(seed).permutation(d)
    a = lrmath.nystrom_select(C, d // 2)
    b = lrmath.nystrom_select(C[np.ix_(perm, perm)], d // 2)
    np.testing.assert_allclose(b.scores, a.scores[perm], rtol=0, atol=tolerance(n=d))
    np.testing.assert_allclose(float(b.objective), float(a.objective), rtol=0,
                               atol=tolerance(n=d * H.shape[1], kappa=100.0) * np.trace(C))


@given(H=channel_data(), scale_exp=st.integers(-6, 6), data=st.data())
def test_relative_ridge_is_scale_invariant(H, scale_exp, data):
    """C and c C (more tokens, another normalisation) give the same selection and map."""
    C = H @ H.T
    d = C.shape[0]
    k = data.draw(st.integers(0, d))
    c = 10.0**scale_exp
    a = lrmath.nystrom_select(C, k)
    b = lrmath.nystrom_select(c * C, k)
    gaps = np.abs(np.subtract.outer(a.scores, a.scores))[~np.eye(d, dtype=bool)]
    if gaps.size == 0 or gaps.min() > 1e-9:  # no near-ties: the same channels
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(b.reconstruction, a.reconstruction, rtol=0,
                                   atol=tolerance(n=d, kappa=1 + d / 1e-2) * max(1.0, np.abs(a.reconstruction).max(initial=0.0)))
    np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=tolerance(n=d, kappa=1e2))
    np.testing.assert_allclose(b.lam, c * a.lam, rtol=1e-12)
    np.testing.assert_allclose(float(b.objective), c * float(a.objective), rtol=0,
                               atol=tolerance(n=d * H.shape[1], kappa=1e2) * c * np.trace(C))


def test_few_tokens_refit_stays_bounded_with_relative_ridge():
    """FLAT's failure mode: fewer tokens than channels. Undamped: refused; damped: bounded map."""
    rng = np.random.default_rng(0)
    H = rng.standard_normal((40, 12)) * np.where(rng.random(40) < 0.1, 300.0, 1.0)[:, None]
    C = H @ H.T
    with pytest.raises(ValueError, match="ridge"):
        lrmath.nystrom_select(C, 30, ridge=0.0)
    res = lrmath.nystrom_select(C, 30, ridge=1e-2)
    assert float(np.sum(res.reconstruction**2)) <= 40 / 1e-2
    assert float(res.error) <= 1e-2 * np.trace(C)


def test_float32_and_torch_inputs():
    torch = pytest.importorskip("torch")
    H = np.random.default_rng(1).standard_normal((5, 20)).astype(np.float32)
    assert lrmath.nystrom_select(H @ H.T, 2).reconstruction.dtype == np.float64
    res = lrmath.nystrom_select(torch.from_numpy(H @ H.T), 2)
    assert res.indices.dtype == torch.int64 and res.scores.dtype == torch.float64


@pytest.mark.parametrize(
    "C, k, ridge, match",
    [
        (np.ones((3, 4)), 1, 1e-2, "square"),
        (np.ones((2, 3, 3)), 1, 1e-2, "2-dimensional"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), 1, 1e-2, "symmetric"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), 1, 1e-2, "NaN"),
        (np.diag([1.0, -1.0]), 1, 1e-2, "positive semidefinite"),
        (np.eye(3), 4, 1e-2, "k = 4"),
        (np.eye(3), -1, 1e-2, "k = -1"),
        (np.eye(3), 1, -1.0, "ridge"),
        (np.eye(3), 1, float("nan"), "ridge"),
        (np.diag([1.0, 0.0, 0.0]), 2, 0.0, "ridge"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(C, k, ridge, match):
    with pytest.raises(ValueError, match=match):
        lrmath.nystrom_select(C, k, ridge=ridge)


def test_input_is_not_mutated():
    H = np.random.default_rng(2).standard_normal((4, 9))
    C = H @ H.T
    before = C.copy()
    lrmath.nystrom_select(C, 2)
    np.testing.assert_array_equal(C, before)


# --- output-aware elimination (method="obs") -------------------------------------------------


def weighted_objective(W, H, S, M, lam):
    """``||W H - M H[S]||^2 + lam ||M||^2``: the refit ``M`` of ``y = W h`` from the kept channels."""
    return float(np.sum((W @ H - M @ H[S]) ** 2) + lam * np.sum(M**2))


@st.composite
def layer_data(draw, max_d=9):
    H = draw(channel_data(max_d=max_d))
    rng = np.random.default_rng(draw(seeds()))
    W = rng.standard_normal((draw(st.integers(1, 6)), H.shape[0]))
    return H, W


@pytest.mark.parametrize("backend", BACKENDS)
@given(HW=layer_data(), data=st.data())
def test_weighted_error_is_the_refitted_layers_output_error(backend, HW, data):
    """``weighted_error = ||W (H - R H[S])||^2`` for both selection methods."""
    H, W = HW
    d = H.shape[0]
    k = data.draw(st.integers(0, d))
    method = data.draw(st.sampled_from(["leverage", "obs"]))
    C = H @ H.T
    res = lrmath.nystrom_select(to_backend(C, backend), k, ridge=1e-2, method=method, weight=to_backend(W, backend))
    S, R = to_numpy(res.indices), to_numpy(res.reconstruction)
    assert S.shape == (k,) and np.all(np.diff(S) > 0)
    direct = float(np.sum((W @ H - W @ R @ H[S]) ** 2))
    scale = float(np.sum((W @ H) ** 2)) + float(np.linalg.norm(W, 2) ** 2 * np.trace(C))
    kappa = 1 + d / 1e-2
    assert abs(float(res.weighted_error) - direct) <= tolerance(n=d * H.shape[1], kappa=kappa) * scale


@given(HW=layer_data(), ridge=st.sampled_from([1e-4, 1e-2, 1.0]))
def test_obs_removing_one_channel_is_optimal(HW, ridge):
    """With ``k = d - 1`` the eliminated channel is the best single removal (brute force)."""
    H, W = HW
    d = H.shape[0]
    C = H @ H.T
    res = lrmath.nystrom_select(C, d - 1, ridge=ridge, method="obs", weight=W)
    lam = res.lam
    objectives = []
    for j in range(d):
        S = np.delete(np.arange(d), j)
        M = W @ C[:, S] @ np.linalg.inv(C[np.ix_(S, S)] + lam * np.eye(d - 1))
        objectives.append(weighted_objective(W, H, S, M, lam))
    S = to_numpy(res.indices)
    ours = weighted_objective(W, H, S, W @ to_numpy(res.reconstruction), lam)
    kappa = (np.linalg.eigvalsh(C)[-1] + lam) / lam
    scale = float(np.sum((W @ H) ** 2)) + 1e-300
    assert ours <= min(objectives) + tolerance(n=d * H.shape[1], kappa=kappa) * scale


def test_obs_beats_leverage_on_outlier_channels_read_weakly():
    """Leverage ignores W: high-energy channels that W barely reads are kept; OBS drops them."""
    rng = np.random.default_rng(3)
    d, N = 40, 400
    H = rng.standard_normal((d, N))
    H[:8] *= 30.0  # outlier channels...
    W = rng.standard_normal((16, d))
    W[:, :8] *= 1e-3  # ...that the next layer hardly reads
    C = H @ H.T
    lev = lrmath.nystrom_select(C, 20, method="leverage", weight=W)
    obs = lrmath.nystrom_select(C, 20, method="obs", weight=W)
    assert np.all(np.asarray(lev.indices)[:8] == np.arange(8))  # leverage keeps all outliers
    assert np.all(np.asarray(obs.indices) >= 8)  # OBS keeps none
    assert float(obs.weighted_error) < 0.85 * float(lev.weighted_error)


def test_obs_full_set_and_bad_input():
    H = np.random.default_rng(2).standard_normal((6, 30))
    C, W = H @ H.T, np.ones((2, 6))
    full = lrmath.nystrom_select(C, 6, method="obs", weight=W)
    np.testing.assert_array_equal(full.indices, np.arange(6))
    with pytest.raises(ValueError, match="method"):
        lrmath.nystrom_select(C, 3, method="greedy")
    with pytest.raises(ValueError, match="ridge > 0"):
        lrmath.nystrom_select(C, 3, method="obs", ridge=0.0)
    with pytest.raises(ValueError, match="6 columns"):
        lrmath.nystrom_select(C, 3, method="obs", weight=np.ones((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        lrmath.nystrom_select(C, 3, method="obs", weight=np.full((2, 6), np.nan))


def test_psd_rtol_accepts_a_float32_accumulated_statistic():
    """A float32-accumulated Gram of fewer tokens than channels is PSD only to float32 rounding."""
    rng = np.random.default_rng(4)
    H = rng.standard_normal((64, 20)).astype(np.float32) * np.float32(30.0)
    C = (H @ H.T).astype(np.float64)
    C[np.diag_indices(64)] -= 1e-9 * np.abs(C).max()  # a rounding-size dent below zero
    with pytest.raises(ValueError, match="positive semidefinite"):
        lrmath.nystrom_select(C, 10)  # the float64 default refuses it
    res = lrmath.nystrom_select(C, 10, psd_rtol=10 * 64 * float(np.finfo(np.float32).eps))
    assert res.indices.shape == (10,)
    with pytest.raises(ValueError, match="psd_rtol"):
        lrmath.nystrom_select(C, 10, psd_rtol=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds(), d=st.integers(2, 12), factor=st.sampled_from([0.25, 4.0]),
       rtol=st.sampled_from([1e-12, 1e-6, 1e-3]), method=st.sampled_from(["obs", "leverage"]))
def test_psd_check_matches_the_eigenvalue_test(backend, seed, d, factor, rtol, method):
    """The PSD decision is the eigenvalue test's: smallest eigenvalue ``-factor * psd_rtol * mu_max``.

    ``"obs"`` settles it by a Cholesky factor of ``C + psd_rtol m I`` (``m <= mu_max``) and
    computes the spectrum only when that fails; ``"leverage"`` always has the spectrum.
    Either way, a dent a quarter of the rounding level is accepted and four times it refused.
    """
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    mu = np.sort(10.0 ** rng.uniform(-3, 3, d))[::-1]
    mu[-1] = -factor * rtol * mu[0]
    C = (Q * mu) @ Q.T
    C = (C + C.T) / 2
    Cb = to_backend(C, backend)
    if factor < 1:
        res = lrmath.nystrom_select(Cb, d // 2, method=method, psd_rtol=rtol)
        assert res.indices.shape == (d // 2,)
    else:
        with pytest.raises(ValueError, match="positive semidefinite"):
            lrmath.nystrom_select(Cb, d // 2, method=method, psd_rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(HW=layer_data(), data=st.data())
def test_obs_path_is_nested_and_its_objectives_are_the_refits(backend, HW, data):
    """``path``: every point is a kept set whose refit has exactly the recorded objective.

    For each recorded count ``c`` the kept set is everything but ``removed[: d - c]``;
    :func:`lrmath.nystrom_refit` on it gives the weighted ridge objective
    ``||W H - W R H[S]||^2 + lam ||W R||^2`` recorded on the path (so one elimination run
    prices every smaller ``k``), the objectives never decrease, and the last point is
    the returned selection.
    """
    H, W = HW
    d = H.shape[0]
    k = data.draw(st.integers(0, d))
    ridge = data.draw(st.sampled_from([1e-3, 1e-1]))
    C = H @ H.T
    Cb, Wb = to_backend(C, backend), to_backend(W, backend)
    res = lrmath.nystrom_select(Cb, k, ridge=ridge, method="obs", weight=Wb)
    path = res.path
    removed, counts, objective = (to_numpy(a) for a in path)
    assert same_library(path.objective, Cb)
    assert sorted(removed.tolist()) == sorted(set(range(d)) - set(to_numpy(res.indices).tolist()))
    assert counts[0] == d and counts[-1] == k and np.all(np.diff(counts) < 0)
    scale = float(np.sum((W @ H) ** 2)) + 1e-300
    tol = tolerance(n=d * H.shape[1], kappa=1 + d / ridge) * scale
    assert np.all(np.diff(objective) >= -tol)
    for c, obj in zip(counts, objective):
        kept = np.setdiff1d(np.arange(d), removed[: d - c])
        ref = lrmath.nystrom_refit(Cb, to_backend(kept, backend), ridge=ridge, weight=Wb)
        S, R = to_numpy(ref.indices), to_numpy(ref.reconstruction)
        np.testing.assert_array_equal(S, kept)
        assert abs(weighted_objective(W, H, S, W @ R, res.lam) - obj) <= tol
    final = lrmath.nystrom_refit(Cb, res.indices, ridge=ridge, weight=Wb)
    np.testing.assert_allclose(to_numpy(final.reconstruction), to_numpy(res.reconstruction), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(HW=layer_data(), data=st.data())
def test_fold_is_the_weight_times_the_refit(backend, HW, data):
    """``nystrom_fold(C, S, W) = W R`` with ``R`` of :func:`lrmath.nystrom_refit`, in any index order.

    It solves for the ``m`` rows of ``W`` instead of the ``d`` channels, so the two agree to
    the rounding of one ridge-conditioned solve (``kappa <= 1 + d / ridge``).
    """
    H, W = HW
    d = H.shape[0]
    k = data.draw(st.integers(0, d))
    ridge = data.draw(st.sampled_from([1e-3, 1e-1]))
    kept = data.draw(st.permutations(list(range(d))))[:k]
    C = H @ H.T
    Cb, Wb = to_backend(C, backend), to_backend(W, backend)
    folded = lrmath.nystrom_fold(Cb, to_backend(np.asarray(kept, dtype=np.int64), backend), Wb, ridge=ridge)
    assert same_library(folded, Cb) and tuple(folded.shape) == (W.shape[0], k)
    R = to_numpy(lrmath.nystrom_refit(Cb, to_backend(np.asarray(kept, dtype=np.int64), backend),
                                      ridge=ridge).reconstruction)
    tol = tolerance(n=d, kappa=1 + d / ridge) * (np.abs(W).sum(axis=1).max() * np.abs(R).max(initial=0.0) + 1e-300)
    np.testing.assert_allclose(to_numpy(folded), W @ R, rtol=0, atol=tol)


def test_fold_needs_a_weight_and_checks_it():
    C = np.eye(4)
    with pytest.raises(ValueError, match="weight is required"):
        lrmath.nystrom_fold(C, np.array([0, 1]), None)
    with pytest.raises(ValueError, match="columns"):
        lrmath.nystrom_fold(C, np.array([0, 1]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="distinct"):
        lrmath.nystrom_fold(C, np.array([1, 1]), np.ones((2, 4)))


def test_refit_and_leverage_path_contracts():
    H = np.random.default_rng(4).standard_normal((6, 30))
    C = H @ H.T
    assert lrmath.nystrom_select(C, 3).path is None  # leverage: nested by score, no path needed
    with pytest.raises(ValueError, match="distinct"):
        lrmath.nystrom_refit(C, np.array([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        lrmath.nystrom_refit(C, np.array([0, 6]))
    with pytest.raises(ValueError, match="integers"):
        lrmath.nystrom_refit(C, np.array([0.5]))
    with pytest.raises(ValueError, match="6 columns"):
        lrmath.nystrom_refit(C, np.array([0, 2]), weight=np.ones((2, 5)))
    empty = lrmath.nystrom_refit(C, np.zeros((0,), dtype=np.int64))
    assert empty.reconstruction.shape == (6, 0) and np.isclose(float(empty.objective), np.trace(C))


@given(HW=layer_data(), data=st.data())
def test_obs_path_alone_equals_the_selections_path(HW, data):
    H, W = HW
    d = H.shape[0]
    k = data.draw(st.integers(0, d))
    C = H @ H.T
    full = lrmath.nystrom_select(C, k, ridge=1e-2, method="obs", weight=W).path
    alone = lrmath.obs_path(C, k, ridge=1e-2, weight=W)
    for a, b in zip(full, alone):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    with pytest.raises(ValueError, match="ridge > 0"):
        lrmath.obs_path(C, k, ridge=0.0)


def test_a_ridge_below_the_rounding_of_a_singular_statistic_is_refused_by_name():
    """A positive ridge under the float32 rounding of a rank-2 Gram: RidgeTooSmallError (a ValueError), no map."""
    from lrmath.nystrom import RidgeTooSmallError

    X = np.random.default_rng(4).standard_normal((2, 40)).astype(np.float32)
    G = (X.T @ X).astype(np.float64)  # rank 2, float32 rounding: indefinite at the 1e-7 relative level
    G = (G + G.T) / 2
    with pytest.raises(RidgeTooSmallError, match="larger ridge"):
        lrmath.nystrom_select(G, 20, ridge=1e-14, psd_rtol=1e-5)
    assert issubclass(RidgeTooSmallError, ValueError)
    res = lrmath.nystrom_select(G, 20, ridge=1e-2, psd_rtol=1e-5)  # a ridge above the rounding factors
    assert np.all(np.isfinite(res.reconstruction))
