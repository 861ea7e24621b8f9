"""Nystrom channel selection by ridge leverage scores (FLAT-LLM appendix C, MoDeGPT)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_work, cholesky_or_none, device_of, solve_triangular
from ._validation import check_array, check_nonnegative_scalar, check_rank, check_symmetric, dtype_eps

__all__ = ["NystromResult", "nystrom_select"]


class NystromResult(NamedTuple):
    """Result of :func:`nystrom_select`.

    Attributes
    ----------
    indices : array, shape (k,)
        Kept channels, ascending (int64). The top-``k`` sets are nested in ``k``.
    scores : array, shape (d,)
        Ridge leverage scores ``diag(C (C + lam I)^-1)``, each in ``[0, 1]``.
    reconstruction : array, shape (d, k)
        ``R = C[:, S] (C[S, S] + lam I)^-1``: all channels from the kept ones, ``h ~ R h[S]``.
    error : array, shape ()
        ``||H - R H[S]||_F^2`` for ``C = H H^T``: the channel reconstruction error of ``R``.
    objective : array, shape ()
        ``error + lam ||R||_F^2 = tr C - tr(C[:, S] (C[S, S] + lam I)^-1 C[S, :])``,
        the ridge objective ``R`` minimises (the Nystrom error when ``lam = 0``).
    lam : float
        The absolute ridge ``lam = ridge * tr(C) / d``.
    """

    indices: Any
    scores: Any
    reconstruction: Any
    error: Any
    objective: Any
    lam: float


def nystrom_select(C, k: int, *, ridge: float = 1e-2) -> NystromResult:
    r"""Keep the ``k`` channels with the largest ridge leverage scores; refit the rest from them.

    Parameters
    ----------
    C : array, shape (d, d)
        Symmetric PSD second moment ``H H^T`` of the channels, e.g. the
        inputs ``h`` (d_ff, N) of an MLP's down projection.
    k : int
        Channels kept, ``0 <= k <= d``.
    ridge : float, default 1e-2
        Relative ridge: ``lam = ridge * tr(C) / d`` (a fraction of the mean
        eigenvalue). ``0`` gives plain leverage scores and the exact Nystrom
        refit, which needs a nonsingular ``C[S, S]``.

    Returns
    -------
    NystromResult
        ``indices``, ``scores``, ``reconstruction``, ``error``, ``objective``
        (float64, or float32 on devices without it, on the library and
        device of ``C``) and ``lam``.

    Raises
    ------
    ValueError
        ``C`` not square, not symmetric, non-finite or not PSD within
        rounding; ``k`` outside ``[0, d]``; ``ridge`` negative or non-finite;
        ``ridge = 0`` with a numerically singular ``C[S, S]``.

    Notes
    -----
    FLAT-LLM (Tian et al., 2025), appendix C, after MoDeGPT: for an MLP
    ``y = W_down h`` with ``C = sum h h^T``, keep the rows ``S`` of
    ``W_gate`` / ``W_up`` with the largest ridge leverage scores

    .. math:: \tau_i(\lambda) = [C (C + \lambda I)^{-1}]_{ii}
              = \sum_j \frac{\mu_j}{\mu_j + \lambda} u_{ij}^2 ,
              \qquad C = U \operatorname{diag}(\mu) U^\top ,

    and replace ``W_down`` by ``W_down R`` (d_out, k). The scores are formed
    from the eigen form above: non-negative terms, no cancellation, no
    inverse. ``R`` minimises the ridge least-squares objective

    .. math:: J(M) = \|H - M H_S\|_F^2 + \lambda \|M\|_F^2 , \qquad
              (C_{SS} + \lambda I) R^\top = C_{S:} ,

    solved with a Cholesky factor of ``C_SS + lam I`` and two triangular
    solves (no explicit inverse), and :math:`J(R) = \operatorname{tr} C -
    \operatorname{tr}(C_{:S} (C_{SS} + \lambda I)^{-1} C_{S:})`. ``J(R)`` is
    non-increasing as channels are added (the old ``M`` padded with a zero
    column is feasible), and at ``lam = 0``, ``k = d`` the map is the identity.
    Since ``J(R) <= J(0) = tr C``, :math:`\|R\|_F^2 \le d / \mathrm{ridge}`.

    *Relative ridge.* The reference code uses ``lam = 1`` on an unnormalised
    sum over tokens (effectively zero) and an undamped inverse in the refit.
    With fewer calibration tokens than channels ``C_SS`` is singular and the
    refit explodes (perplexity ~1e10 on SmolLM2-135M with 1,024 tokens);
    ``lam = ridge * tr(C) / d`` keeps ``||R||`` bounded and makes the result
    invariant to the scale of ``C`` (number of tokens, normalisation).

    With ``ridge = 0`` the scores are the diagonal of the projector onto
    ``range(C)``: eigenvalues at or below ``10 d eps mu_max`` count as zero.
    Ties in the scores go to the lower channel index.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> H = np.random.default_rng(0).standard_normal((6, 50))
    >>> res = lrmath.nystrom_select(H @ H.T, 4)
    >>> res.indices.shape, res.reconstruction.shape
    ((4,), (6, 4))
    >>> err = np.sum((H - res.reconstruction @ H[res.indices]) ** 2)
    >>> bool(np.isclose(err, res.error))
    True
    """
    check_array("C", C, ndim=2)
    xp = check_symmetric("C", C)
    d = C.shape[-1]
    k = check_rank("k", k, d)
    ridge = check_nonnegative_scalar("ridge", ridge)
    Cw = as_work(C, xp)
    Cw = (Cw + xp.matrix_transpose(Cw)) / 2
    dev = device_of(Cw)

    mu, U = xp.linalg.eigh(Cw)
    mu_max = max(float(xp.max(xp.abs(mu))), 0.0)
    rounding = 10.0 * d * dtype_eps(Cw.dtype) * mu_max
    if float(mu[0]) < -rounding:
        raise ValueError(f"C is not positive semidefinite: eigenvalue {float(mu[0]):.3g} "
                         f"below -{rounding:.3g} (rounding level)")
    trace = float(xp.sum(xp.linalg.diagonal(Cw)))
    lam = ridge * trace / d
    mu = xp.clip(mu, min=0.0)
    if lam > 0:
        weights = mu / (mu + lam)
    else:  # projector onto range(C): a rank decision at the rounding level
        weights = xp.astype(mu > rounding, Cw.dtype)
    scores = (U**2) @ weights

    order = xp.argsort(-scores, stable=True)  # descending, ties to the lower index
    indices = xp.sort(order[:k])
    if k == 0:
        zero = xp.asarray(trace, dtype=Cw.dtype, device=dev)
        return NystromResult(indices=indices, scores=scores,
                             reconstruction=xp.zeros((d, 0), dtype=Cw.dtype, device=dev),
                             error=zero, objective=zero, lam=lam)
    C_rows = xp.take(Cw, indices, axis=0)  # C[S, :]
    K = xp.take(C_rows, indices, axis=1) + lam * xp.eye(k, dtype=Cw.dtype, device=dev)
    L = cholesky_or_none(K, xp)
    if L is not None and lam == 0:
        # a Cholesky of a singular C[S, S] can succeed on rounding noise: refuse tiny pivots
        pivots = xp.linalg.diagonal(L) ** 2
        if float(xp.min(pivots)) <= 10.0 * k * dtype_eps(Cw.dtype) * float(xp.max(xp.linalg.diagonal(K))):
            L = None
    if L is None:
        raise ValueError("ridge: C[S, S] + lam I is numerically singular for the selected channels "
                         f"(lam = {lam:.3g}); use ridge > 0")
    Y = solve_triangular(L, C_rows, lower=True, xp=xp)  # L^-1 C[S, :]
    Rt = solve_triangular(xp.matrix_transpose(L), Y, lower=False, xp=xp)
    R = xp.matrix_transpose(Rt)
    objective = xp.clip(trace - xp.sum(Y**2), min=0.0)
    error = xp.clip(objective - lam * xp.sum(R**2), min=0.0)
    return NystromResult(indices=indices, scores=scores, reconstruction=R, error=error,
                         objective=objective, lam=lam)

