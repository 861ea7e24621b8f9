"""Junction matrices and block identity (LatentLLM, Sec. 3): same product, an exact identity block.

Statements proved here (see docs/theorems/block-identity.md):

* ``block_identity(left, right)`` leaves ``left @ right`` unchanged up to rounding
  of order ``r eps cond(J) ||left|| ||right||``, with ``J = right[:, columns]``;
* ``right2[:, columns]`` is exactly the identity, ``columns`` ascending and distinct;
* pivoting bounds every entry of ``right2`` by ``2^(r-1)``;
* storage ``r (m + n - r) = m n - (m - r)(n - r)``, below ``m n`` for ``r < min(m, n)``;
* applied to :func:`lrmath.whitened_svd` factors, the weighted error is unchanged;
* any invertible junction ``(left J, J^{-1} right)`` keeps the product;
* numpy and torch pick the same columns; bad input raises; inputs are not mutated.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy as to_np
from lrmath.junction import junction
from lrmath.testing import make_spectrum, random_orthogonal, seeds, tolerance, weight_statistic_pairs
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def factor_pairs(draw, max_m=16, max_n=16):
    """left (m, r) Gaussian with a drawn scale; right (r, n) = U diag(s) V^T with cond(right) up to 1e6."""
    rng = np.random.default_rng(draw(seeds()))
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    r = draw(st.integers(0, min(m, n)))
    s = make_spectrum(max(r, 1), draw(st.floats(0.0, 6.0)), draw(st.sampled_from(["geometric", "cliff", "flat"])),
                      10.0 ** draw(st.integers(-3, 3)))[:r]
    right = (random_orthogonal(rng, r) * s) @ random_orthogonal(rng, n)[:r]
    left = rng.standard_normal((m, r)) * 10.0 ** draw(st.integers(-3, 3))
    return left, right


def check_block_identity(left, right, left2, right2, columns):
    m, r = left.shape
    n = right.shape[1]
    assert left2.shape == (m, r) and right2.shape == (r, n) and columns.shape == (r,)
    assert np.all(np.diff(columns) > 0) and np.all((0 <= columns) & (columns < n))
    assert np.array_equal(right2[:, columns], np.eye(r))  # exact zeros and ones
    if r == 0:
        return
    J = right[:, columns]
    kappa = np.linalg.cond(J)
    bound = tolerance(n=r, kappa=kappa) * np.linalg.norm(left, 2) * np.linalg.norm(right, 2)
    assert np.abs(left2 @ right2 - left @ right).max() <= bound
    # pivoting: |R_ij| <= |R_ii| makes back substitution grow at most like 2^(r-1)
    assert np.abs(right2).max() <= 2.0 ** (r - 1) * (1 + tolerance(n=r, kappa=kappa))


@pytest.mark.parametrize("backend", BACKENDS)
@given(pair=factor_pairs())
def test_product_unchanged_with_exact_identity_block(backend, pair):
    left, right = pair
    lb, rb = to_backend(pair, backend)
    left2, right2, columns = lrmath.block_identity(lb, rb)
    assert same_library(left2, lb) and same_library(right2, lb) and same_library(columns, lb)
    assert to_np(left2).dtype == to_np(right2).dtype == np.float64
    check_block_identity(left, right, to_np(left2), to_np(right2), to_np(columns))


@given(m=st.integers(1, 4096), n=st.integers(1, 4096), data=st.data())
def test_storage_is_below_dense(m, n, data):
    """Stored entries: left2 plus the non-identity columns of right2."""
    r = data.draw(st.integers(0, min(m, n)))
    stored = m * r + r * (n - r)
    assert stored == r * (m + n - r) == m * n - (m - r) * (n - r)
    assert stored <= m * n and (stored < m * n or r == min(m, n))


@given(pair=factor_pairs(max_m=8, max_n=8))
def test_storage_of_returned_factors(pair):
    left2, right2, columns = lrmath.block_identity(*pair)
    r = columns.shape[0]
    rest = np.delete(right2, columns, axis=1)  # what must be stored of right2
    assert left2.size + rest.size == r * (left2.shape[0] + right2.shape[1] - r)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=weight_statistic_pairs(max_m=12, max_n=12, max_tokens=48), data=st.data())
def test_whitened_error_unchanged(backend, case, data):
    """On activation-aware SVD factors the data-weighted error stays the optimum."""
    W, X, C = case
    full = lrmath.whitened_svd(W, C, min(W.shape))
    sigma = full.singular_values
    ranks = [r for r in range(1, min(W.shape) + 1) if sigma[r - 1] > 1e-6 * sigma[0]]  # full row rank right
    r = data.draw(st.sampled_from(ranks)) if ranks else 0
    res = lrmath.whitened_svd(to_backend(W, backend), to_backend(C, backend), r)
    left2, right2, columns = lrmath.block_identity(res.left, res.right)
    L, R = to_np(res.left), to_np(res.right)
    check_block_identity(L, R, to_np(left2), to_np(right2), to_np(columns))
    err = np.sum(((W - to_np(left2) @ to_np(right2)) @ X) ** 2)
    scale = np.sum(W**2) * max(np.linalg.eigvalsh(C)[-1], 0.0)
    kappa = np.linalg.cond(R[:, to_np(columns)]) if r else 1.0
    assert abs(err - float(res.dropped)) <= tolerance(n=max(W.shape[1], X.shape[1]), kappa=kappa) * scale


@pytest.mark.parametrize("backend", BACKENDS)
@given(pair=factor_pairs(), seed=seeds(), log10_cond=st.floats(0.0, 6.0))
def test_any_invertible_junction_keeps_the_product(backend, pair, seed, log10_cond):
    left, right = pair
    r = left.shape[1]
    rng = np.random.default_rng(seed)
    J = np.zeros((0, 0))
    if r:
        J = (random_orthogonal(rng, r) * make_spectrum(r, log10_cond, "geometric")) @ random_orthogonal(rng, r)
    left2, right2 = junction(*to_backend((left, right, J), backend))
    if r == 0:
        assert to_np(left2).shape == left.shape and to_np(right2).shape == right.shape
        return
    np.testing.assert_allclose(to_np(left2), left @ J, rtol=0, atol=tolerance(n=r) * np.abs(left).max() * np.abs(J).max() * r)
    bound = tolerance(n=r, kappa=np.linalg.cond(J)) * np.linalg.norm(left, 2) * np.linalg.norm(right, 2)
    assert np.abs(to_np(left2) @ to_np(right2) - left @ right).max() <= bound


@given(pair=factor_pairs(max_m=10, max_n=10))
def test_numpy_and_torch_agree(pair):
    torch = pytest.importorskip("torch")
    a = lrmath.block_identity(*pair)
    b = lrmath.block_identity(*(torch.from_numpy(x) for x in pair))
    np.testing.assert_array_equal(a.columns, b.columns.numpy())  # same host decision
    left, right = pair
    r = left.shape[1]
    if r:
        kappa = np.linalg.cond(right[:, a.columns])
        bound = tolerance(n=r, kappa=kappa) * np.linalg.norm(left, 2) * np.linalg.norm(right, 2)
        assert np.abs(a.left @ a.right - b.left.numpy() @ b.right.numpy()).max() <= bound


@pytest.mark.parametrize(
    "left, right, match",
    [
        (np.ones((3, 2)), np.ones((2, 4)), "right does not have full row rank"),
        (np.ones((3, 2)), np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "full row rank"),
        (np.ones((3, 3)), np.ones((3, 2)), "more rows"),
        (np.ones((3, 2)), np.ones((3, 4)), "do not chain"),
        (np.ones(3), np.ones((1, 4)), "left must be 2-dimensional"),
        (np.ones((3, 1)), np.ones(4), "right must be 2-dimensional"),
        (np.full((3, 1), np.nan), np.ones((1, 4)), "left contains NaN"),
        (np.ones((3, 1)), np.full((1, 4), np.inf), "right contains NaN or Inf"),
    ],
)
def test_bad_input(left, right, match):
    with pytest.raises(ValueError, match=match):
        lrmath.block_identity(left, right)


def test_bad_junction():
    left, right = np.ones((3, 2)), np.eye(2, 4)
    with pytest.raises(ValueError, match="J must have shape"):
        junction(left, right, np.eye(3))
    with pytest.raises(ValueError, match="J is singular"):
        junction(left, right, np.zeros((2, 2)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy and torch"):
        lrmath.block_identity(left, torch.eye(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated(backend):
    rng = np.random.default_rng(4)
    left, right = to_backend((rng.standard_normal((5, 2)), rng.standard_normal((2, 6))), backend)
    before = to_np(left).copy(), to_np(right).copy()
    lrmath.block_identity(left, right)
    junction(left, right, to_backend(np.array([[2.0, 1.0], [0.0, 1.0]]), backend))
    np.testing.assert_array_equal(to_np(left), before[0])
    np.testing.assert_array_equal(to_np(right), before[1])
