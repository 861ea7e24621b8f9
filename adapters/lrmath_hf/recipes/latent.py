"""``latent``: LatentLLM's attention-aware joint compression (Koike-Akino et al., 2025).

Per decoder layer, with ``C = X X^T`` the second moment of the shared q/k/v
input and ``P`` its whitening factor (``P P^T = C + delta I``, the paper's
``C^{1/2}`` by default):

* **joint QK**: the bilinear forms ``G_i = W_{q,i}^T W_{k,g(i)}`` of all query
  heads ``i`` (``g(i)`` the KV head it reads under GQA) share two latent maps,
  ``G_i ~ A^T H_i B``, fitted by Tucker-2 (HOSVD, then HOOI) on the bilateral
  weighted stack ``P^T G_i P`` (:func:`lrmath.joint_subspaces`), i.e. on the
  pre-softmax attention map of the calibration tokens. ``q_proj`` becomes
  ``(W_q A_dual^T) A`` and ``k_proj`` ``(W_k B_dual^T) B``: factorised linears
  whose right factor is the latent map shared by all heads and whose left
  factor decompresses every head to the full ``d_h`` *before* RoPE, so RoPE,
  the softmax scale and the KV-cache layout are untouched; q/k biases are kept.
* **joint VO**: the value-output products ``G_i = W_{o,i} W_{v,g(i)}`` (``W_{o,i}``
  the columns of ``o_proj`` read from head ``i``) share an output basis and a
  value latent map, ``G_i ~ A^T H_i B``, fitted the same way with ``P`` on the
  input side only (the output side is the residual stream, unweighted).
  ``v_proj`` becomes ``(W_v B_dual^T) B`` and ``o_proj`` ``A^T (A_dual W_o)``.
* **MLP**: activation-aware (whitened) SVD of ``gate``, ``up`` and ``down``
  (:func:`lrmath.whitened_svd`). LatentLLM's joint up/down fit
  (:func:`lrmath.joint_mlp`) has closed-form updates only for ReLU; the gated
  SiLU MLPs of Llama, Mistral and Qwen2 have none, so each matrix is fitted on
  its own inputs.

Ranks: one global allocation (:func:`lrmath.allocate_ranks`) over the mode
spectra of the joint problems and the whitened spectra of the MLP matrices,
each relative to its block's energy, under the exact parameter count.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

import lrmath
from lrmath.whitening import METHODS

from ..specs import ArchSpec, get_linear
from . import RecipeResult, register
from .common import group_name, input_plan, install_factors, run_calibration, timer, weight64
from .svd import whitened_factors

__all__ = ["latent_plan", "mode_spectra", "run_latent"]

ATTENTION = ("q", "k", "v", "o")
RANK_KEYS = ("q", "k", "v", "o", "gate", "up", "down")


def latent_plan(spec: ArchSpec):
    """Input statistics the recipe needs: q/k/v input, MLP inputs (o's input is not used)."""
    return input_plan(spec, [role for role in spec.roles if role != "o"], importance=False, order=2)


def mode_spectra(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Eigenvalues of :math:`\sum_i G_i G_i^\top` and :math:`\sum_i G_i^\top G_i` for :math:`G_i = F_i^\top S_i`.

    Parameters
    ----------
    first, second : tensor, shape (h, p, d1) and (h, p, d2)
        The factors ``F_i`` and ``S_i`` of every slice (already weighted).

    Returns
    -------
    (tensor, tensor)
        Descending, lengths ``min(h p, d1)`` and ``min(h p, d2)``: the HOSVD
        mode spectra. Each sums to :math:`\sum_i \|G_i\|_F^2`.

    Notes
    -----
    With :math:`T_i^\top T_i = S_i S_i^\top` (R of a QR of :math:`S_i^\top`),
    :math:`\sum_i G_i G_i^\top = \sum_i F_i^\top T_i^\top T_i F_i`: the squared
    singular values of the stacked :math:`T_i F_i` (no ``d1 x d2`` product).
    Keeping the top ``r1`` and ``r2`` directions of the two modes (HOSVD) leaves
    an error of at most the sum of the two tails (De Lathauwer et al., 2000);
    HOOI only lowers it.
    """

    def one(a, b):
        T = torch.linalg.qr(b.transpose(-2, -1), mode="r").R  # (h, min(p, d), p)
        return torch.linalg.svdvals((T @ a).reshape(-1, a.shape[-1])) ** 2

    return one(first, second), one(second, first)


class _Unit(NamedTuple):
    """One rank decision: a role of a layer, its relative spectrum, shape and "keep dense" cap."""

    layer: int
    role: str
    spectrum: np.ndarray
    shape: tuple[int, int]
    cap: int


def _heads(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    return W.reshape(n_heads, -1, W.shape[-1])


def _layer_pairs(model, spec: ArchSpec, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factor pairs of joint QK and joint VO, one slice per query head (KV heads repeated)."""
    H, G = spec.num_heads, spec.num_kv_heads
    kv = torch.arange(H) // spec.group_size  # GQA: query head h reads KV head h // (H / G)
    Wq = weight64(get_linear(model, layer, "q", spec))
    Wk = weight64(get_linear(model, layer, "k", spec))
    Wv = weight64(get_linear(model, layer, "v", spec))
    Wo = weight64(get_linear(model, layer, "o", spec))
    # o_proj's columns of head i, transposed: G_i = (W_o,i^T)^T W_v,g(i) = W_o,i W_v,g(i)
    Wo_heads = Wo.reshape(Wo.shape[0], H, -1).permute(1, 2, 0)
    return {"qk": (_heads(Wq, H), _heads(Wk, G)[kv.to(Wk.device)]),
            "vo": (Wo_heads, _heads(Wv, G)[kv.to(Wv.device)])}


def _params(m: int, n: int, rank: int | None, block_identity: bool) -> int:
    if rank is None:
        return m * n
    return rank * (m + n - rank) if block_identity else rank * (m + n)


def _allocate(units: list[_Unit], ratio: float, multiple: int, block_identity: bool, biases: int = 0):
    """Ranks removing at least ``ratio`` of the parameters: ``{(layer, role): rank or None}``.

    ``biases`` (kept as they are) count in the parameters the ratio refers to.

    :func:`lrmath.allocate_ranks` prices a rank ``r`` at ``r (m + n)``, but a
    unit reaching its cap stays dense at ``m n`` (more than ``cap (m + n)``);
    the budget handed to it is therefore the largest one (bisection) whose
    *realised* parameter count stays within the target.
    """
    dense = sum(u.shape[0] * u.shape[1] for u in units)
    target = (1.0 - ratio) * (dense + biases) - biases
    spectra = [u.spectrum for u in units]
    cost = np.array([sum(u.shape) for u in units], dtype=float)
    cap = np.array([u.cap for u in units])
    floor = np.minimum(multiple, cap)  # at least one block: a rank-0 linear would drop the matrix

    def decide(budget):
        alloc = lrmath.allocate_ranks(spectra, budget, cost=cost, multiple=multiple, min_rank=floor, max_rank=cap)
        ranks = [int(r) for r in lrmath._backend.to_numpy(alloc.ranks)]
        decided = {(u.layer, u.role): (None if r >= u.cap else r) for u, r in zip(units, ranks)}
        realised = sum(_params(*u.shape, decided[(u.layer, u.role)], block_identity) for u in units)
        return decided, realised, alloc

    lo = float(np.sum(cost * floor))
    decided, realised, alloc = decide(lo)
    if realised > target:
        raise ValueError(f"ratio={ratio} removes more than one rank block per matrix allows "
                         f"(at most {1 - (realised + biases) / (dense + biases):.3f} with multiple={multiple})")
    hi = float(dense)
    for _ in range(60):  # realised parameters grow with the budget
        mid = 0.5 * (lo + hi)
        trial = decide(mid)
        if trial[1] <= target:
            lo, (decided, realised, alloc) = mid, trial
        else:
            hi = mid
        if hi - lo <= 0.5:
            break
    return decided, realised, alloc


def _check_ranks(ranks, spec: ArchSpec) -> dict[str, int | None] | None:
    if ranks is None:
        return None
    full = {role: min(spec.shape(role)) for role in spec.roles}
    if isinstance(ranks, str):
        if ranks != "full":
            raise ValueError(f"ranks must be None, 'full' or a mapping role -> rank, got {ranks!r}")
        return full
    if not isinstance(ranks, Mapping):
        raise ValueError(f"ranks must be None, 'full' or a mapping role -> rank, got {type(ranks).__name__}")
    unknown = set(ranks) - set(spec.roles)
    if unknown:
        raise ValueError(f"ranks: unknown roles {sorted(unknown)}; roles: {spec.roles}")
    out = {}
    for role in spec.roles:
        r = ranks.get(role)
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= full[role]):
            raise ValueError(f"ranks[{role!r}] must be an int in [1, {full[role]}] or None, got {r!r}")
        out[role] = None if r is None else int(r)
    return out


def _solve_pair(first, second, ranks, weights, *, max_iter: int, tol: float):
    return lrmath.joint_subspaces((first, second), ranks, weights=weights, max_iter=max_iter, tol=tol)


@register("latent")
def run_latent(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
               whitening: str = "sqrt", damping: float = 1e-6, multiple: int = 8,
               block_identity: bool = False, max_iter: int = 50, tol: float = 1e-10,
               ranks=None, stats=None) -> RecipeResult:
    r"""LatentLLM: joint QK and joint VO by weighted Tucker-2, whitened SVD of the MLP.

    Parameters
    ----------
    ratio : float
        Fraction of the decoder linears' parameters to remove, in ``[0, 1)``
        (ignored when ``ranks`` is given).
    whitening : {"sqrt", "cholesky", "eigh"}
        Factor ``P`` of the input second moments (:func:`lrmath.whiten`);
        ``sqrt`` is the paper's ``C^{1/2}``. All give the same optima.
    damping : float
        Relative damping, ``delta = damping * tr(C) / n``.
    multiple : int
        Ranks are multiples of this.
    block_identity : bool
        Store every factor pair with an identity block (``r (m + n - r)``
        parameters, the paper's junction ``J = V_1``; :func:`lrmath.block_identity`).
    max_iter, tol : see :func:`lrmath.joint_subspaces` (HOOI sweeps and stopping rule).
    ranks : None, "full" or mapping
        ``None``: allocate from ``ratio``. A mapping ``role -> rank`` (roles
        ``q k v o gate up down``) sets the same ranks in every layer, a role
        missing or ``None`` stays dense; ``"full"`` factorises every linear
        at rank ``min(m, n)`` (exact, and larger than dense: for checks).
    stats : CalibrationResult, optional
        Statistics of an earlier calibration of the same dense model holding
        the inputs of ``q+k+v`` and of the MLP groups (:func:`latent_plan`).

    Returns
    -------
    RecipeResult
        ``ranks``: ``"layer.role" -> rank or "dense"``; ``details``: the
        options, the allocation, and per layer the relative weighted errors
        of joint QK / VO and the HOOI sweeps.

    Notes
    -----
    Koike-Akino et al., LatentLLM: Attention-Aware Joint Tensor Compression
    (arXiv 2505.18413, 2025), Sec. 4. With :math:`P P^\top = C`, the
    pre-softmax attention-map error of head ``i`` on the calibration tokens is

    .. math:: \|X^\top (G_i - \hat G_i) X\|_F^2 = \|P^\top (G_i - \hat G_i) P\|_F^2,
              \qquad G_i = W_{q,i}^\top W_{k,g(i)},\quad \hat G_i = A^\top H_i B,

    minimised jointly over the heads by :func:`lrmath.joint_subspaces` with
    ``weights=(P, P)``. Joint VO minimises
    :math:`\sum_i \|(W_{o,i} W_{v,g(i)} - \hat G_i) P\|_F^2`, the head outputs'
    error when attention is the identity (softmax mixing and RoPE are not
    modelled; the paper's RoPE-windowed variant is not implemented). The MLP
    matrices minimise :math:`\|(W - \hat W) X\|_F^2` by whitened SVD: SiLU-gated
    MLPs have no closed-form joint update (LatentLLM's joint up/down is for ReLU).

    Ranks: the HOSVD error of ranks :math:`(r_1, r_2)` is at most the sum of the
    two tails of the mode spectra (:func:`mode_spectra`); every spectrum is
    divided by its block's energy, so all tails are relative errors, and
    :func:`lrmath.allocate_ranks` minimises their sum under
    :math:`\sum r (m + n) \le` budget with ``m x n`` the linear a mode feeds
    (``q``, ``k``, ``o``, ``v``, the MLP matrices). A linear whose rank
    reaches ``k_equiv`` (rounded to ``multiple``) stays dense.
    """
    if ranks is None and not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) < 1.0):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if whitening not in METHODS:
        raise ValueError(f"whitening must be one of {METHODS}, got {whitening!r}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if not all(role in spec.roles for role in ATTENTION):
        raise ValueError(f"latent needs q, k, v, o linears; {spec.model_type} has {spec.roles}")
    fixed = _check_ranks(ranks, spec)
    mlp_roles = tuple(role for role in spec.roles if role not in ATTENTION)
    plan = latent_plan(spec)

    result = RecipeResult()
    if stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, plan, progress=progress)
    else:
        missing = set(plan.inputs) - set(stats.layers[0].inputs)
        if missing:
            raise ValueError(f"stats lack the input statistics {sorted(missing)} (see latent_plan)")
    result.calibration_tokens = stats.tokens
    qkv = group_name(spec.input_group("q"))

    with timer(result.timings, "decisions"):
        whiteners, pairs, units = [], [], []
        for layer, layer_stats in enumerate(stats.layers):
            wh = lrmath.whiten(layer_stats.inputs[qkv].gram, method=whitening, damping=damping)
            whiteners.append(wh)
            layer_pairs = _layer_pairs(model, spec, layer)
            pairs.append(layer_pairs)
            if fixed is not None:
                continue
            Wq, Wk = layer_pairs["qk"]
            Wo, Wv = layer_pairs["vo"]
            for roles, (first, second) in ((("q", "k"), (wh.apply(Wq), wh.apply(Wk))), (("o", "v"), (Wo, wh.apply(Wv)))):
                for role, s in zip(roles, mode_spectra(first, second)):
                    units.append(_unit(layer, role, s, spec, multiple))
        factors = whitened_factors(model, spec, stats, roles=mlp_roles, whitening=whitening, damping=damping)
        if fixed is None:
            units += [_unit(layer, role, res.singular_values ** 2, spec, multiple)
                      for (layer, role), res in factors.items()]
            biases = len(stats.layers) * sum(spec.shape(role)[0] for role in spec.roles if spec.bias.get(role))
            decided, realised, alloc = _allocate(units, float(ratio), multiple, block_identity, biases)
            realised += biases
            result.spectra = {f"{u.layer}.{u.role}": (u.spectrum, decided[(u.layer, u.role)] or u.cap)
                              for u in units}
            allocation = {"realised_parameters": int(realised), "allocation_gap": float(alloc.gap)}
        else:
            decided = {(layer, role): fixed[role] for layer in range(len(stats.layers)) for role in spec.roles}
            allocation = {"fixed_ranks": {role: fixed[role] for role in spec.roles}}

    with timer(result.timings, "surgery"):
        joint = []
        for layer, (wh, layer_pairs) in enumerate(zip(whiteners, pairs)):
            joint.append(_joint_layer(model, spec, layer, wh, layer_pairs, decided, block_identity,
                                      max_iter=max_iter, tol=tol))
        for (layer, role), res in factors.items():
            rank = decided[(layer, role)]
            if rank is not None:
                install_factors(model, spec, layer, role, res.left[:, :rank], res.right[:rank, :],
                                block_identity=block_identity)
        result.ranks = {f"{layer}.{role}": ("dense" if decided[(layer, role)] is None else decided[(layer, role)])
                        for layer in range(len(stats.layers)) for role in spec.roles}
    result.details = {"whitening": whitening, "damping": damping, "multiple": multiple,
                      "block_identity": block_identity, "mlp": "whitened SVD (gated SiLU: no closed-form joint fit)",
                      **allocation, "joint": joint}
    return result


def _energy(first: torch.Tensor, second: torch.Tensor) -> float:
    """``sum_i ||F_i^T S_i||_F^2`` from ``p x p`` products: ``sum((F F^T) * (S S^T))``."""
    return float(torch.sum((first @ first.transpose(-2, -1)) * (second @ second.transpose(-2, -1))))


def _unit(layer: int, role: str, spectrum, spec: ArchSpec, multiple: int) -> _Unit:
    s = np.clip(lrmath._backend.to_numpy(spectrum).astype(np.float64), 0.0, None)
    total = s.sum()
    m, n = spec.shape(role)
    cap = min(lrmath.round_rank(lrmath.k_equiv(m, n), multiple=multiple), s.size)
    return _Unit(layer, role, s / total if total > 0 else s, (m, n), cap)


def _joint_layer(model, spec: ArchSpec, layer: int, wh, layer_pairs, decided, block_identity: bool,
                 *, max_iter: int, tol: float) -> dict[str, Any]:
    """Solve and install joint QK and joint VO of one layer; return their relative errors."""
    out = {}
    for name, (left_role, right_role), weighted in (("qk", ("q", "k"), (True, True)), ("vo", ("o", "v"), (False, True))):
        r_left, r_right = decided[(layer, left_role)], decided[(layer, right_role)]
        if r_left is None and r_right is None:
            continue
        # A dense side still enters the fit at full rank, so the other side is fitted against it.
        full = [min(min(spec.shape(role)), wh.rank if w else math.inf) for role, w in zip((left_role, right_role), weighted)]
        ranks = (full[0] if r_left is None else r_left, full[1] if r_right is None else r_right)
        first, second = layer_pairs[name]
        res = _solve_pair(first, second, ranks, tuple(wh if w else None for w in weighted),
                          max_iter=max_iter, tol=tol)
        energy = _energy(wh.apply(first) if weighted[0] else first, wh.apply(second))
        out[name] = {"relative_error": float(res.objective[-1]) / energy if energy > 0 else 0.0,
                     "hosvd_relative_error": float(res.objective[0]) / energy if energy > 0 else 0.0,
                     "sweeps": int(res.iterations), "converged": bool(res.converged)}
        if name == "qk":
            installs = {"q": (weight64(get_linear(model, layer, "q", spec)) @ res.A_dual.T, res.A),
                        "k": (weight64(get_linear(model, layer, "k", spec)) @ res.B_dual.T, res.B)}
        else:  # o: A^T (A_dual W_o); v: (W_v B_dual^T) B
            installs = {"o": (res.A.T, res.A_dual @ weight64(get_linear(model, layer, "o", spec))),
                        "v": (weight64(get_linear(model, layer, "v", spec)) @ res.B_dual.T, res.B)}
        for role, (left, right) in installs.items():
            if decided[(layer, role)] is not None:
                install_factors(model, spec, layer, role, left, right, block_identity=block_identity)
    return out
