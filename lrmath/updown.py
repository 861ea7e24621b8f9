"""Joint low-rank compression of a ReLU MLP's up and down projections (LatentLLM joint UD)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_work, cholesky_or_none, device_of, namespace, solve_triangular
from ._validation import check_array, check_finite, check_nonnegative_scalar, check_rank, check_int
from .svd import whitened_svd
from .whitening import whiten

__all__ = ["JointMLPResult", "joint_mlp"]

ACTIVATIONS = ("relu",)


class JointMLPResult(NamedTuple):
    """Result of :func:`joint_mlp`.

    Attributes
    ----------
    up_left, up_right : array, shape (d_ff, r_u) and (r_u, d)
        ``W_up ~ up_left @ up_right``.
    down_left, down_right : array, shape (d_out, r_d) and (r_d, d_ff)
        ``W_down ~ down_left @ down_right``.
    objective : array, shape (iterations + 1,)
        The surrogate ``L4`` after the first low-rank fits and after each
        sweep; non-increasing.
    output_error : array, shape (iterations + 1,)
        ``||W_down_r relu(W_up_r X) - Y||_F^2`` of the factors at the same
        points: what the compressed MLP actually does (not guaranteed monotone).
    Z, Z_act : array, shape (d_ff, N)
        The auxiliary pre- and post-activation variables at the end.
    lam : (float, float)
        Absolute ridges ``(lam_up, lam_down)`` of the surrogate.
    converged : bool
        Whether the relative decrease of ``L4`` fell to ``tol`` or below.
    iterations : int
        Sweeps performed.
    """

    up_left: Any
    up_right: Any
    down_left: Any
    down_right: Any
    objective: Any
    output_error: Any
    Z: Any
    Z_act: Any
    lam: tuple
    converged: bool
    iterations: int


def joint_mlp(W_up, W_down, X, ranks, *, Y=None, alpha: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0, damping: float = 1e-3, max_iter: int = 20, tol: float = 1e-6,
              activation: str = "relu") -> JointMLPResult:
    r"""Low-rank ``W_up`` and ``W_down`` fitted jointly through auxiliary activations.

    Parameters
    ----------
    W_up : array, shape (d_ff, d)
        Up projection of ``y = W_down relu(W_up x)``.
    W_down : array, shape (d_out, d_ff)
        Down projection.
    X : array, shape (d, N)
        Calibration inputs, one token per column.
    ranks : int or (int, int)
        ``(r_u, r_d)``: ``0 <= r_u <= min(d_ff, d)``, ``0 <= r_d <= min(d_out, d_ff)``.
    Y : array, shape (d_out, N), optional
        Targets; default the dense MLP's outputs ``W_down relu(W_up X)``.
    alpha, beta, gamma : float, default 1.0
        Positive weights of the three terms of ``L4``.
    damping : float, default 1e-3
        Relative ridge: ``lam_up = damping * tr(X X^T) / d`` and
        ``lam_down = damping * tr(A A^T) / d_ff`` with ``A = relu(W_up X)``,
        fixed for the whole run.
    max_iter : int, default 20
        Sweeps after the first fits.
    tol : float, default 1e-6
        Stop when ``L4`` decreases by at most ``tol`` relative to its previous value.
    activation : {"relu"}
        Only ReLU has the closed-form ``Z`` update; see Notes for GELU / SiLU.

    Returns
    -------
    JointMLPResult
        Factors, traces, auxiliaries and the ridges; float64 (float32 on
        devices without it) on the library and device of ``W_up``.

    Raises
    ------
    ValueError
        Arrays of the wrong shape or non-finite; ``ranks`` out of range;
        ``alpha``, ``beta``, ``gamma`` not positive; ``damping``, ``tol``,
        ``max_iter`` negative; an ``activation`` other than ``"relu"``.

    Notes
    -----
    LatentLLM (Koike-Akino et al., 2025), Sec. 5.2, after SparseLLM: with
    auxiliary ``Z`` (pre-activation) and ``Z'`` (post-activation) minimise

    .. math:: L_4 = \alpha (\|W_u X - Z\|_F^2 + \lambda_u \|W_u\|_F^2)
              + \beta \|Z' - \sigma(Z)\|_F^2
              + \gamma (\|W_d Z' - Y\|_F^2 + \lambda_d \|W_d\|_F^2)

    over ``rank W_u <= r_u``, ``rank W_d <= r_d``, ``Z``, ``Z'``. The ridge
    terms (LatentLLM damps ``C = X X^T + lambda I`` too) make every step well
    posed with fewer tokens than channels; with ``damping = 0`` this is the
    paper's ``L4``. Start: ``Z = W_up X``, ``Z' = relu(Z)``, then fit ``W_u``,
    ``W_d`` (the per-matrix activation-aware SVDs: ``objective[0]``). Each
    sweep updates, each time to the exact minimiser over one block:

    1. ``Z'`` (ridge): :math:`(\beta I + \gamma W_d^\top W_d) Z' = \beta \sigma(Z) + \gamma W_d^\top Y`,
       solved in the ``r_d``-dimensional row space of ``W_d`` (no ``d_ff x d_ff`` system);
    2. ``Z`` (ReLU, per entry, ``a = (W_u X)_{ij}``, ``b = Z'_{ij}``): the better of
       :math:`z^- = \min(a, 0)` and :math:`z^+ = \max((\alpha a + \beta b)/(\alpha + \beta), 0)`
       (the notes' case split, with each candidate kept in its half-line);
    3. ``W_u``: rank-``r_u`` minimiser of :math:`\|W X - Z\|^2 + \lambda_u \|W\|^2`, i.e.
       :func:`lrmath.whitened_svd` of :math:`Z X^\top (X X^\top + \lambda_u I)^{-1}` in the
       metric ``X X^T + lam_u I`` (reduced-rank ridge regression);
    4. ``W_d``: the same with ``Z'``, ``Y``, ``lam_down``.

    Block coordinate descent with exact block minimisers never increases
    ``L4``. The surrogate is not the MLP's output error: ``output_error``
    reports that too, so the caller can compare with ``output_error[0]``
    (independent activation-aware SVDs).

    *GELU, SiLU-gated MLPs.* Steps 1, 3 and 4 hold for any activation; step 2
    has no closed form (a non-convex scalar problem per entry, and for SwiGLU a
    coupled one in gate and up). This function therefore accepts ReLU only; for
    GELU / SwiGLU models the library uses :func:`lrmath.nystrom_select`
    (channel selection commutes with any elementwise activation and gating)
    or per-matrix :func:`lrmath.whitened_svd`. See ``docs/methods/joint-mlp.md``.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> rng = np.random.default_rng(0)
    >>> Wu, Wd, X = rng.standard_normal((12, 6)), rng.standard_normal((6, 12)), rng.standard_normal((6, 80))
    >>> res = lrmath.joint_mlp(Wu, Wd, X, (3, 3))
    >>> bool(np.all(np.diff(res.objective) <= 1e-9 * res.objective[0]))
    True
    >>> res.up_left.shape, res.down_right.shape
    ((12, 3), (3, 12))
    """
    xp, W_up, W_down, X, Y = _check_arrays(W_up, W_down, X, Y)
    d_ff, d = W_up.shape
    d_out = W_down.shape[0]
    r_u, r_d = _parse_ranks(ranks, min(d_ff, d), min(d_out, d_ff))
    alpha, beta, gamma = (_positive(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)))
    damping = check_nonnegative_scalar("damping", damping)
    tol = check_nonnegative_scalar("tol", tol)
    max_iter = check_int("max_iter", max_iter, 0)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (closed-form Z update), got {activation!r}; "
                         "for GELU / SiLU-gated MLPs use lrmath.nystrom_select or lrmath.whitened_svd")

    Z = W_up @ X
    Z_act = _relu(Z, xp)
    if Y is None:
        Y = W_down @ Z_act
    lam_up = damping * float(xp.sum(X**2)) / d
    lam_down = damping * float(xp.sum(Z_act**2)) / d_ff
    up_metric = _metric(X, lam_up, xp)  # X never changes: one factorisation for the run
    up = _ridge_low_rank(Z, X, up_metric, r_u)
    down = _ridge_low_rank(Y, Z_act, _metric(Z_act, lam_down, xp), r_d)
    weights = (alpha, beta, gamma, lam_up, lam_down)
    trace = [_surrogate(up, down, X, Z, Z_act, Y, weights, xp)]
    output = [_output_error(up, down, X, Y, xp)]

    converged = False
    sweeps = 0
    while sweeps < max_iter and not converged:
        Z_act = _update_activation(_relu(Z, xp), down, Y, beta, gamma, xp)
        Z = _update_preactivation(up[0] @ (up[1] @ X), Z_act, alpha, beta, xp)
        up = _ridge_low_rank(Z, X, up_metric, r_u)
        down = _ridge_low_rank(Y, Z_act, _metric(Z_act, lam_down, xp), r_d)
        sweeps += 1
        value = _surrogate(up, down, X, Z, Z_act, Y, weights, xp)
        converged = trace[-1] - value <= tol * trace[-1]
        trace.append(value)
        output.append(_output_error(up, down, X, Y, xp))

    dt, dev = W_up.dtype, device_of(W_up)
    return JointMLPResult(
        up_left=up[0], up_right=up[1], down_left=down[0], down_right=down[1],
        objective=xp.asarray(trace, dtype=dt, device=dev),
        output_error=xp.asarray(output, dtype=dt, device=dev),
        Z=Z, Z_act=Z_act, lam=(lam_up, lam_down), converged=converged, iterations=sweeps)


# ------------------------------------------------------------------------ block updates
def _relu(Z, xp):
    return xp.clip(Z, min=0.0)


def _metric(X, lam, xp):
    """Whitener of ``X X^T + lam I`` (symmetric root: its pseudo-inverse also serves lam = 0)."""
    n = X.shape[0]
    C = X @ xp.matrix_transpose(X) + lam * xp.eye(n, dtype=X.dtype, device=device_of(X))
    return whiten((C + xp.matrix_transpose(C)) / 2, method="sqrt")


def _ridge_low_rank(T, X, metric, r):
    """Rank-``r`` minimiser of ``||W X - T||^2 + lam ||W||^2`` as factors ``(left, right)``.

    With ``S = metric.factor`` (``S S = X X^T + lam I``) the objective is
    ``||(W - W*) S||^2 + const`` for ``W* = T X^T S^+ S^+``: Eckart-Young in that metric.
    """
    xp = namespace(T, X)
    W_star = metric.solve(metric.solve(T @ xp.matrix_transpose(X)))
    res = whitened_svd(W_star, metric, r)
    return res.left, res.right


def _update_activation(target, down, Y, beta, gamma, xp):
    """``Z'`` solving ``(beta I + gamma W^T W) Z' = beta target + gamma W^T Y`` for ``W = L R``.

    With ``R^T = Q T`` (thin QR), ``W^T W = Q K Q^T``, ``K = T L^T L T^T``: outside ``range(Q)``
    ``Z' = target``; inside, an ``r x r`` positive definite system.
    """
    L, R = down
    if R.shape[0] == 0:
        return target
    Q, T = xp.linalg.qr(xp.matrix_transpose(R), mode="reduced")
    LT = L @ xp.matrix_transpose(T)  # W = (L T^T) Q^T
    K = xp.matrix_transpose(LT) @ LT
    r = K.shape[0]
    system = beta * xp.eye(r, dtype=K.dtype, device=device_of(K)) + gamma * ((K + xp.matrix_transpose(K)) / 2)
    Qt_target = xp.matrix_transpose(Q) @ target
    rhs = beta * Qt_target + gamma * (xp.matrix_transpose(LT) @ Y)
    chol = cholesky_or_none(system, xp)  # beta > 0: positive definite
    inner = solve_triangular(xp.matrix_transpose(chol), solve_triangular(chol, rhs, lower=True, xp=xp),
                             lower=False, xp=xp)
    return target + Q @ (inner - Qt_target)


def _update_preactivation(A, B, alpha, beta, xp):
    """Entrywise ``argmin_z alpha (z - a)^2 + beta (b - relu(z))^2`` (ReLU closed form)."""
    z_neg = xp.clip(A, max=0.0)
    z_pos = xp.clip((alpha * A + beta * B) / (alpha + beta), min=0.0)
    f_neg = alpha * (z_neg - A) ** 2 + beta * B**2
    f_pos = alpha * (z_pos - A) ** 2 + beta * (B - z_pos) ** 2
    return xp.where(f_pos <= f_neg, z_pos, z_neg)


def _squared_norm_of_product(L, R, xp):
    """``||L R||_F^2`` from the factors: ``sum((L^T L) * (R R^T))``."""
    return xp.sum((xp.matrix_transpose(L) @ L) * (R @ xp.matrix_transpose(R)))


def _surrogate(up, down, X, Z, Z_act, Y, weights, xp):
    alpha, beta, gamma, lam_up, lam_down = weights
    up_fit = xp.sum((up[0] @ (up[1] @ X) - Z) ** 2) + lam_up * _squared_norm_of_product(*up, xp)
    link = xp.sum((Z_act - _relu(Z, xp)) ** 2)
    down_fit = xp.sum((down[0] @ (down[1] @ Z_act) - Y) ** 2) + lam_down * _squared_norm_of_product(*down, xp)
    return float(alpha * up_fit + beta * link + gamma * down_fit)


def _output_error(up, down, X, Y, xp):
    return float(xp.sum((down[0] @ (down[1] @ _relu(up[0] @ (up[1] @ X), xp)) - Y) ** 2))


# ------------------------------------------------------------------------ validation
def _check_arrays(W_up, W_down, X, Y):
    for name, A in (("W_up", W_up), ("W_down", W_down), ("X", X)):
        check_array(name, A, ndim=2)
    if Y is not None:
        check_array("Y", Y, ndim=2)
    xp = namespace(W_up, W_down, X, Y)
    d_ff, d = W_up.shape
    if W_down.shape[1] != d_ff:
        raise ValueError(f"W_down must have d_ff = {d_ff} columns (the rows of W_up), got shape {tuple(W_down.shape)}")
    if X.shape[0] != d:
        raise ValueError(f"X must have d = {d} rows (the columns of W_up), got shape {tuple(X.shape)}")
    if Y is not None and tuple(Y.shape) != (W_down.shape[0], X.shape[1]):
        raise ValueError(f"Y must have shape {(W_down.shape[0], X.shape[1])} (d_out, N), got {tuple(Y.shape)}")
    arrays = [W_up, W_down, X, Y]
    for name, A in zip(("W_up", "W_down", "X", "Y"), arrays):
        if A is not None:
            check_finite(name, A, xp)
    W_up, W_down, X, Y = (None if A is None else as_work(A, xp) for A in arrays)  # one device: one dtype
    return xp, W_up, W_down, X, Y


def _parse_ranks(ranks, max_up, max_down):
    if isinstance(ranks, (tuple, list)):
        if len(ranks) != 2:
            raise ValueError(f"ranks must be an int or a pair (r_up, r_down), got {ranks!r}")
        return check_rank("ranks[0]", ranks[0], max_up), check_rank("ranks[1]", ranks[1], max_down)
    return check_rank("ranks", ranks, max_up), check_rank("ranks", ranks, max_down)


def _positive(name, value):
    v = check_nonnegative_scalar(name, value)
    if v == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


