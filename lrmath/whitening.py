"""Whitening factors of second-moment matrices: Cholesky, symmetric square root, eigen form.

A whitener turns the data-weighted error ``||(W - What) X||_F`` into a plain
Frobenius norm ``||(W - What) S||_F`` with ``S S^T = C = X X^T`` (SVD-LLM,
FLAR-SVD: Cholesky; LatentLLM: ``P = C^{1/2}``).  :func:`whiten` never crashes
on a positive semidefinite, rank-deficient or all-zero ``C``; the returned
:class:`Whitener` records what it had to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._backend import as_work, cholesky_each, device_of, matmul_triangular, namespace, solve_triangular
from ._validation import check_array, check_finite, check_nonnegative_scalar, check_symmetric, dtype_eps

__all__ = ["Whitener", "whiten", "DampedCholesky", "damped_cholesky", "METHODS", "CHOLESKY_SCHEDULE", "PSD_SLACK"]

METHODS = ("cholesky", "sqrt", "eigh")

#: Relative damping tried, in order, after a failed Cholesky (only values above the requested one).
CHOLESKY_SCHEDULE = tuple(10.0**k for k in range(-12, -1))
# Most negative eigenvalue the eigen forms clip, relative to mean(diag C): the largest damping the
# schedule ever applies, so whiten and damped_cholesky refuse the same matrices.
PSD_SLACK = CHOLESKY_SCHEDULE[-1]


@dataclass(frozen=True, eq=False)
class Whitener:
    r"""A whitening factor ``S`` with ``S S^T = C + delta I`` and a record of how it was obtained.

    Build it with :func:`whiten`.

    Attributes
    ----------
    factor : array, shape (n, n)
        ``S``: lower triangular (``cholesky``), symmetric PSD (``sqrt``) or
        ``V diag(sqrt(lambda + delta))`` with descending eigenvalues (``eigh``).
        float64 (float32 on devices without float64), on the device of ``C``.
    requested_method : str
        The ``method`` asked for.
    method : str
        The method that produced ``factor`` (``"eigh"`` after a Cholesky fallback).
    damping : float
        Relative damping actually used (``alpha`` in ``delta = alpha * mean(diag C)``).
    delta : float
        Absolute damping actually added to the diagonal.
    attempts : int
        Factorisations tried (Cholesky attempts, plus one for an eigen fallback).
    fallback : {None, "damping", "eigh"}
        ``None``: the first attempt succeeded; ``"damping"``: Cholesky succeeded
        after raising the damping along :data:`CHOLESKY_SCHEDULE`; ``"eigh"``:
        Cholesky failed throughout and the eigen form was used with the
        requested damping.
    rank : int
        Number of directions kept (``n`` for Cholesky; eigenvalues above
        ``cutoff`` for the eigen forms).
    cutoff : float or None
        Eigenvalues of ``C + delta I`` at or below it count as zero (eigen forms only).
    clipped : float
        Magnitude of the most negative eigenvalue of ``C + delta I`` that was
        set to zero (0.0 when none; eigen forms only).
    """

    factor: Any
    requested_method: str
    method: str
    damping: float
    delta: float
    attempts: int
    fallback: str | None
    rank: int
    cutoff: float | None = None
    clipped: float = 0.0
    _vectors: Any = field(default=None, repr=False)
    _roots: Any = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return self.factor.shape[-1]

    def record(self) -> dict:
        """What happened, as plain JSON-serialisable values (for manifests and logs)."""
        return {
            "requested_method": self.requested_method,
            "method": self.method,
            "damping": self.damping,
            "delta": self.delta,
            "attempts": self.attempts,
            "fallback": self.fallback,
            "rank": self.rank,
            "cutoff": self.cutoff,
            "clipped": self.clipped,
        }

    def apply(self, W):
        """``W S`` for ``W`` of shape (..., n): move a weight into the whitened space."""
        W = self._check("W", W)
        if self.method == "cholesky":
            return matmul_triangular(W, self.factor, lower=True)
        return W @ self.factor

    def solve(self, Y):
        r"""``Y S^+`` for ``Y`` of shape (..., n): move a whitened weight back.

        ``S^+ = S^{-1}`` whenever ``S`` is invertible.  Cholesky uses a
        triangular solve; the eigen forms use ``S^+ = V diag(1/sqrt(lambda))
        V^T`` (``sqrt``) or ``diag(1/sqrt(lambda)) V^T`` (``eigh``) with
        ``1/sqrt(lambda)`` replaced by 0 for eigenvalues at or below ``cutoff``.
        No explicit inverse is formed.
        """
        Y = self._check("Y", Y)
        xp = namespace(Y)
        n = self.dim
        if self.method == "cholesky":
            if math.prod(Y.shape) == 0:
                return xp.zeros(Y.shape, dtype=self.factor.dtype, device=device_of(self.factor))
            flat = xp.reshape(Y, (-1, n))
            out = solve_triangular(self.factor, flat, lower=True, left=False, xp=xp)
            return xp.reshape(out, Y.shape)
        kept = self._roots > 0
        one = xp.ones_like(self._roots)
        inv_roots = xp.where(kept, one / xp.where(kept, self._roots, one), xp.zeros_like(self._roots))
        V, Vt = self._vectors, xp.matrix_transpose(self._vectors)
        if self.method == "sqrt":
            return ((Y @ V) * inv_roots) @ Vt
        return (Y * inv_roots) @ Vt

    def _check(self, name, A):
        check_array(name, A, min_ndim=1)
        xp = namespace(A, self.factor)
        if A.shape[-1] != self.dim:
            raise ValueError(f"{name} must have {self.dim} columns (the size of C), got shape {tuple(A.shape)}")
        check_finite(name, A, xp)
        return as_work(A, xp)


def whiten(C, *, method: str = "cholesky", damping: float = 0.0) -> Whitener:
    r"""Whitening factor ``S`` with ``S S^T = C + delta I``, ``delta = damping * mean(diag C)``.

    Parameters
    ----------
    C : array, shape (n, n)
        Symmetric positive semidefinite second moment, e.g. ``X X^T`` of a
        linear layer's inputs ``X`` (n, N). Any float dtype and backend.
    method : {"cholesky", "sqrt", "eigh"}
        ``cholesky``: lower triangular ``L`` (SVD-LLM, FLAR-SVD); ``sqrt``: the
        symmetric square root ``C^{1/2}`` (LatentLLM's preconditioner
        ``P = C^{1/2}``); ``eigh``: ``V diag(sqrt(lambda))``. The two eigen
        forms accept singular ``C`` without damping.
    damping : float, default 0.0
        Relative damping ``alpha >= 0``; the absolute shift is
        ``alpha * mean(diag C)``, so it scales with the data.

    Returns
    -------
    Whitener
        ``factor`` in float64 (float32 on devices without float64) on the
        device of ``C``, ``apply`` / ``solve``, and the record of the damping
        and fallback actually used.

    Raises
    ------
    ValueError
        If ``C`` is not 2-D, not square, not symmetric within a dtype
        tolerance, holds NaN/Inf; ``damping`` is negative or not finite;
        ``method`` is unknown; or ``C`` is not positive semidefinite beyond
        rounding: an eigenvalue below ``-(PSD_SLACK mean(diag C)^+ + cutoff)``
        (``lrmath.whitening.PSD_SLACK`` = ``1e-2``, the schedule's largest
        damping, where :func:`damped_cholesky` refuses too).

    Notes
    -----
    **Cholesky schedule.** If ``C + delta I`` is not numerically positive
    definite, the relative damping is raised geometrically through
    :data:`CHOLESKY_SCHEDULE` (``1e-12, 1e-11, ..., 1e-2``; only values above
    the requested one) and the factorisation retried.  If all fail (or
    ``mean(diag C) = 0``, where relative damping cannot help) the eigen form
    ``eigh`` is used with the *requested* damping; ``fallback`` says which
    happened.  A Cholesky that succeeds on a numerically singular ``C`` may
    have tiny pivots: prefer ``sqrt`` / ``eigh`` for rank-deficient data.

    **Eigen forms.** With ``C + delta I = V diag(lambda) V^T``, eigenvalues at or
    below the cutoff ``10 n eps lambda_max`` (``eps`` the unit roundoff of
    ``C``'s dtype, the size of rounding noise in ``C``) are set to zero, and
    so are negative ones: ``S S^T`` is then the nearest PSD matrix to
    ``C + delta I`` up to the cutoff, and ``solve`` applies the Moore-Penrose
    pseudo-inverse ``S^+``.  ``clipped`` reports the largest negative
    eigenvalue dropped.  Only negatives that rounding or a float32
    accumulation can explain are clipped; a ``C`` with a larger negative
    eigenvalue is no second moment of real data (a sign error, a difference
    of two Grams) and is refused rather than silently projected.

    For any ``S`` with ``S S^T = C = X X^T``,
    ``||A X||_F^2 = tr(A C A^T) = ||A S||_F^2``: every method gives the same
    weighted norm, which is why they are interchangeable in
    :func:`lrmath.whitened_svd`.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> X = np.random.default_rng(0).standard_normal((4, 100))
    >>> w = lrmath.whiten(X @ X.T, method="cholesky")
    >>> bool(np.allclose(w.factor @ w.factor.T, X @ X.T))
    True
    >>> W = np.ones((2, 4))
    >>> bool(np.allclose(w.solve(w.apply(W)), W))
    True
    >>> lrmath.whiten(np.zeros((3, 3))).fallback  # Cholesky impossible: eigen form
    'eigh'
    """
    check_array("C", C, ndim=2)
    xp = check_symmetric("C", C)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    damping = check_nonnegative_scalar("damping", damping)
    eps = dtype_eps(C.dtype) if xp.isdtype(C.dtype, "real floating") else dtype_eps(xp.float64)
    Cw = as_work(C, xp)
    Cw = (Cw + xp.matrix_transpose(Cw)) / 2  # exact symmetry (and a copy: C is never touched)
    n = Cw.shape[-1]
    eye = xp.eye(n, dtype=Cw.dtype, device=device_of(Cw))
    mean_diag = float(xp.mean(xp.linalg.diagonal(Cw)))
    scale = max(mean_diag, 0.0)

    if method == "cholesky":
        L, used, alive, failed = _cholesky_schedule(Cw, damping, xp)
        if bool(alive) and not bool(failed):
            alpha = float(used)
            attempt = _schedule(damping).index(alpha) + 1
            return Whitener(factor=L, requested_method=method, method="cholesky",
                            damping=alpha, delta=alpha * scale, attempts=attempt,
                            fallback=None if attempt == 1 else "damping", rank=n)
        tried = len(_schedule(damping)) if scale > 0 else 1
        return _eigen_whitener(xp, Cw + (damping * scale) * eye, "eigh", eps, PSD_SLACK * scale,
                               requested=method, damping=damping, delta=damping * scale,
                               attempts=tried + 1, fallback="eigh")
    return _eigen_whitener(xp, Cw + (damping * scale) * eye, method, eps, PSD_SLACK * scale, requested=method,
                           damping=damping, delta=damping * scale, attempts=1, fallback=None)


class DampedCholesky(NamedTuple):
    """Result of :func:`damped_cholesky`.

    Attributes
    ----------
    factor : array, shape (..., k, k)
        Lower triangular ``L_h`` with ``L_h L_h^T = A_h + alpha_h m_h I``; the
        identity where ``A_h`` is zero.
    damping : array, shape (...)
        The relative damping ``alpha_h`` used (0 where ``A_h`` is zero).
    alive : array of bool, shape (...)
        False where ``A_h`` is exactly zero.
    """

    factor: Any
    damping: Any
    alive: Any


def damped_cholesky(A, damping: float = 0.0) -> DampedCholesky:
    r"""Cholesky factors of a batch of PSD matrices, each damped only as much as it needs.

    ``L_h L_h^T = A_h + alpha_h m_h I`` with ``m_h = mean(diag A_h)``: ``alpha_h``
    is ``damping``, raised along :data:`CHOLESKY_SCHEDULE` for the matrices
    whose factorisation fails, one matrix at a time (a failing head does not
    damp the others).

    Parameters
    ----------
    A : array, shape (..., k, k)
        Symmetric positive semidefinite matrices (up to rounding), e.g. per-head
        second moments; numpy, torch or cupy.
    damping : float, default 0.0
        Relative damping tried first.

    Returns
    -------
    DampedCholesky
        ``factor`` (float64 where the device has it, on ``A``'s device), the
        ``damping`` used per matrix and ``alive`` (False for zero matrices,
        whose factor is the identity: a head that never carries signal).

    Raises
    ------
    ValueError
        If ``A`` is not square, symmetric and finite; ``damping`` is negative;
        or a nonzero ``A_h`` has a non-positive mean diagonal or fails even at
        the schedule's largest damping. Such a matrix is not PSD to rounding,
        which no second moment of real data can be.

    Notes
    -----
    A Gram accumulated in float32 from few or nearly collinear rows is PSD only
    to about ``10 N eps_32`` relative, so the undamped factorisation can fail
    where the data are fine; relative damping (SVD-LLM, FLAR-SVD) fixes that
    without a scale the user must guess. Unlike :func:`whiten`, which falls back
    to an eigen form, this always returns triangular factors, which is what
    batched triangular solves (``cholesky_solve``) need.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> v = np.ones((3, 1))
    >>> res = lrmath.damped_cholesky(np.stack([np.eye(3), v @ v.T, np.zeros((3, 3))]))
    >>> res.damping.tolist(), res.alive.tolist()
    ([0.0, 1e-12, 0.0], [True, True, False])
    """
    xp = check_symmetric("A", A)
    check_finite("A", A, xp)
    damping = check_nonnegative_scalar("damping", damping)
    Aw = as_work(A, xp)
    Aw = (Aw + xp.matrix_transpose(Aw)) / 2
    L, used, alive, failed = _cholesky_schedule(Aw, damping, xp)
    if bool(xp.any(failed)):
        bad = [int(i) for i in xp.nonzero(xp.reshape(failed, (-1,)))[0]]
        raise ValueError(f"matrices {bad} (flat batch index) are not positive semidefinite to rounding: "
                         f"Cholesky failed up to relative damping {CHOLESKY_SCHEDULE[-1]:g}")
    return DampedCholesky(factor=L, damping=used, alive=alive)


def _schedule(damping: float) -> list[float]:
    return [damping] + [a for a in CHOLESKY_SCHEDULE if a > damping]


def _cholesky_schedule(A, damping, xp):
    """``(L, alpha, alive, failed)`` per matrix of the symmetric batch ``A`` (work dtype).

    ``failed``: nonzero matrices with no factor (non-positive mean diagonal, or
    every damping of the schedule refused); ``L`` is the identity there and
    where the matrix is zero.
    """
    k = A.shape[-1]
    eye = xp.eye(k, dtype=A.dtype, device=device_of(A))
    scale = xp.mean(xp.linalg.diagonal(A), axis=-1)
    alive = xp.max(xp.abs(A), axis=(-2, -1)) > 0
    L = xp.zeros_like(A) + eye
    used = xp.zeros_like(scale)
    pending = alive & (scale > 0)
    for alpha in _schedule(damping):
        if not bool(xp.any(pending)):
            break
        factor, ok = cholesky_each(A + (alpha * scale)[..., None, None] * eye, xp)
        new = pending & ok
        L = xp.where(new[..., None, None], factor, L)
        used = xp.where(new, xp.full_like(used, alpha), used)
        pending = pending & ~ok
    return L, used, alive, pending | (alive & ~(scale > 0))


def _eigen_whitener(xp, A, form, eps, slack, **record) -> Whitener:
    """``sqrt`` / ``eigh`` factor of the symmetric matrix ``A`` with small and negative eigenvalues zeroed.

    Raises ValueError where an eigenvalue lies below ``-(slack + cutoff)``: not PSD beyond rounding.
    """
    evals, evecs = xp.linalg.eigh(A)
    evals = xp.flip(evals, axis=-1)  # descending: leading columns carry the most energy
    evecs = xp.flip(evecs, axis=-1)
    lam_max = max(float(evals[0]), 0.0)
    cutoff = 10.0 * A.shape[-1] * eps * lam_max
    kept = evals > cutoff
    roots = xp.where(kept, xp.sqrt(xp.where(kept, evals, xp.zeros_like(evals))), xp.zeros_like(evals))
    clipped = max(0.0, -float(evals[-1]))
    if clipped > slack + cutoff:
        raise ValueError(f"C is not positive semidefinite: eigenvalue {-clipped:.3g} of C + delta I is below "
                         f"{-(slack + cutoff):.3g} = -({PSD_SLACK:g} mean(diag C)^+ + cutoff), beyond rounding")
    S = evecs * roots
    if form == "sqrt":
        S = S @ xp.matrix_transpose(evecs)
        S = (S + xp.matrix_transpose(S)) / 2  # C^{1/2} is symmetric: make it exactly so
    return Whitener(factor=S, method=form, rank=int(xp.sum(xp.astype(kept, xp.int64))),
                    cutoff=cutoff, clipped=clipped, _vectors=evecs, _roots=roots,
                    requested_method=record.pop("requested"), **record)
