"""Hypothesis strategies and assertion helpers for property-testing low-rank code.

Downstream libraries can test their own low-rank numerics against lrmath with
these; ``proofs_tests/`` uses them itself.  The strategies draw *structure*
(seed, shape, log-condition number, spectrum decay, mean shift, rank
deficiency) and then build float64 numpy arrays from it with
``numpy.random.default_rng(seed)``, so Hypothesis shrinks on a handful of
meaningful parameters instead of on raw floats.

Requires ``hypothesis`` (``pip install lrmath[test]``).

Examples
--------
>>> from hypothesis import given
>>> from lrmath.testing import spd_matrices, tolerance
>>> @given(spd_matrices(max_dim=8))
... def test_trace_positive(C):
...     assert C.trace() > 0
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
    raise ImportError("lrmath.testing needs hypothesis: pip install 'lrmath[test]'") from exc

from ._backend import to_numpy
from ._validation import dtype_eps

__all__ = [
    "DECAYS",
    "make_spectrum",
    "random_orthogonal",
    "seeds",
    "spectra",
    "spd_matrices",
    "psd_matrices",
    "SampleCase",
    "samples",
    "WeightCase",
    "weight_statistic_pairs",
    "tolerance",
    "condition_number",
    "projector",
    "subspace_distance",
    "assert_subspaces_close",
    "assert_close",
]

DECAYS = ("geometric", "power", "cliff", "flat")


# --------------------------------------------------------------------- builders
def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """Haar-distributed orthogonal ``d x d`` matrix (QR of a Gaussian, signs fixed)."""
    Z = rng.standard_normal((d, d))
    Q, R = np.linalg.qr(Z)
    return Q * np.where(np.diag(R) < 0, -1.0, 1.0)


def make_spectrum(d: int, log10_cond: float, decay: str, scale: float = 1.0) -> np.ndarray:
    """Descending positive spectrum of length ``d`` with ``max/min = 10**log10_cond``.

    ``decay``: ``geometric`` (log-linear), ``power`` (``i**-a``), ``cliff`` (half
    large, half small: a clear gap) or ``flat`` (all equal, ignores the condition).
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if d == 1 or decay == "flat":
        return np.full(d, scale)
    t = np.arange(d) / (d - 1)
    if decay == "geometric":
        s = 10.0 ** (-log10_cond * t)
    elif decay == "power":
        a = log10_cond / math.log10(d)
        s = np.arange(1, d + 1, dtype=np.float64) ** (-a)
    else:  # cliff
        s = np.where(t < 0.5, 1.0, 10.0**-log10_cond)
    return scale * s


# ------------------------------------------------------------------- strategies
def seeds():
    """Seeds for ``numpy.random.default_rng``."""
    return st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def spectra(draw, *, dim: int | None = None, min_dim: int = 1, max_dim: int = 24,
            max_log10_cond: float = 8.0):
    """Descending positive spectra with a drawn size, condition number and decay."""
    d = dim if dim is not None else draw(st.integers(min_dim, max_dim))
    log10_cond = draw(st.floats(0.0, max_log10_cond))
    decay = draw(st.sampled_from(DECAYS))
    scale = 10.0 ** draw(st.integers(-3, 3))
    return make_spectrum(d, log10_cond, decay, scale)


@st.composite
def spd_matrices(draw, *, dim: int | None = None, min_dim: int = 1, max_dim: int = 24,
                 max_log10_cond: float = 8.0, batch_shape: tuple[int, ...] = ()):
    """Symmetric positive definite float64 matrices ``Q diag(s) Q^T`` (batched if asked)."""
    d = dim if dim is not None else draw(st.integers(min_dim, max_dim))
    rng = np.random.default_rng(draw(seeds()))
    out = np.empty(batch_shape + (d, d))
    for idx in np.ndindex(*batch_shape):
        s = draw(spectra(dim=d, max_log10_cond=max_log10_cond))
        Q = random_orthogonal(rng, d)
        C = (Q * s) @ Q.T
        out[idx] = (C + C.T) / 2
    return out


@st.composite
def psd_matrices(draw, *, dim: int | None = None, min_dim: int = 1, max_dim: int = 24,
                 allow_zero: bool = True, batch_shape: tuple[int, ...] = ()):
    """Rank-deficient Gram matrices ``X X^T`` (rank drawn in ``[0 or 1, d]``)."""
    d = dim if dim is not None else draw(st.integers(min_dim, max_dim))
    rng = np.random.default_rng(draw(seeds()))
    k = draw(st.integers(0 if allow_zero else 1, d))
    scale = 10.0 ** draw(st.integers(-3, 3))
    out = np.empty(batch_shape + (d, d))
    for idx in np.ndindex(*batch_shape):
        X = rng.standard_normal((d, k)) * scale
        out[idx] = X @ X.T
    return out


class SampleCase(NamedTuple):
    """Samples ``X`` (n, p) with a known mean shift and spread."""

    X: np.ndarray
    mean_shift: float
    seed: int


@st.composite
def samples(draw, *, min_n: int = 2, max_n: int = 200, min_p: int = 1, max_p: int = 24,
            max_log10_shift: float = 3.0):
    """Correlated Gaussian samples whose mean is up to ``10**max_log10_shift`` times their spread."""
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    n = draw(st.integers(min_n, max_n))
    p = draw(st.integers(min_p, max_p))
    s = draw(spectra(dim=p, max_log10_cond=4.0))
    shift = 10.0 ** draw(st.floats(-1.0, max_log10_shift)) if draw(st.booleans()) else 0.0
    mixing = random_orthogonal(rng, p) * np.sqrt(s)
    X = rng.standard_normal((n, p)) @ mixing.T
    mu = shift * np.sqrt(s[0]) * rng.uniform(0.5, 1.0, size=p) * rng.choice([-1.0, 1.0], size=p)
    return SampleCase(X + mu, shift, seed)


class WeightCase(NamedTuple):
    """A weight ``W`` (m, n) with calibration inputs ``X`` (n, N) and ``C = X X^T``."""

    W: np.ndarray
    X: np.ndarray
    C: np.ndarray


@st.composite
def weight_statistic_pairs(draw, *, max_m: int = 16, max_n: int = 16, max_tokens: int = 64,
                           outlier_channels: bool = True, allow_rank_deficient: bool = True):
    """Weights and activations like an LLM linear: a few input channels may carry
    hundreds of times the median energy, and ``X`` may have fewer tokens than channels."""
    rng = np.random.default_rng(draw(seeds()))
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    N = draw(st.integers(1 if allow_rank_deficient else n, max(max_tokens, n)))
    W = rng.standard_normal((m, n)) / math.sqrt(n)
    X = rng.standard_normal((n, N))
    if outlier_channels and draw(st.booleans()):
        k = draw(st.integers(1, max(1, n // 4)))
        X[rng.choice(n, size=k, replace=False)] *= 10.0 ** draw(st.floats(1.0, 3.0))
    return WeightCase(W, X, X @ X.T)


# ------------------------------------------------------------------- assertions
def tolerance(dtype: Any = np.float64, n: int = 1, kappa: float = 1.0, c: float = 10.0) -> float:
    """Relative tolerance ``max(c * n * eps * kappa, 4 * sqrt(eps))`` for a computation.

    ``n`` is the problem size (the length of the sums involved), ``kappa`` the
    condition number of the problem, ``eps`` the unit roundoff of ``dtype``.
    """
    eps = dtype_eps(dtype)
    return max(c * n * eps * kappa, 4.0 * math.sqrt(eps))


def condition_number(C) -> float:
    """2-norm condition number of a symmetric PSD matrix (``inf`` when singular)."""
    w = np.linalg.eigvalsh(to_numpy(C))
    return float(w[-1] / w[0]) if w[0] > 0 else math.inf


def projector(Q) -> np.ndarray:
    """Orthogonal projector ``Q Q^T`` onto the span of orthonormal columns ``Q`` (host numpy)."""
    Qn = to_numpy(Q).astype(np.float64)
    return Qn @ np.swapaxes(Qn, -1, -2)


def subspace_distance(A, B) -> float:
    """Sine of the largest principal angle between the column spans of ``A`` and ``B``.

    Both must have orthonormal columns and the same number of them; batched
    inputs return the maximum over the batch. Invariant to signs and to
    rotations inside the subspace, unlike a comparison of eigenvectors.
    """
    diff = projector(A) - projector(B)
    if diff.size == 0:
        return 0.0
    return float(np.max(np.linalg.norm(diff, ord=2, axis=(-2, -1))))


def assert_subspaces_close(A, B, atol: float) -> None:
    """Assert ``subspace_distance(A, B) <= atol``."""
    dist = subspace_distance(A, B)
    assert dist <= atol, f"subspaces differ: sin(largest principal angle) = {dist:.3g} > {atol:.3g}"


def assert_close(actual, desired, *, rtol: float, atol: float = 0.0, what: str = "value") -> None:
    """``numpy.testing.assert_allclose`` on host copies of any backend's arrays."""
    np.testing.assert_allclose(to_numpy(actual), to_numpy(desired), rtol=rtol, atol=atol, err_msg=what)
