"""Activation-aware (whitened) truncated SVD: the optimal rank-r weight for the data.

LatentLLM (Koike-Akino et al., 2025) with preconditioner ``P = C^{1/2}``;
SVD-LLM and FLAR-SVD (Thoma et al., 2025) with a Cholesky factor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_work, namespace
from ._validation import check_array, check_finite, check_rank
from .whitening import Whitener, whiten

__all__ = ["SVDResult", "whitened_svd"]


class SVDResult(NamedTuple):
    """Result of :func:`whitened_svd`.

    Attributes
    ----------
    left : array, shape (m, r)
        ``U_r Sigma_r^{1/2}``.
    right : array, shape (r, n)
        ``Sigma_r^{1/2} V_r^T S^+``; ``left @ right`` is the rank-``r`` weight.
    singular_values : array, shape (min(m, n),)
        All singular values of the whitened weight ``W S``, descending: every
        other rank's error is a tail sum of their squares.
    dropped : array, shape ()
        ``sum_{i>r} sigma_i^2 = ||(W - left right) S||_F^2``, the weighted error.
    whitener : Whitener
        The whitening used (its record says which damping / fallback).
    """

    left: Any
    right: Any
    singular_values: Any
    dropped: Any
    whitener: Whitener


def whitened_svd(W, C, r: int, *, whitening: str = "sqrt", damping: float = 0.0) -> SVDResult:
    r"""Rank-``r`` minimiser of ``||(W - left right) X||_F^2`` given ``C = X X^T``.

    Parameters
    ----------
    W : array, shape (m, n)
        Weight of a linear layer ``y = W x``.
    C : array, shape (n, n), or Whitener
        Second moment of the layer's inputs, ``X X^T`` (any positive scale:
        the minimiser does not depend on it). A :class:`~lrmath.Whitener` from
        :func:`lrmath.whiten` may be passed instead, e.g. to share one
        factorisation among q, k and v; ``whitening`` and ``damping`` are then
        ignored.
    r : int
        Rank kept, ``0 <= r <= min(m, n)``.
    whitening : {"sqrt", "cholesky", "eigh"}, default "sqrt"
        Factor ``S`` with ``S S^T = C + delta I`` (see :func:`lrmath.whiten`).
        All give the same optimum; ``sqrt`` and ``eigh`` need no damping on
        rank-deficient ``C``.
    damping : float, default 0.0
        Relative damping: ``delta = damping * mean(diag C)``.

    Returns
    -------
    SVDResult
        ``left`` (m, r), ``right`` (r, n), ``singular_values`` (min(m, n),),
        ``dropped`` (), ``whitener``; float64 (float32 on devices without it)
        on the library and device of ``W``.

    Raises
    ------
    ValueError
        Bad ``C`` / ``whitening`` / ``damping`` (see :func:`lrmath.whiten`);
        ``W`` not 2-D, not finite, or with a column count other than ``n``;
        ``r`` outside ``[0, min(m, n)]``.
    TypeError
        ``W`` and ``C`` from different array libraries.

    Notes
    -----
    With ``S S^T = C`` and ``A = W - \hat W``,
    ``||A X||_F^2 = tr(A C A^T) = ||A S||_F^2``, so (LatentLLM Sec. 2,
    FLAR-SVD Sec. 2) the problem is Eckart-Young for ``W S = U Sigma V^T``:

    .. math:: \min_{\mathrm{rank}\,\hat W \le r} \|(W - \hat W) X\|_F^2 = \sum_{i>r} \sigma_i^2,
              \qquad \hat W = U_r \Sigma_r V_r^\top S^{+}.

    *Singular S.* For PSD ``C`` the eigen forms give a singular ``S``. The right
    singular vectors with ``sigma_i > 0`` are ``v_i = S^T W^T u_i / sigma_i``, so
    they lie in ``range(S^T)``, on which ``S^+ S`` is the identity. Hence
    ``\hat W S = U_r Sigma_r V_r^T`` exactly and the pseudo-inverse still attains
    the optimum; ``\hat W`` has no component in ``null(C)``, where the data give
    no information.

    *Balanced split.* ``left = U_r Sigma_r^{1/2}`` and
    ``right = Sigma_r^{1/2} V_r^T S^+`` give ``left^T left = Sigma_r =
    (right S)(right S)^T``: both factors carry the same scale (no overflow or
    underflow when cast to float16 / bfloat16) and this split minimises
    ``||left||_F^2 + ||right S||_F^2`` among all factorisations of ``\hat W``.
    Any junction ``left J, J^{-1} right`` (:func:`lrmath.block_identity`) keeps
    the product.

    With damping, ``S S^T = C + delta I`` and ``dropped`` is the error in that
    metric, ``||(W - \hat W) X||_F^2 + delta ||W - \hat W||_F^2``.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((6, 5)), rng.standard_normal((5, 40))
    >>> res = lrmath.whitened_svd(W, X @ X.T, 2)
    >>> err = np.sum(((W - res.left @ res.right) @ X) ** 2)
    >>> bool(np.isclose(err, res.dropped))
    True
    """
    check_array("W", W, ndim=2)
    whitener = C if isinstance(C, Whitener) else None
    xp = namespace(W, whitener.factor if whitener is not None else C)
    check_finite("W", W, xp)
    if whitener is None:
        whitener = whiten(C, method=whitening, damping=damping)
    m, n = W.shape
    if n != whitener.dim:
        raise ValueError(f"W must have as many columns as C has rows ({whitener.dim}), got shape {tuple(W.shape)}")
    r = check_rank("r", r, min(m, n))
    WS = whitener.apply(as_work(W, xp))
    U, sigma, Vt = xp.linalg.svd(WS, full_matrices=False)
    root = xp.sqrt(sigma[:r])
    left = U[:, :r] * root
    right = whitener.solve(root[:, None] * Vt[:r, :])
    dropped = xp.sum(sigma[r:] ** 2)
    return SVDResult(left=left, right=right, singular_values=sigma, dropped=dropped, whitener=whitener)
