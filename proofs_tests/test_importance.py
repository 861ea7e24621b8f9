"""FLAT-LLM angular layer importance (Section 4.2, Eq. 7): definition, streaming, invariances.

Statements proved here, for ``t = arccos(mean_p cos(x_in,p, x_out,p)) / pi`` ("paper") and the
public code's ``mean_p arccos(clamp(cos_p, 0, 1)) / pi`` with zero-norm tokens at cos 0.5 ("reference"):

* both equal a direct per-token numpy computation of their definition;
* streaming over any split of the tokens into batches, and merging accumulators, gives the
  one-shot value;
* both lie in [0, 1] and are invariant to positive (per-token) scaling of x_in or of x_out;
* zero-norm tokens leave the paper value unchanged; the reference value counts them at cos 0.5;
* when every cosine is positive, reference <= paper (arccos is concave on [0, 1]: Jensen).
"""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath._backend import to_numpy
from lrmath.testing import seeds, tolerance
from proofs_tests.backends import BACKENDS, same_library, to_backend

EPS = np.finfo(np.float64).eps


@st.composite
def hidden_pairs(draw, max_batch=3, max_tokens=40, max_hidden=24, zero_tokens=True):
    """(x_in, x_out) of shape (batch, tokens, hidden): x_out = alpha x_in + noise, some zero tokens."""
    rng = np.random.default_rng(draw(seeds()))
    shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_tokens)), draw(st.integers(1, max_hidden)))
    alpha = draw(st.floats(-2.0, 2.0))
    noise = 10.0 ** draw(st.floats(-4.0, 1.0))
    scale = 10.0 ** draw(st.integers(-6, 6))
    x_in = rng.standard_normal(shape) * scale
    x_out = alpha * x_in + noise * scale * rng.standard_normal(shape)
    if zero_tokens and draw(st.booleans()):
        which = rng.random(shape[:-1]) < draw(st.floats(0.0, 0.5))
        (x_in if draw(st.booleans()) else x_out)[which] = 0.0
    return x_in, x_out


def direct(x_in, x_out, mode):
    """The definitions, token by token, in plain numpy."""
    a = x_in.reshape(-1, x_in.shape[-1])
    b = x_out.reshape(-1, x_out.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    if mode == "paper":
        return math.acos(np.clip(np.mean(cos[~np.isnan(cos)]), -1, 1)) / math.pi
    return float(np.mean(np.arccos(np.clip(np.nan_to_num(cos, nan=0.5), 0.0, 1.0)) / math.pi))


def angle_tol(value, n):
    """Absolute tolerance of an angle/pi whose cosine is accurate to tolerance(n).

    d arccos(c) = -dc / sqrt(1 - c^2): the angle is ill-conditioned near c = +-1, where
    a cosine error delta moves the angle by up to sqrt(2 delta)."""
    delta = tolerance(np.float64, n=n)
    c = math.cos(math.pi * float(value))
    return 2 * delta / (math.pi * math.sqrt(max(1.0 - c * c, delta)))


@pytest.mark.parametrize("mode", ["paper", "reference"])
@given(pair=hidden_pairs())
def test_matches_definition(mode, pair):
    x_in, x_out = pair
    a = x_in.reshape(-1, x_in.shape[-1])
    b = x_out.reshape(-1, x_out.shape[-1])
    defined = (np.abs(a).max(axis=1) > 0) & (np.abs(b).max(axis=1) > 0)
    if mode == "paper" and not defined.any():
        with pytest.raises(ValueError, match="zero hidden state"):
            lrmath.angular_importance(x_in, x_out, mode=mode)
        return
    t = float(lrmath.angular_importance(x_in, x_out, mode=mode))
    expected = direct(x_in, x_out, mode)
    assert 0.0 <= t <= 1.0
    assert abs(t - expected) <= angle_tol(expected, x_in.shape[-1] + a.shape[0])


@pytest.mark.parametrize("backend", BACKENDS)
@given(pair=hidden_pairs(), data=st.data())
def test_streaming_and_merge_equal_one_shot(backend, pair, data):
    """Any split of the tokens into batches, accumulated or merged, gives the one-shot value."""
    x_in, x_out = pair
    a = x_in.reshape(-1, x_in.shape[-1])
    b = x_out.reshape(-1, x_out.shape[-1])
    n = a.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    bounds = [0, *cuts, n]
    chunks = [(a[i:j], b[i:j]) for i, j in zip(bounds, bounds[1:])]
    split = data.draw(st.integers(0, len(chunks)))
    first, second = lrmath.AngularImportance(), lrmath.AngularImportance()
    for k, (ca, cb) in enumerate(chunks):
        (first if k < split else second).update(to_backend(ca, backend), to_backend(cb, backend))
    merged = first.merge(second)
    assert merged.tokens == n
    one_shot = lrmath.AngularImportance().update(to_backend(x_in, backend), to_backend(x_out, backend))
    for mode in ("paper", "reference"):
        if mode == "paper" and one_shot.skipped == n:
            with pytest.raises(ValueError):
                merged.value(mode)
            continue
        got, want = merged.value(mode), one_shot.value(mode)
        assert same_library(got, to_backend(x_in, backend))
        assert abs(float(got) - float(want)) <= angle_tol(float(want), n + x_in.shape[-1])
    assert merged.skipped == one_shot.skipped


@given(pair=hidden_pairs(zero_tokens=False), seed=seeds(), which=st.sampled_from(["in", "out"]),
       per_token=st.booleans())
def test_invariant_to_positive_scaling(pair, seed, which, per_token):
    x_in, x_out = pair
    rng = np.random.default_rng(seed)
    shape = x_in.shape[:-1] + (1,) if per_token else (1,)
    c = 10.0 ** rng.uniform(-8, 8, size=shape)
    scaled = (x_in * c, x_out) if which == "in" else (x_in, x_out * c)
    for mode in ("paper", "reference"):
        t0 = float(lrmath.angular_importance(x_in, x_out, mode=mode))
        t1 = float(lrmath.angular_importance(*scaled, mode=mode))
        assert 0.0 <= t1 <= 1.0
        assert abs(t0 - t1) <= angle_tol(t0, x_in.shape[-1] + x_in.size // x_in.shape[-1])


@given(pair=hidden_pairs(zero_tokens=False), n_zero=st.integers(1, 20), where=st.sampled_from(["in", "out", "both"]))
def test_zero_norm_tokens(pair, n_zero, where):
    """Paper: zero tokens have no angle and leave the mean unchanged. Reference: they count at cos 0.5."""
    x_in, x_out = (x.reshape(-1, x.shape[-1]) for x in pair)
    n, h = x_in.shape
    z_in, z_out = np.ones((n_zero, h)), np.ones((n_zero, h))
    if where in ("in", "both"):
        z_in[:] = 0.0
    if where in ("out", "both"):
        z_out[:] = 0.0
    big_in, big_out = np.concatenate([x_in, z_in]), np.concatenate([x_out, z_out])
    acc = lrmath.AngularImportance().update(big_in, big_out)
    assert acc.skipped == n_zero and acc.tokens == n + n_zero
    t_paper = float(lrmath.angular_importance(x_in, x_out))
    assert abs(float(acc.value("paper")) - t_paper) <= angle_tol(t_paper, n + h)
    t_ref = float(lrmath.angular_importance(x_in, x_out, mode="reference"))
    expected = (n * t_ref + n_zero / 3.0) / (n + n_zero)  # arccos(0.5) / pi = 1/3
    assert abs(float(acc.value("reference")) - expected) <= angle_tol(expected, n + h)


@given(seed=seeds(), tokens=st.integers(1, 50), hidden=st.integers(1, 24), ratio=st.floats(0.0, 0.99))
def test_reference_mode_is_at_most_paper_mode_for_positive_cosines(seed, tokens, hidden, ratio):
    """x_out = x_in + e with ||e_p|| < ||x_in,p||: every cosine > 0, and Jensen on the concave arccos."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden))
    e = rng.standard_normal((tokens, hidden))
    e *= ratio * np.linalg.norm(x, axis=1, keepdims=True) / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
    paper = float(lrmath.angular_importance(x, x + e))
    reference = float(lrmath.angular_importance(x, x + e, mode="reference"))
    assert reference <= paper + angle_tol(paper, tokens + hidden)


def test_known_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5))
    for mode in ("paper", "reference"):
        # the cosine of parallel vectors is 1 to rounding; the angle then to sqrt(rounding)
        assert float(lrmath.angular_importance(x, x, mode=mode)) <= angle_tol(0.0, 12)
        assert float(lrmath.angular_importance(x, 3.0 * x, mode=mode)) <= angle_tol(0.0, 12)
    assert abs(float(lrmath.angular_importance(x, -x)) - 1.0) < 1e-12
    assert abs(float(lrmath.angular_importance(x, -x, mode="reference")) - 0.5) < 1e-12  # clamped at 0
    e1, e2 = np.eye(2)
    assert abs(float(lrmath.angular_importance(e1[None], e2[None])) - 0.5) < 1e-15


def test_float32_torch_input_gives_float64_result_on_same_library():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 8, 6, dtype=torch.float32)
    t = lrmath.angular_importance(x, x + 0.1)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.ndim == 0


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds(), exponent=st.sampled_from([-40, -20, 0, 20, 35]), dtype=st.sampled_from(["float32", "float16"]))
def test_low_precision_input_skips_scaling_without_overflow_or_underflow(backend, seed, exponent, dtype):
    """float32 / float16 tokens go unscaled into float64 norms: same cosines as the scaled float64 path.

    Tokens of magnitude 1e-40 .. 1e35 (float32 subnormal to near its overflow; float16 within
    its own range) and all-zero tokens give the importance of the same values
    fed in float64, to float64 rounding.
    """
    rng = np.random.default_rng(seed)
    if dtype == "float16":
        exponent //= 10  # float16 spans 6e-8 .. 65504
    x = rng.standard_normal((9, 7)) * 10.0 ** exponent
    y = x + 0.3 * rng.standard_normal((9, 7)) * 10.0 ** exponent
    x[0] = 0.0  # an undefined token
    low = np.asarray(x, dtype=dtype), np.asarray(y, dtype=dtype)
    exact = low[0].astype(np.float64), low[1].astype(np.float64)
    if backend == "cupy" and dtype == "float32":
        # CuPy compiles its kernels with -ftz=true (cupy/cupy#8382): float32 subnormals read as zero there
        tiny = float(np.finfo(np.float32).tiny)
        exact = tuple(np.where(np.abs(e) < tiny, 0.0, e) for e in exact)
    for mode in ("paper", "reference"):
        args = [to_backend(a, backend) for a in low]
        if mode == "paper" and not np.any(np.linalg.norm(exact[0], axis=1) * np.linalg.norm(exact[1], axis=1) > 0):
            # every token reads as zero (float16 underflow, or FTZ): undefined on every backend alike
            for inputs in (exact, args):
                with pytest.raises(ValueError, match="every token had a zero hidden state"):
                    lrmath.angular_importance(*inputs, mode=mode)
            continue
        got = float(to_numpy(lrmath.angular_importance(*args, mode=mode)))
        want = float(lrmath.angular_importance(*exact, mode=mode))
        assert abs(got - want) <= angle_tol(want, 16), (got, want)


def test_mixing_libraries_is_refused():
    torch = pytest.importorskip("torch")
    acc = lrmath.AngularImportance().update(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(TypeError, match="numpy"):
        acc.update(torch.ones(2, 3), torch.ones(2, 3))
    other = lrmath.AngularImportance().update(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(TypeError):
        acc.merge(other)
    with pytest.raises(TypeError):
        lrmath.angular_importance(np.ones((2, 3)), torch.ones(2, 3))


@pytest.mark.parametrize(
    "x_in, x_out, kwargs, match",
    [
        (np.ones((2, 3)), np.ones((3, 3)), {}, "same shape"),
        (np.array([[1.0, np.nan]]), np.ones((1, 2)), {}, "x_in contains NaN"),
        (np.ones((1, 2)), np.array([[np.inf, 1.0]]), {}, "x_out contains NaN or Inf"),
        (np.zeros((3, 2)), np.ones((3, 2)), {}, "zero hidden state"),
        (np.ones((0, 2)), np.ones((0, 2)), {}, "no tokens"),
        (np.ones((2, 0)), np.ones((2, 0)), {}, "empty hidden"),
        (np.ones((2, 2)), np.ones((2, 2)), {"mode": "mean"}, "mode"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(x_in, x_out, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrmath.angular_importance(x_in, x_out, **kwargs)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(1)
    x_in, x_out = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4))
    x_in[0, 0] = 0.0
    before = x_in.copy(), x_out.copy()
    acc = lrmath.AngularImportance().update(x_in, x_out)
    acc.merge(lrmath.AngularImportance().update(x_in, x_out))
    lrmath.angular_importance(x_in, x_out, mode="reference")
    np.testing.assert_array_equal(x_in, before[0])
    np.testing.assert_array_equal(x_out, before[1])
    assert to_numpy(acc.importance).shape == ()
