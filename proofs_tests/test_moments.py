"""Contract of ``lrmath.Moments``: streaming = single pass, stable under a large mean, exact persistence.

Statement: for any split of the rows of ``X`` into batches, fed by ``update`` in any order or
accumulated separately and combined by ``merge`` in any order, ``count``, ``mean``,
``covariance()`` and the centred third/fourth sums equal the two-pass float64 values of ``X``
within ``tolerance(float64, n, kappa = 1 + mean/spread)``, also when ``X`` arrives in float32
with a mean up to 1000 times its spread (Chan, Golub & LeVeque 1979); so do the per-feature
third and fourth sums (entrywise powers). Per-head batches
equal separate accumulators; ``to_dict`` / ``from_dict`` round trips are exact.
"""

import io

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import samples, seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend


@st.composite
def split_samples(draw, max_n=120, max_p=12):
    """Samples with a large mean shift, cut into up to 6 batches (some may be empty) and an order."""
    X, shift, _ = draw(samples(min_n=1, max_n=max_n, max_p=max_p))
    rng = np.random.default_rng(draw(seeds()))
    k = draw(st.integers(1, 6))
    cuts = np.sort(rng.integers(0, X.shape[0] + 1, size=k - 1))
    parts = np.split(X, cuts)
    return X, shift, parts, rng.permutation(len(parts))


def reference(X):
    """Two-pass float64 statistics: mean, centred M2, M3 = sum |y|^2 y, M4 = sum |y|^4."""
    mean = X.mean(axis=0)
    Y = X - mean
    r2 = np.sum(Y * Y, axis=1)
    return mean, Y.T @ Y, r2 @ Y, float(np.sum(r2 * r2))


def check_per_feature(sums, Z, tol):
    """The entrywise sums ``sum z**3`` and ``sum z**4`` of rows ``Z``, each feature to its own scale."""
    A = np.abs(Z)
    for got, power in ((sums.third_diag, 3), (sums.fourth_diag, 4)):
        error = np.abs(to_numpy(got) - np.sum(Z**power, axis=0))
        bound = tol * np.sum(A**power, axis=0) + 1e-300
        assert np.all(error <= bound), (power, error, bound)


def check_against_reference(acc, X, shift):
    n = X.shape[0]
    mean, M2, M3, M4 = reference(X)
    tol = tolerance(np.float64, n=n, kappa=1.0 + shift)
    r = np.sqrt(np.sum((X - mean) ** 2, axis=1))
    assert acc.count == n
    np.testing.assert_allclose(to_numpy(acc.mean), mean, rtol=0, atol=tol * np.abs(X).max())
    sums = acc.sums()
    np.testing.assert_allclose(to_numpy(acc.covariance()), M2 / n, rtol=0,
                               atol=tol * np.sum(r**2) / n + 1e-300)
    np.testing.assert_allclose(to_numpy(sums.third), M3, rtol=0, atol=tol * np.sum(r**3) + 1e-300)
    assert abs(float(sums.fourth) - M4) <= tol * M4 + 1e-300
    np.testing.assert_array_equal(to_numpy(sums.first), 0.0)
    check_per_feature(sums, X - mean, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples())
def test_merge_and_update_equal_single_pass_in_any_order(backend, case):
    """Sequential updates and a merge of per-batch accumulators, each in a drawn order."""
    X, shift, parts, order = case
    p = X.shape[1]
    sequential = lrmath.Moments(p, per_feature=True)
    for i in order:
        sequential.update(to_backend(parts[i], backend))
    pieces = [lrmath.Moments(p, per_feature=True).update(to_backend(part, backend)) for part in parts]
    merged = lrmath.Moments(p, per_feature=True)
    for i in order[::-1]:
        merged.merge(pieces[i])
    for acc in (sequential, merged):
        assert same_library(acc.covariance(), to_backend(X, backend))
        check_against_reference(acc, X, shift)
    # merging is commutative and leaves the other operand untouched
    a, b = pieces[0].copy(), pieces[-1].copy()
    before = b.to_dict()
    ab, ba = a.copy().merge(b), b.copy().merge(a)
    after = b.to_dict()
    for key in ("mean", "m2", "m3", "m4", "d3", "d4"):
        np.testing.assert_array_equal(before[key], after[key])
        scale = np.abs(ab.to_dict()[key]).max() + 1e-300
        np.testing.assert_allclose(ab.to_dict()[key], ba.to_dict()[key], rtol=0,
                                   atol=tolerance(n=X.shape[0], kappa=1 + shift) * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples(), chunk=st.integers(1, 9))
def test_long_host_batches_centred_in_chunks_equal_single_pass(backend, case, chunk):
    """A batch longer than two host chunks is centred and summed chunk by chunk: same sums.

    (The chunk is shrunk from its 4096 rows so that the drawn batches exercise it.)
    """
    from unittest import mock

    from lrmath import _power_sums

    X, shift, parts, order = case
    with mock.patch.object(_power_sums, "_HOST_CHUNK", chunk):
        acc = lrmath.Moments(X.shape[1], per_feature=True)
        for i in order:
            acc.update(to_backend(parts[i], backend))
    check_against_reference(acc, np.concatenate([parts[i] for i in order]), shift)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples())
def test_float32_stream_with_large_mean_matches_float64_two_pass(backend, case):
    """float32 batches are accumulated in float64: no float32 rounding of the sums shows up."""
    X, shift, parts, order = case
    X32 = [part.astype(np.float32) for part in parts]
    acc = lrmath.Moments(X.shape[1], per_feature=True)
    for i in order:
        acc.update(to_backend(X32[i], backend))
    assert str(acc.covariance().dtype).endswith("float64")
    exact = np.concatenate([X32[i] for i in order]).astype(np.float64)
    check_against_reference(acc, exact, shift)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples())
def test_float32_gram_of_centred_batches_keeps_float32_accuracy_despite_large_mean(backend, case):
    """gram_dtype=float32 rounds only each batch's centred product: the covariance error is
    float32 rounding of the spread (n * eps32), whatever the mean; mean and merges stay exact."""
    X, shift, parts, order = case
    acc = lrmath.Moments(X.shape[1])
    gram_dtype = __import__("torch").float32 if backend.startswith("torch") else np.float32  # cupy: numpy dtypes
    for i in order:
        acc.update(to_backend(parts[i], backend), gram_dtype=gram_dtype)
    mean, M2, _, _ = reference(X)
    n = X.shape[0]
    # the error scale is the spread (trace of the covariance), not the mean
    spread = np.trace(M2) / n
    tol32 = tolerance(np.float32, n=n)
    np.testing.assert_allclose(to_numpy(acc.covariance()), M2 / n, rtol=0, atol=tol32 * spread + 1e-300)
    np.testing.assert_allclose(to_numpy(acc.mean), mean, rtol=0,
                               atol=tolerance(np.float64, n=n, kappa=1 + shift) * np.abs(X).max())


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples())
def test_float32_batches_with_float32_gram_keep_float32_accuracy_and_an_exact_mean(backend, case):
    """float32 rows with gram_dtype=float32 are centred and summed in float32, no float64 copy.

    The mean is still the float64 mean of the float32 values; the covariance and the third
    and fourth sums carry float32 rounding of the spread (not of the mean), whatever the shift.
    """
    X, shift, parts, order = case
    X32 = [part.astype(np.float32) for part in parts]
    acc = lrmath.Moments(X.shape[1], per_feature=True)
    low = __import__("torch").float32 if backend.startswith("torch") else np.float32  # cupy: numpy dtypes
    for i in order:
        acc.update(to_backend(X32[i], backend), gram_dtype=low)
    exact = np.concatenate([X32[i] for i in order]).astype(np.float64)
    n = exact.shape[0]
    mean, M2, M3, M4 = reference(exact)
    r = np.sqrt(np.sum((exact - mean) ** 2, axis=1))
    np.testing.assert_allclose(to_numpy(acc.mean), mean, rtol=0,
                               atol=tolerance(np.float64, n=n, kappa=1 + shift) * np.abs(exact).max())
    tol32 = tolerance(np.float32, n=n)
    sums = acc.sums()
    np.testing.assert_allclose(to_numpy(acc.covariance()), M2 / n, rtol=0, atol=tol32 * np.sum(r**2) / n + 1e-300)
    np.testing.assert_allclose(to_numpy(sums.third), M3, rtol=0, atol=tol32 * np.sum(r**3) + 1e-300)
    assert abs(float(sums.fourth) - M4) <= tol32 * M4 + 1e-300
    check_per_feature(sums, exact - mean, tol32)


@given(case=split_samples(max_n=40, max_p=6), batch_shape=st.sampled_from([(1,), (3,), (2, 2)]))
def test_batch_shape_gives_independent_streams(case, batch_shape):
    """Per-head statistics: a batched accumulator equals one accumulator per head."""
    X, shift, parts, _ = case
    rng = np.random.default_rng(len(parts))
    heads = int(np.prod(batch_shape))
    scales = rng.uniform(0.5, 2.0, size=heads)
    batched = lrmath.Moments(X.shape[1], batch_shape=batch_shape)
    single = [lrmath.Moments(X.shape[1]) for _ in range(heads)]
    for part in parts:
        stacked = np.stack([part * s + h for h, s in enumerate(scales)])
        batched.update(stacked.reshape(batch_shape + part.shape))
        for h in range(heads):
            single[h].update(stacked[h])
    cov = batched.covariance().reshape((heads,) + (X.shape[1],) * 2)
    m4 = batched.sums().fourth.reshape(heads)
    for h in range(heads):
        tol = tolerance(n=X.shape[0], kappa=1 + shift + heads)
        ref = single[h].covariance()
        np.testing.assert_allclose(cov[h], ref, rtol=0, atol=tol * np.abs(ref).max() + 1e-300)
        assert abs(m4[h] - float(single[h].sums().fourth)) <= tol * float(single[h].sums().fourth) + 1e-300


@given(case=split_samples(max_n=40, max_p=6))
def test_to_dict_from_dict_round_trip_is_exact(case):
    """Save with np.savez, load, rebuild: bit-identical, and later updates stay bit-identical."""
    X, _, parts, order = case
    acc = lrmath.Moments(X.shape[1])
    for i in order[:-1]:
        acc.update(parts[i])
    buf = io.BytesIO()
    np.savez(buf, **acc.to_dict())
    buf.seek(0)
    with np.load(buf) as loaded:
        back = lrmath.Moments.from_dict(dict(loaded))
    for acc_ in (acc, back):
        acc_.update(parts[order[-1]])
    a, b = acc.to_dict(), back.to_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@given(case=split_samples(max_n=60, max_p=8), seed=seeds())
def test_sums_about_any_point_match_direct_sums(case, seed):
    """``sums(about=c)`` and ``gram`` equal the sums of ``x - c`` computed directly (origin included)."""
    X, shift, parts, _ = case
    acc = lrmath.Moments(X.shape[1], per_feature=True)
    for part in parts:
        acc.update(part)
    c = X.mean(axis=0) + np.random.default_rng(seed).standard_normal(X.shape[1]) * X.std()
    for about, point in (("origin", 0.0 * c), (c, c)):
        Z = X - point
        r2 = np.sum(Z * Z, axis=1)
        got = acc.sums(about=about)
        tol = tolerance(n=X.shape[0], kappa=1 + shift)
        scale = np.sum(r2)
        np.testing.assert_allclose(got.first, Z.sum(axis=0), rtol=0, atol=tol * np.sum(np.sqrt(r2)) + 1e-300)
        np.testing.assert_allclose(got.second, Z.T @ Z, rtol=0, atol=tol * scale + 1e-300)
        np.testing.assert_allclose(got.third, r2 @ Z, rtol=0, atol=tol * np.sum(r2**1.5) + 1e-300)
        assert abs(float(got.fourth) - np.sum(r2 * r2)) <= tol * np.sum(r2 * r2) + 1e-300
        check_per_feature(got, Z, tol)
    np.testing.assert_allclose(acc.gram, X.T @ X, rtol=0, atol=tol * np.sum(X * X) + 1e-300)
    np.testing.assert_allclose(acc.second_moment(), X.T @ X / X.shape[0], rtol=0,
                               atol=tol * np.sum(X * X) / X.shape[0] + 1e-300)


def test_naive_uncentred_formula_fails_where_moments_do_not():
    """Explanation, not a property: E[xx^T] - m m^T cancels catastrophically at a large mean."""
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((2000, 4)) @ np.diag([1.0, 0.5, 0.1, 0.01])
    for shift, dtype, min_error in ((1e3, np.float32, 1e-2), (1e6, np.float64, 1e-4)):
        X = (spread + shift).astype(dtype)
        ref = np.cov(X.astype(np.float64).T, bias=True)
        naive = (X.T @ X) / len(X) - np.outer(X.mean(0), X.mean(0))  # in the input dtype
        acc = lrmath.Moments(4)
        for part in np.array_split(X, 9):
            acc.update(part)
        error = np.abs(naive - ref).max() / np.abs(ref).max()
        ours = np.abs(acc.covariance() - ref).max() / np.abs(ref).max()
        assert error > min_error, error  # naive: no correct digit in the small directions
        assert ours <= tolerance(np.float64, n=len(X), kappa=1 + shift), ours


def test_torch_accumulator_on_numpy_update_raises_type_error():
    torch = pytest.importorskip("torch")
    acc = lrmath.Moments(3, device=torch.device("cpu")).update(torch.zeros((2, 3), dtype=torch.float32))
    assert acc.covariance().dtype == torch.float64 and acc.covariance().device.type == "cpu"
    with pytest.raises(TypeError, match="numpy and torch"):
        acc.update(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="numpy and torch"):
        acc.merge(lrmath.Moments(3).update(np.zeros((2, 3))))


def test_from_dict_like_places_statistics_on_that_library():
    torch = pytest.importorskip("torch")
    X = np.random.default_rng(1).standard_normal((30, 3)) + 50.0
    state = lrmath.Moments(3).update(X[:10]).to_dict()
    import safetensors.numpy as stn

    loaded = stn.load(stn.save({k: np.asarray(v) for k, v in state.items()}))
    moved = lrmath.Moments.from_dict(loaded, like=torch.zeros(1))
    moved.merge(lrmath.Moments(3).update(torch.from_numpy(X[10:])))
    assert isinstance(moved.covariance(), torch.Tensor)
    np.testing.assert_allclose(moved.covariance().numpy(), np.cov(X.T, bias=True), rtol=1e-12, atol=0)


def test_empty_updates_are_no_ops_and_empty_statistics_raise():
    acc = lrmath.Moments(2, batch_shape=(3,))
    acc.update(np.zeros((3, 0, 2)))
    assert acc.count == 0
    np.testing.assert_array_equal(acc.gram, np.zeros((3, 2, 2)))
    for what in (lambda: acc.covariance(), lambda: acc.mean, lambda: acc.second_moment()):
        with pytest.raises(ValueError, match="count is 0"):
            what()
    with pytest.raises(ValueError, match="no data"):
        lrmath.Moments(2).gram
    acc.merge(lrmath.Moments(2, batch_shape=(3,)))
    assert acc.count == 0


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((4, 3)), "shape"),
        (np.zeros((2, 4, 2)), "shape"),
        (np.zeros(2), "at least 2"),
        (np.array([[np.nan, 0.0]]), "NaN"),
        (np.array([[np.inf, 0.0]]), "NaN"),
    ],
)
def test_bad_update_raises_value_error_naming_x(x, match):
    with pytest.raises(ValueError, match=match) as info:
        lrmath.Moments(2).update(x)
    assert "x" in str(info.value)


def test_bad_construction_and_state_raise():
    with pytest.raises(ValueError, match="dim"):
        lrmath.Moments(0)
    with pytest.raises(ValueError, match="batch_shape"):
        lrmath.Moments(2, batch_shape=(-1,))
    state = lrmath.Moments(2).update(np.ones((3, 2))).to_dict()
    with pytest.raises(ValueError, match="format_version"):
        lrmath.Moments.from_dict({**state, "format_version": 99})
    with pytest.raises(ValueError, match="m2"):
        lrmath.Moments.from_dict({**state, "m2": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="missing"):
        lrmath.Moments.from_dict({k: v for k, v in state.items() if k != "m4"})
    with pytest.raises(ValueError, match="dim 3"):
        lrmath.Moments(2).merge(lrmath.Moments(3).update(np.ones((1, 3))))


def test_format_1_state_loads_and_refuses_only_what_needs_the_per_feature_sums():
    """A state saved before the per-feature sums existed still gives covariance and Ledoit-Wolf toward mu I;
    the diagonal target, which needs them, says why it cannot."""
    X = np.random.default_rng(0).standard_normal((50, 3)) + 2.0
    state = lrmath.Moments(3, per_feature=True).update(X).to_dict()
    old = {k: v for k, v in state.items() if k not in ("d3", "d4")}
    old["format_version"] = 1
    back = lrmath.Moments.from_dict(old)
    np.testing.assert_array_equal(back.covariance(), lrmath.Moments.from_dict(state).covariance())
    assert float(lrmath.ledoit_wolf(back).shrinkage) == float(lrmath.ledoit_wolf(X).shrinkage)
    with pytest.raises(ValueError, match="format version 1"):
        lrmath.ledoit_wolf(back, target="diagonal")
    assert not back.per_feature and "d3" not in back.to_dict()
    with pytest.raises(ValueError, match="missing"):
        lrmath.Moments.from_dict({k: v for k, v in state.items() if k != "d4"})


@given(case=split_samples(max_n=60, max_p=8))
def test_without_per_feature_sums_everything_else_is_identical(case):
    """per_feature=False (the default) only skips D3 / D4: the other sums are bit-identical, the state omits them,
    a merge with such a stream drops them, and the diagonal target refuses instead of guessing."""
    X, _, parts, order = case
    full, lean = lrmath.Moments(X.shape[1], per_feature=True), lrmath.Moments(X.shape[1])
    for i in order:
        full.update(parts[i])
        lean.update(parts[i])
    a, b = full.to_dict(), lean.to_dict()
    assert set(a) - set(b) == {"d3", "d4"}
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])
    back = lrmath.Moments.from_dict(b)
    assert not back.per_feature and back.to_dict().keys() == b.keys()
    assert not full.copy().merge(lean).per_feature and "d4" not in full.copy().merge(lean).to_dict()
    assert lrmath.Moments(X.shape[1]).merge(full).per_feature  # an empty accumulator takes them over
    with pytest.raises(ValueError, match="per_feature"):
        lrmath.ledoit_wolf(lean, target="diagonal")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gram_dtype", [None, "float32"])
@given(case=split_samples(max_n=60, max_p=8))
def test_order_2_keeps_the_second_moments_bit_identical_and_nothing_else(backend, gram_dtype, case):
    """order=2 skips only M3 / M4 (and D3 / D4): the count, mean and M2 are bit-identical to order=4's on
    every chunking and Gram precision (float32 rows take the low-precision path), the state omits the rest,
    a merge with such a stream drops them, Ledoit-Wolf refuses, and OAS (second moments only) agrees."""
    X, _, parts, order = case
    if gram_dtype == "float32":
        parts = [part.astype(np.float32) for part in parts]
    full, lean = lrmath.Moments(X.shape[1]), lrmath.Moments(X.shape[1], order=2)
    dt = None
    for i in order:
        part = to_backend(parts[i], backend)
        if gram_dtype is not None:
            dt = part.dtype
        full.update(part, gram_dtype=dt)
        lean.update(part, gram_dtype=dt)
    a, b = full.to_dict(), lean.to_dict()
    assert set(a) - set(b) == {"m3", "m4"}
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])
    assert np.isnan(to_numpy(lean.sums().third)).all() and np.isnan(to_numpy(lean.sums().fourth)).all()
    back = lrmath.Moments.from_dict(b)
    assert back.order == 2 and back.to_dict().keys() == b.keys()
    mixed = full.copy().merge(lean)
    assert mixed.order == 2 and "m4" not in mixed.to_dict()
    assert lrmath.Moments(X.shape[1], order=2).merge(full).order == 4  # an empty accumulator takes them over
    with pytest.raises(ValueError, match="order=2"):
        lrmath.ledoit_wolf(lean)
    if X.shape[0] > 1:
        np.testing.assert_array_equal(to_numpy(lrmath.oas(lean).covariance), to_numpy(lrmath.oas(full).covariance))


def test_repr_says_which_sums_are_kept():
    """Why Ledoit-Wolf refuses a Moments should be visible from the object itself."""
    assert "order=2" in repr(lrmath.Moments(3, order=2))
    assert "order=4, per_feature=True, count=2, library=numpy" in repr(
        lrmath.Moments(3, per_feature=True).update(np.ones((2, 3))))


def test_order_is_checked_and_overflow_is_still_caught_without_the_fourth_sums():
    with pytest.raises(ValueError, match="order must be 2 or 4"):
        lrmath.Moments(3, order=3)
    with pytest.raises(ValueError, match="per_feature=True needs order=4"):
        lrmath.Moments(3, order=2, per_feature=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        lrmath.Moments(2, order=2).update(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\|x - mean\|\^2 is not finite"):
        lrmath.Moments(2, order=2).update(np.array([[1e200, 0.0], [-1e200, 1.0]]))  # squares overflow


def test_inputs_are_not_mutated_and_any_real_dtype_is_accepted():
    X = np.arange(12, dtype=np.float16).reshape(4, 3)
    before = X.copy()
    acc = lrmath.Moments(3).update(X).update(np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(X, before)
    assert acc.count == 6 and acc.covariance().dtype == np.float64
    ref = np.concatenate([X.astype(np.float64), np.arange(6.0).reshape(2, 3)])
    np.testing.assert_allclose(acc.covariance(), np.cov(ref.T, bias=True), rtol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=split_samples(max_n=60, max_p=10))
def test_gram_kernel_is_the_exact_symmetric_product(backend, case):
    """The Gram kernel behind ``update`` (numpy's ``syrk`` for CPU torch): ``Y^T Y``, exactly symmetric."""
    from lrmath._backend import gram

    X = case[0]
    for arr in (X, X[::2], np.asfortranarray(X)):  # contiguous, strided, column-major
        G = gram(to_backend(arr, backend))
        assert same_library(G, to_backend(arr, backend))
        G = to_numpy(G)
        ref = arr.T @ arr
        assert np.array_equal(G, G.T)
        assert np.allclose(G, ref, rtol=0, atol=tolerance(np.float64, arr.shape[0] + 1) * max(np.abs(ref).max(), 1))
