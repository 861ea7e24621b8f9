"""Kernels of :mod:`lrmath.nystrom`: the refits, the PSD check and the output-aware elimination.

The least-squares refit ``R = C[:, S] (C[S, S] + lam I)^{-1}`` (and ``W R``
without ``R``), the PSD check by a Cholesky factor, ``(C + lam I)^{-1}`` and the
greedy backward elimination with exact joint downdates (``method="obs"``);
:mod:`lrmath.nystrom` validates the inputs and wraps the results.
"""

from __future__ import annotations

from ._backend import cholesky_or_none, device_of, is_torch, solve_triangular, sub_matmul_
from ._validation import dtype_eps


class RidgeTooSmallError(ValueError):
    """The ridge is below the rounding (or the negative part) of ``C``: the regularised matrix has no Cholesky factor.

    Raised by :func:`lrmath.nystrom_select`, :func:`lrmath.nystrom_refit`,
    :func:`lrmath.nystrom_fold` and :func:`lrmath.obs_path`; a larger ``ridge``
    is the remedy (at ``ridge=0``: any positive one).
    """


def _psd_by_cholesky(Cw, psd_rtol, xp) -> bool:
    r"""True if ``C + psd_rtol * m I`` has a Cholesky factor, ``m <= mu_max`` a lower bound.

    A factor proves every eigenvalue is above ``-psd_rtol m >= -psd_rtol mu_max``,
    so the eigenvalue test would pass too; False only means "undecided" (the
    caller then computes the eigenvalues). ``m`` is the larger of the largest
    diagonal entry and a Rayleigh quotient after a few power steps, both at
    most ``mu_max``.
    """
    d = Cw.shape[-1]
    diag = xp.linalg.diagonal(Cw)
    v = xp.abs(diag) + 1.0 / d  # a start with weight on the dominant channels
    for _ in range(8):
        w = Cw @ v
        norm = float(xp.sqrt(xp.sum(w * w)))
        if not norm > 0:
            break
        v = w / norm
    scale = max(float(xp.max(diag)), float(xp.sum(v * (Cw @ v)) / xp.sum(v * v)), 0.0)
    if scale == 0.0:
        return False
    eye = xp.eye(d, dtype=Cw.dtype, device=device_of(Cw))
    return cholesky_or_none(Cw + (psd_rtol * scale) * eye, xp) is not None


def _ridge_inverse(Cw, lam, xp):
    """``(C + lam I)^{-1}`` from a Cholesky factor (``lam > 0``; ``C`` already checked PSD)."""
    d = Cw.shape[-1]
    eye = xp.eye(d, dtype=Cw.dtype, device=device_of(Cw))
    L = cholesky_or_none(Cw + lam * eye, xp)
    if L is None:  # only when lam is below the rounding of C's smallest eigenvalues
        raise RidgeTooSmallError(f"C + lam I is numerically indefinite (lam = {lam:.3g}); use a larger ridge")
    if is_torch(xp):
        import torch

        return torch.cholesky_inverse(L)  # LAPACK potri: half the work of two triangular solves
    Linv = solve_triangular(L, eye, lower=True, xp=xp)
    return xp.matrix_transpose(Linv) @ Linv


def _obs_eliminate(Cw, Kinv, W, k, lam, xp):
    """Kept indices (ascending int64) and ``(removed, counts, objective)`` of greedy backward elimination.

    The three arrays are the fields of :class:`lrmath.EliminationPath`.
    """
    d = Cw.shape[-1]
    dev = device_of(Cw)
    # the optimal refit with every channel kept, W C K^-1 = W - lam W K^-1 (C = K - lam I): one
    # product; and J = tr(W C W^T) - tr(W C K^-1 C W^T) = lam tr(W C K^-1 W^T), free of cancellation
    WS = -lam * Kinv if W is None else -lam * (W @ Kinv)
    if W is None:
        WS = WS + xp.eye(d, dtype=Cw.dtype, device=dev)
        start = lam * float(xp.sum(xp.linalg.diagonal(WS)))
    else:
        WS = WS + W
        start = lam * float(xp.sum(WS * W))
    alive = xp.ones((d,), dtype=xp.bool, device=dev)
    inf = xp.asarray(float("inf"), dtype=Cw.dtype, device=dev)
    to_remove = d - k
    block = max(1, -(-to_remove // _OBS_ROUNDS))
    removed, counts, objective = [], [d], [max(start, 0.0)]
    while to_remove > 0:
        b = min(block, to_remove)
        diag = xp.linalg.diagonal(Kinv)
        cost = xp.sum(WS**2, axis=0) / xp.where(diag > 0, diag, 1.0)
        cost = xp.where(alive & (diag > 0), cost, inf)  # removed or lost to rounding
        B = xp.argsort(cost, stable=True)[:b]
        # joint downdate: Kinv <- Kinv - Kinv[:, B] Kinv[B, B]^-1 Kinv[B, :], same for W_S
        rows = xp.take(Kinv, B, axis=0)
        L = cholesky_or_none(xp.take(rows, B, axis=1), xp)
        if L is None:  # rounding made the block indefinite: take the cheapest channel alone
            B, b = B[:1], 1
            rows = xp.take(Kinv, B, axis=0)
            L = xp.sqrt(xp.take(rows, B, axis=1))
        G = solve_triangular(L, rows, lower=True, xp=xp)  # L^-1 Kinv[B, :]
        H = solve_triangular(L, xp.matrix_transpose(xp.take(WS, B, axis=1)), lower=True, xp=xp)
        sub_matmul_(Kinv, xp.matrix_transpose(G), G, xp)  # in place: both are this function's own arrays
        sub_matmul_(WS, xp.matrix_transpose(H), G, xp)
        alive = alive & ~xp.any(xp.arange(d, device=dev)[None, :] == B[:, None], axis=0)
        to_remove -= b
        removed.append(B)
        counts.append(counts[-1] - b)
        objective.append(objective[-1] + float(xp.sum(H**2)))  # the block's exact joint increase
    order = xp.concat(removed) if removed else xp.zeros((0,), dtype=xp.int64, device=dev)
    path = (xp.astype(order, xp.int64), xp.asarray(counts, dtype=xp.int64, device=dev),
            xp.asarray(objective, dtype=Cw.dtype, device=dev))
    return xp.astype(xp.nonzero(alive)[0], xp.int64), path


# rounds of the elimination: each removes the ceil((d - k) / rounds) cheapest channels jointly
_OBS_ROUNDS = 64


def _refit(Cw, indices, lam, trace, Ww, xp):
    """``(R, error, objective, weighted_error)`` for the kept ``indices`` (ascending); see :class:`lrmath.NystromResult`."""
    d, k = Cw.shape[-1], int(indices.shape[0])
    dev = device_of(Cw)
    if k == 0:
        zero = xp.asarray(trace, dtype=Cw.dtype, device=dev)
        R0 = xp.zeros((d, 0), dtype=Cw.dtype, device=dev)
        return R0, zero, zero, _weighted_error(Cw, Ww, R0, indices, xp)
    C_rows, L = _kept_factor(Cw, indices, lam, xp)
    Y = solve_triangular(L, C_rows, lower=True, xp=xp)  # L^-1 C[S, :]
    Rt = solve_triangular(xp.matrix_transpose(L), Y, lower=False, xp=xp)
    R = xp.matrix_transpose(Rt)
    objective = xp.clip(trace - xp.sum(Y**2), min=0.0)
    error = xp.clip(objective - lam * xp.sum(R**2), min=0.0)
    return R, error, objective, _weighted_error(Cw, Ww, R, indices, xp)


def _weighted_error(Cw, W, R, indices, xp):
    """``tr(W E W^T)``, ``E = C - C_{:S} R^T - R C_{S:} + R C_{SS} R^T``: the refit's output error."""
    if W is None:
        return None
    WC = W @ Cw
    WR = W @ R
    WCs = xp.take(WC, indices, axis=1)  # W C_{:S}
    Css = xp.take(xp.take(Cw, indices, axis=0), indices, axis=1)
    err = xp.sum(WC * W) - 2.0 * xp.sum(WCs * WR) + xp.sum((WR @ Css) * WR)
    return xp.clip(err, min=0.0)


def _kept_factor(Cw, indices, lam, xp):
    """``C[S, :]`` and the lower Cholesky factor of ``C[S, S] + lam I`` (``S`` non-empty)."""
    k = int(indices.shape[0])
    C_rows = xp.take(Cw, indices, axis=0)  # C[S, :]
    K = xp.take(C_rows, indices, axis=1) + lam * xp.eye(k, dtype=Cw.dtype, device=device_of(Cw))
    L = cholesky_or_none(K, xp)
    if L is not None and lam == 0:
        # a Cholesky of a singular C[S, S] can succeed on rounding noise: refuse tiny pivots
        pivots = xp.linalg.diagonal(L) ** 2
        if float(xp.min(pivots)) <= 10.0 * k * dtype_eps(Cw.dtype) * float(xp.max(xp.linalg.diagonal(K))):
            L = None
    if L is None:
        if lam == 0:
            raise RidgeTooSmallError("ridge: C[S, S] is numerically singular for the selected channels; "
                                     "use ridge > 0")
        raise RidgeTooSmallError(
            f"ridge: C[S, S] + lam I is not numerically positive definite for the selected channels "
            f"(lam = {lam:.3g}): C is singular there and rounded below -lam (e.g. a float32-accumulated "
            "Gram of fewer samples than channels); use a larger ridge")
    return C_rows, L


def _fold(Cw, indices, lam, W, xp):
    """``W C[:, S] (C[S, S] + lam I)^{-1}`` (m, k) with ``m`` right-hand sides, ``R`` never formed."""
    m, k = W.shape[0], int(indices.shape[0])
    if k == 0:
        return xp.zeros((m, 0), dtype=Cw.dtype, device=device_of(Cw))
    C_rows, L = _kept_factor(Cw, indices, lam, xp)
    Z = solve_triangular(L, C_rows @ xp.matrix_transpose(W), lower=True, xp=xp)  # L^-1 C[S, :] W^T
    return xp.matrix_transpose(solve_triangular(xp.matrix_transpose(L), Z, lower=False, xp=xp))
