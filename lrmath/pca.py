"""Principal-component truncation of second-moment matrices (FLAT-LLM, Theorem 4.1)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_work
from ._eigh import eigh
from ._validation import check_rank, check_symmetric

__all__ = ["PCAResult", "pca_truncate"]


class PCAResult(NamedTuple):
    """Result of :func:`pca_truncate`.

    Attributes
    ----------
    basis : array, shape (..., d, r)
        Orthonormal columns spanning the top-``r`` eigenspace.
    eigenvalues : array, shape (..., d)
        All eigenvalues, in descending order.
    dropped : array, shape (...)
        Sum of the ``d - r`` smallest eigenvalues, each clamped at 0.
    """

    basis: Any
    eigenvalues: Any
    dropped: Any


def pca_truncate(C, r: int) -> PCAResult:
    r"""Top-``r`` principal subspace of a (batched) symmetric PSD matrix.

    Parameters
    ----------
    C : array, shape (..., d, d)
        Symmetric positive semidefinite matrices, e.g. the uncentred second
        moments :math:`Y^\top Y` of each attention head's value outputs.
        Leading dimensions are a batch (all heads of a layer in one call).
    r : int
        Number of components to keep, ``0 <= r <= d``.

    Returns
    -------
    PCAResult
        ``basis`` (..., d, r), ``eigenvalues`` (..., d) descending and
        ``dropped`` (...). All in float64 (float32 on devices without float64),
        on the library and device of ``C``.

    Raises
    ------
    ValueError
        If ``C`` is not square, not symmetric within a dtype tolerance, holds
        NaN/Inf, or ``r`` is outside ``[0, d]``.

    Notes
    -----
    FLAT-LLM (Tian et al., 2025), Theorem 4.1: for :math:`Y \in \mathbb{R}^{N\times d}`
    and :math:`C = Y^\top Y = Q \Lambda Q^\top`, projecting onto the top-``r``
    eigenvectors :math:`Q_r` gives

    .. math:: \|Y - Y Q_r Q_r^\top\|_F^2 = \sum_{i>r} \lambda_i ,

    and Corollary 4.2 sums this over heads. ``dropped`` is that sum. Eigenvectors
    are unique only up to sign (and rotation within repeated eigenvalues):
    compare ``basis @ basis.T`` projectors, not columns.

    On torch CUDA a batch of 33 x 33 to 128 x 128 matrices goes to
    cuSOLVER's batched Jacobi solver through CuPy, when it is installed (torch
    itself solves such a batch one matrix at a time); its answer is kept only if
    its backward error is at rounding level, else torch's ``eigh`` is used.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> Y = np.random.default_rng(0).standard_normal((100, 8))
    >>> res = lrmath.pca_truncate(Y.T @ Y, 3)
    >>> Q = res.basis
    >>> bool(np.isclose(np.sum((Y - Y @ Q @ Q.T) ** 2), res.dropped))
    True
    """
    xp = check_symmetric("C", C)
    d = C.shape[-1]
    r = check_rank("r", r, d)
    Cw = as_work(C, xp)
    Cw = (Cw + xp.matrix_transpose(Cw)) / 2  # exact symmetry for eigh
    evals, evecs = eigh(Cw, xp)  # a CUDA batch of heads takes cuSOLVER's batched Jacobi solver, checked
    evals = xp.flip(evals, axis=-1)
    evecs = xp.flip(evecs, axis=-1)
    dropped = xp.sum(xp.maximum(evals[..., r:], 0.0), axis=-1)  # negative rounding of a PSD C counts 0
    return PCAResult(basis=evecs[..., :, :r], eigenvalues=evals, dropped=dropped)
