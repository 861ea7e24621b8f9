"""Junction matrices and the block-identity form of a low-rank pair (LatentLLM, Sec. 3).

A rank-``r`` factorisation ``left @ right`` is unique only up to an invertible
``J``: ``(left J)(J^{-1} right)`` is the same matrix.  Choosing ``J`` as an
``r x r`` column block of ``right`` puts an exact identity there, which need
not be stored or multiplied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._backend import as_work, column_pivots, device_of, from_numpy, namespace
from ._validation import check_array, check_finite, dtype_eps

__all__ = ["BlockIdentity", "block_identity", "junction"]


class BlockIdentity(NamedTuple):
    """Result of :func:`block_identity`; unpacks as ``left, right, columns``.

    Attributes
    ----------
    left : array, shape (m, r)
        ``left @ J``.
    right : array, shape (r, n)
        ``J^{-1} @ right`` with ``right[:, columns]`` exactly the identity.
    columns : array of int, shape (r,)
        Ascending column indices of the identity block.
    """

    left: Any
    right: Any
    columns: Any


def junction(left, right, J):
    r"""Re-split ``left @ right`` through an invertible junction ``J``: ``(left J, J^{-1} right)``.

    Parameters
    ----------
    left : array, shape (m, r)
    right : array, shape (r, n)
    J : array, shape (r, r)
        Invertible.

    Returns
    -------
    tuple of arrays
        ``(left @ J, solve(J, right))`` in float64 on the inputs' device; the
        product is unchanged up to rounding of order ``eps * cond(J)``.

    Raises
    ------
    ValueError
        Shapes that do not chain, NaN/Inf, or an exactly singular ``J``.

    Notes
    -----
    LatentLLM writes the truncated SVD of ``W P`` as ``B = U S J``,
    ``A = J^+ V P^+``; any invertible ``J`` leaves ``B A`` and hence the
    truncation error unchanged. ``J^{-1} right`` is a linear solve, not an
    explicit inverse.
    """
    xp = _check_pair(left, right)
    check_array("J", J, ndim=2)
    r = left.shape[1]
    if tuple(J.shape) != (r, r):
        raise ValueError(f"J must have shape ({r}, {r}), got {tuple(J.shape)}")
    namespace(left, J)
    check_finite("J", J, xp)
    left, right, J = as_work(left, xp), as_work(right, xp), as_work(J, xp)
    try:
        right2 = xp.linalg.solve(J, right)
    except Exception as exc:  # numpy LinAlgError, torch linalg error
        raise ValueError(f"J is singular: {exc}") from None
    return left @ J, right2


def block_identity(left, right) -> BlockIdentity:
    r"""Junction that turns ``r`` columns of ``right`` into an exact identity.

    Parameters
    ----------
    left : array, shape (m, r)
    right : array, shape (r, n)
        Full row rank, ``r <= n`` (e.g. the factors of :func:`lrmath.whitened_svd`).

    Returns
    -------
    BlockIdentity
        ``(left2, right2, columns)`` with ``left2 @ right2 == left @ right`` up
        to rounding, ``right2[:, columns]`` exactly the identity, float64 on the
        inputs' device; ``columns`` is an int array there too.

    Raises
    ------
    ValueError
        Shapes that do not chain, ``r > n``, NaN/Inf, or ``right`` without
        full row rank (``|R_rr| <= max(r, n) eps |R_11|`` in its pivoted QR).

    Notes
    -----
    LatentLLM, Sec. 3.2: split ``V P^+ = [V_1 V_2]`` and pick ``J = V_1`` to get
    ``A = [I, V_1^{-1} V_2]``. Here ``V_1`` is the column block chosen by a
    column-pivoted QR ``right Pi = Q [R_11 R_12]`` (LAPACK ``geqp3``), so that
    ``J = Q R_11`` is as well conditioned as greedy pivoting allows and
    ``J^{-1} right`` restricted to the other columns is ``R_11^{-1} R_12``:
    since pivoting makes ``|R_ij| <= |R_ii|``, back substitution bounds every
    entry of ``right2`` by ``2^{r-1}`` (usually O(1)).

    The product changes only by rounding: the computed ``J^{-1} right`` is
    backward stable, and overwriting its ``columns`` with the exact identity
    replaces ``J^{-1} J`` by what exact arithmetic gives; the error is of order
    ``r eps ||left|| ||J|| ||right2|| <= r eps cond(J) ||left|| ||right||``.

    Storage: ``left2`` (``m r``) plus the non-identity columns of ``right2``
    (``r (n - r)``), ``r (m + n - r) = m n - (m - r)(n - r)``: below ``m n``
    whenever ``r < min(m, n)``.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> rng = np.random.default_rng(0)
    >>> B, A = rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
    >>> B2, A2, cols = lrmath.block_identity(B, A)
    >>> bool(np.allclose(B2 @ A2, B @ A)), bool((A2[:, cols] == np.eye(2)).all())
    (True, True)
    """
    xp = _check_pair(left, right)
    r, n = right.shape
    if r > n:
        raise ValueError(f"right has more rows ({r}) than columns ({n}): no {r} x {r} identity block fits")
    eps = dtype_eps(right.dtype) if xp.isdtype(right.dtype, "real floating") else dtype_eps(xp.float64)
    left, right = as_work(left, xp), as_work(right, xp)
    pivots, R_diag = column_pivots(right, r)
    if r > 0 and R_diag[r - 1] <= max(r, n) * eps * R_diag[0]:
        raise ValueError(f"right does not have full row rank {r}: reduce r or drop zero rows")
    columns = np.sort(pivots)
    cols = from_numpy(columns, right, xp)
    J = xp.take(right, cols, axis=1)
    right2 = xp.linalg.solve(J, right)
    # Overwrite the identity block with exact zeros and ones (the array API has no scatter).
    position = np.full(n, -1, dtype=np.int64)
    position[columns] = np.arange(r)
    pos = from_numpy(position, right, xp)
    rows = xp.arange(r, dtype=pos.dtype, device=device_of(pos))
    identity = xp.astype(rows[:, None] == pos[None, :], right2.dtype)
    right2 = xp.where(pos[None, :] >= 0, identity, right2)
    return BlockIdentity(left=left @ J, right=right2, columns=cols)


def _check_pair(left, right):
    check_array("left", left, ndim=2)
    check_array("right", right, ndim=2)
    xp = namespace(left, right)
    if left.shape[1] != right.shape[0]:
        raise ValueError(
            f"left (shape {tuple(left.shape)}) and right (shape {tuple(right.shape)}) do not chain: "
            "left must have as many columns as right has rows"
        )
    check_finite("left", left, xp)
    check_finite("right", right, xp)
    return xp

