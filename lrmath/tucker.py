"""Joint subspaces of a stack of matrices: Tucker-2 by HOSVD then HOOI (LatentLLM joint QK / VO)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_work, device_of, namespace
from ._validation import check_array, check_finite, check_nonnegative_scalar, check_rank, check_int

__all__ = ["JointSubspaces", "joint_subspaces"]


class JointSubspaces(NamedTuple):
    """Result of :func:`joint_subspaces`.

    Attributes
    ----------
    A : array, shape (r1, d1)
        Orthonormal rows: the shared left (e.g. query-side) latent map.
    B : array, shape (r2, d2)
        Orthonormal rows: the shared right (e.g. key-side) latent map.
    H : array, shape (h, r1, r2)
        Cores: the approximation is ``G_i ~ A^T H_i B``.
    A_dual, B_dual : array, shape (r1, d1) and (r2, d2)
        Maps that produce the cores from the data, ``H_i = A_dual G_i B_dual^T``,
        with ``A A_dual^T = I``. Equal to ``A`` and ``B`` without ``weights``.
    objective : array, shape (iterations + 1,)
        ``sum_i ||P1^T (G_i - A^T H_i B) P2||_F^2`` after the HOSVD
        initialisation and after each HOOI sweep (``P = I`` without weights);
        non-increasing.
    converged : bool
        Whether the relative gain in captured energy fell to ``tol`` or below.
    iterations : int
        HOOI sweeps performed.
    """

    A: Any
    B: Any
    H: Any
    A_dual: Any
    B_dual: Any
    objective: Any
    converged: bool
    iterations: int


def joint_subspaces(G, ranks, *, weights=None, max_iter: int = 50, tol: float = 1e-10) -> JointSubspaces:
    r"""Shared row and column subspaces of a stack ``G_i`` (Tucker-2: HOSVD, then HOOI).

    Parameters
    ----------
    G : array of shape (h, d1, d2), or a pair ``(Wq, Wk)``
        The stack ``G_i``. A pair of arrays ``Wq`` (h, p, d1) and ``Wk``
        (h, p, d2) means ``G_i = Wq_i^T Wk_i`` (LatentLLM's joint QK, one pair
        per head); the ``d1 x d2`` products are then never formed.
    ranks : int or (int, int)
        ``(r1, r2)`` with ``0 <= r1 <= d1``, ``0 <= r2 <= d2``; an int sets both.
    weights : None or (P1, P2)
        Bilateral weighting: minimise ``sum_i ||P1^T (G_i - Ghat_i) P2||_F^2``.
        Each ``P`` is a square factor with ``P P^T = C`` (a symmetric
        ``C^{1/2}``, a Cholesky factor, or a :class:`~lrmath.Whitener`, whose
        ``factor`` is used and whose pseudo-inverse maps back); ``None`` for a
        side means the identity. Array weights must be nonsingular (damp ``C``).
    max_iter : int, default 50
        Maximum number of HOOI sweeps after the HOSVD initialisation (0: HOSVD only).
    tol : float, default 1e-10
        Stop when the captured energy grows by at most ``tol`` relative to itself.

    Returns
    -------
    JointSubspaces
        ``A``, ``B``, ``H``, ``A_dual``, ``B_dual`` in float64 (float32 on
        devices without float64) on the library and device of ``G``, the
        ``objective`` trace, ``converged`` and ``iterations``.

    Raises
    ------
    ValueError
        ``G`` (or a factor) with the wrong shape or non-finite values;
        ``ranks`` outside the ranges above; ``weights`` of the wrong shape,
        non-finite or singular; a negative ``max_iter`` or ``tol``.

    Notes
    -----
    LatentLLM (Koike-Akino et al., 2025), Sec. 4 and Algorithm 1: approximate
    every head's bilinear form ``G_i = W_{q,i}^T W_{k,i}`` by
    :math:`\hat G_i = A^\top H_i B` with shared latent maps. For orthonormal
    rows the best cores are :math:`H_i = A G_i B^\top` and

    .. math:: \sum_i \|G_i - A^\top H_i B\|_F^2 = \sum_i \|G_i\|_F^2 - \sum_i \|A G_i B^\top\|_F^2 .

    *Initialisation (HOSVD):* ``A`` = top-``r1`` eigenvectors of
    :math:`\sum_i G_i G_i^\top`, ``B`` = top-``r2`` of :math:`\sum_i G_i^\top G_i`.
    *Sweep (HOOI):* ``A`` = top-``r1`` eigenvectors of
    :math:`\sum_i G_i B^\top B G_i^\top`, then ``B`` = top-``r2`` of
    :math:`\sum_i G_i^\top A^\top A G_i`. By Ky Fan's theorem each update
    maximises the captured energy :math:`E = \sum_i \|A G_i B^\top\|_F^2` over its
    block with the other fixed, so ``E`` never decreases and the objective
    never increases.

    *Stopping rule.* The objective is a difference of nearly equal numbers
    when the fit is good, so differencing objectives measures rounding noise.
    The sweep stops on the growth of the captured energy instead,
    :math:`(E_k - E_{k-1}) \le \mathrm{tol}\, E_k`; ``E`` is a sum of squares of the
    cores, accurate to a few ulps, so the test cannot suffer cancellation. The
    reported objective is ``max(||G||^2 - E, 0)``, accurate to about
    ``eps ||G||^2``.

    *Factors.* With ``G_i = Wq_i^T Wk_i`` (``p = d_h`` rows each), the update
    matrices are :math:`\sum_i Wq_i^\top (K_i K_i^\top) Wq_i` with
    :math:`K_i = Wk_i B^\top`; writing :math:`K_i K_i^\top = T_i^\top T_i` (QR of
    ``K_i^T``), the top eigenvectors are the top right singular vectors of the
    stacked ``T_i Wq_i``, which has ``h min(p, r2)`` rows: nothing of size
    ``d1 x d2`` is formed, and nothing of size ``d1 x d1`` when ``h p < d1``.

    *Weights.* The attention-map error :math:`\sum_i \|X^\top (G_i - \hat G_i) X\|_F^2`
    equals :math:`\sum_i \|P^\top (G_i - \hat G_i) P\|_F^2` for any ``P`` with
    ``P P^T = C = X X^T``. The problem is solved for
    :math:`G'_i = P_1^\top G_i P_2` (giving ``A'``, ``B'``, ``H'``) and mapped
    back: :math:`\hat G_i = (A' P_1^{-1})^\top H'_i (B' P_2^{-1})`. The rows of
    :math:`A' P_1^{-1}` are re-orthonormalised (``A' P_1^{-1} = R_1^T A``, QR), so
    ``A`` has orthonormal rows, :math:`H_i = R_1 H'_i R_2^\top` and
    :math:`A_{dual} = R_1 A' P_1^\top`. The compressed heads of joint QK are
    then :math:`B_{q,i} = W_{q,i} A_{dual}^\top` and
    :math:`B_{k,i} = W_{k,i} B_{dual}^\top`, the latent projections ``A x`` and
    ``B x``. ``objective`` is measured in the weighted norm.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> rng = np.random.default_rng(0)
    >>> Wq, Wk = rng.standard_normal((4, 2, 16)), rng.standard_normal((4, 2, 16))
    >>> res = lrmath.joint_subspaces((Wq, Wk), 8)
    >>> G = np.swapaxes(Wq, 1, 2) @ Wk
    >>> err = np.sum((G - res.A.T @ res.H @ res.B) ** 2)
    >>> bool(np.isclose(err, res.objective[-1]))
    True
    >>> bool(np.all(np.diff(res.objective) <= 1e-9 * np.sum(G**2)))
    True
    """
    stack, xp, (d1, d2) = _stack_from(G)
    r1, r2 = _parse_ranks(ranks, d1, d2)
    P1 = _parse_weight(weights, 0, d1, r1, stack.like)
    P2 = _parse_weight(weights, 1, d2, r2, stack.like)
    max_iter = check_int("max_iter", max_iter, 0)
    tol = check_nonnegative_scalar("tol", tol)
    stack = stack.weighted(_factor(P1), _factor(P2))

    total = float(stack.energy())
    A = _top_right(stack.hosvd_left(), r1, xp)
    B = _top_right(stack.hosvd_right(), r2, xp)
    H = stack.cores(A, B)
    captured = float(xp.sum(H**2))
    trace = [max(total - captured, 0.0)]
    converged = False
    sweeps = 0
    while sweeps < max_iter and not converged:
        A = _top_right(stack.left_update(B), r1, xp)
        B = _top_right(stack.right_update(A), r2, xp)
        H = stack.cores(A, B)
        gained = float(xp.sum(H**2))
        sweeps += 1
        # growth of a sum of squares: no cancellation, unlike differencing residuals
        converged = gained - captured <= tol * gained
        captured = gained
        trace.append(max(total - captured, 0.0))

    Adual, Bdual = A, B
    if P1 is not None:
        A, Adual, R1 = _map_back(A, P1, xp)
        H = R1 @ H
    if P2 is not None:
        B, Bdual, R2 = _map_back(B, P2, xp)
        H = H @ xp.matrix_transpose(R2)
    objective = xp.asarray(trace, dtype=H.dtype, device=device_of(H))
    return JointSubspaces(A=A, B=B, H=H, A_dual=Adual, B_dual=Bdual, objective=objective,
                          converged=converged, iterations=sweeps)


# ------------------------------------------------------------------ the two stack forms
class _Dense:
    """The stack ``G`` (h, d1, d2) itself."""

    def __init__(self, G, xp):
        self.G, self.xp = G, xp
        self.like = G

    def weighted(self, P1, P2):
        G = self.G
        if P1 is not None:
            G = self.xp.matrix_transpose(P1) @ G
        if P2 is not None:
            G = G @ P2
        return _Dense(G, self.xp)

    def energy(self):
        return self.xp.sum(self.G**2)

    def hosvd_left(self):  # sum_i G_i G_i^T = F^T F with F = [G_i^T]_i
        return self.xp.matrix_transpose(self.G)

    def hosvd_right(self):  # sum_i G_i^T G_i = F^T F with F = [G_i]_i
        return self.G

    def left_update(self, B):  # F = [B G_i^T]_i
        return B @ self.xp.matrix_transpose(self.G)

    def right_update(self, A):  # F = [A G_i]_i
        return A @ self.G

    def cores(self, A, B):
        return A @ self.G @ self.xp.matrix_transpose(B)


class _Factors:
    """The stack ``G_i = Wq_i^T Wk_i`` kept as its factors (h, p, d1) and (h, p, d2)."""

    def __init__(self, Wq, Wk, xp):
        self.Wq, self.Wk, self.xp = Wq, Wk, xp
        self.like = Wq

    def weighted(self, P1, P2):
        return _Factors(self.Wq if P1 is None else self.Wq @ P1,
                        self.Wk if P2 is None else self.Wk @ P2, self.xp)

    def energy(self):
        # ||Wq^T Wk||_F^2 = sum((Wq Wq^T) * (Wk Wk^T)): p x p products only
        xp = self.xp
        gq = self.Wq @ xp.matrix_transpose(self.Wq)
        gk = self.Wk @ xp.matrix_transpose(self.Wk)
        return xp.sum(gq * gk)

    def hosvd_left(self):
        return _gram_root(self.Wk, self.xp) @ self.Wq

    def hosvd_right(self):
        return _gram_root(self.Wq, self.xp) @ self.Wk

    def left_update(self, B):  # sum_i Wq_i^T (K K^T) Wq_i with K = Wk_i B^T
        return _gram_root(self.Wk @ self.xp.matrix_transpose(B), self.xp) @ self.Wq

    def right_update(self, A):
        return _gram_root(self.Wq @ self.xp.matrix_transpose(A), self.xp) @ self.Wk

    def cores(self, A, B):
        xp = self.xp
        return xp.matrix_transpose(self.Wq @ xp.matrix_transpose(A)) @ (self.Wk @ xp.matrix_transpose(B))


def _gram_root(K, xp):
    """``T`` (h, min(p, c), p) with ``T_i^T T_i = K_i K_i^T`` for ``K`` (h, p, c): R of a QR of ``K_i^T``."""
    if K.shape[-1] == 0:
        return xp.zeros((K.shape[0], 0, K.shape[1]), dtype=K.dtype, device=device_of(K))
    _, T = xp.linalg.qr(xp.matrix_transpose(K), mode="reduced")
    return T


def _top_right(F, r, xp):
    """Orthonormal rows (r, d) spanning the top-``r`` right singular subspace of the stacked ``F`` (h, n, d)."""
    d = F.shape[-1]
    F = xp.reshape(F, (-1, d))
    n = F.shape[0]
    if r == 0:
        return xp.zeros((0, d), dtype=F.dtype, device=device_of(F))
    if r <= n <= d:
        # short and wide (the factor case): SVD, no d x d matrix, no squared conditioning
        _, _, Vt = xp.linalg.svd(F, full_matrices=False)
        return Vt[:r, :]
    # tall, or fewer rows than r: eigenvectors of the d x d Gram (a full orthonormal basis)
    M = xp.matrix_transpose(F) @ F
    _, vecs = xp.linalg.eigh((M + xp.matrix_transpose(M)) / 2)
    return xp.matrix_transpose(xp.flip(vecs, axis=-1)[:, :r])


def _map_back(Ap, P, xp):
    """From the weighted solution ``A'`` to ``(A, A_dual, R)`` with ``A' P^-1 = R^T A`` and ``A`` orthonormal."""
    if hasattr(P, "factor"):  # a Whitener: its pseudo-inverse handles a singular factor
        At = P.solve(Ap)
        factor = P.factor
    else:
        try:
            At = xp.matrix_transpose(xp.linalg.solve(xp.matrix_transpose(P), xp.matrix_transpose(Ap)))
        except Exception as exc:  # numpy LinAlgError, torch linalg error
            raise ValueError("weights: a weight factor is singular; damp C or pass a Whitener") from exc
        factor = P
    if Ap.shape[0] == 0:
        return Ap, Ap, xp.zeros((0, 0), dtype=Ap.dtype, device=device_of(Ap))
    if not bool(xp.all(xp.isfinite(At))):
        raise ValueError("weights: a weight factor is numerically singular; damp C")
    Q, R = xp.linalg.qr(xp.matrix_transpose(At), mode="reduced")  # At = R^T Q^T
    # Ghat = At^T H' (...) = Q (R H' ...): A = Q^T, H = R H' R2^T, A_dual = R A' P^T
    return xp.matrix_transpose(Q), R @ Ap @ xp.matrix_transpose(factor), R


# ------------------------------------------------------------------------ validation
def _stack_from(G):
    if isinstance(G, (tuple, list)):
        if len(G) != 2:
            raise ValueError(f"G as factors must be a pair (Wq, Wk), got {len(G)} arrays")
        Wq, Wk = G
        check_array("G[0] (Wq)", Wq, ndim=3)
        check_array("G[1] (Wk)", Wk, ndim=3)
        xp = namespace(Wq, Wk)
        if Wq.shape[:2] != Wk.shape[:2]:
            raise ValueError(f"G factors Wq (h, p, d1) and Wk (h, p, d2) must agree in (h, p), "
                             f"got shapes {tuple(Wq.shape)} and {tuple(Wk.shape)}")
        check_finite("G[0] (Wq)", Wq, xp)
        check_finite("G[1] (Wk)", Wk, xp)
        Wq, Wk = as_work(Wq, xp), as_work(Wk, xp)
        if Wk.dtype != Wq.dtype:
            Wk = xp.astype(Wk, Wq.dtype)
        return _Factors(Wq, Wk, xp), xp, (Wq.shape[-1], Wk.shape[-1])
    xp = check_array("G", G, ndim=3)
    check_finite("G", G, xp)
    return _Dense(as_work(G, xp), xp), xp, (G.shape[-2], G.shape[-1])


def _parse_ranks(ranks, d1, d2):
    if isinstance(ranks, (tuple, list)):
        if len(ranks) != 2:
            raise ValueError(f"ranks must be an int or a pair (r1, r2), got {ranks!r}")
        return check_rank("ranks[0]", ranks[0], d1), check_rank("ranks[1]", ranks[1], d2)
    return check_rank("ranks", ranks, d1), check_rank("ranks", ranks, d2)


def _parse_weight(weights, side, d, r, like):
    if weights is None:
        return None
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise ValueError("weights must be None or a pair (P1, P2)")
    P = weights[side]
    if P is None:
        return None
    name = f"weights[{side}]"
    M = P.factor if hasattr(P, "factor") else P
    check_array(name, M, ndim=2)
    xp = namespace(M, like)  # same library as G, or a TypeError naming both
    if tuple(M.shape) != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(M.shape)}")
    check_finite(name, M, xp)
    if getattr(P, "rank", d) < r:
        raise ValueError(f"ranks: rank {r} exceeds the rank {P.rank} of the Whitener {name}")
    return P if hasattr(P, "factor") else as_work(M, xp)


def _factor(P):
    return None if P is None else (P.factor if hasattr(P, "factor") else P)



