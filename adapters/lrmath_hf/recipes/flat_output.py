"""The output-aware refinements of ``flat`` (docs/methods/flat-output-aware.md).

* ``refit_o``: least-squares ``o_proj`` on the kept value subspaces (:func:`_refit_o`);
* ``v_basis="output"``: value subspaces chosen for ``o_proj``'s output (:func:`_output_bases`);
* ``split="error"``: a layer's budget shared between V/O and the MLP by their summed
  residual-stream error (:func:`_split_layer`, pricing V/O by :func:`_value_output_losses`
  and the MLP by :func:`lrmath.obs_path`).
"""

from __future__ import annotations

import numpy as np
import torch

import lrmath

from ..specs import ArchSpec, get_linear
from .common import gram_psd_rtol, weight64, with_ridge_escalation


def _refit_o(model, spec: ArchSpec, layer: int, moments, w_o: torch.Tensor, bases: torch.Tensor,
             damping: float = 1e-6) -> None:
    r"""Least-squares ``W_o`` for the kept value subspaces: ``W_o C P (P^T C P + lam I)^{-1}``.

    ``C`` is the second moment of the dense ``o_proj`` input ``z`` (all heads),
    ``P = blockdiag(Q_{g(h)})``: the folded heads deliver ``P^T z`` exactly, so
    this is the output-optimal ``o_proj`` for them (FLAT's ``W_o P`` is the
    special case ``C`` block-diagonal with ``Q`` invariant). ``lam`` is
    ``damping`` times the mean diagonal of ``P^T C P``, raised along
    :data:`lrmath.whitening.CHOLESKY_SCHEDULE` where ``P^T C P`` is positive definite only
    to the rounding of a float32-accumulated Gram (few or nearly collinear
    tokens), see :func:`lrmath.damped_cholesky`.
    """
    o_proj = get_linear(model, layer, "o", spec)
    kv_of_head = torch.arange(spec.num_heads) // spec.group_size
    basis = bases.to(torch.float64).cpu()
    P = torch.block_diag(*[basis[g] for g in kv_of_head.tolist()])  # (H d_h, H r)
    C = moments.second_moment().to(torch.float64).cpu()
    CP = C @ P
    A = P.T @ CP
    L, _, alive = lrmath.damped_cholesky(A[None], damping)
    Y = w_o.to(torch.float64).cpu() @ CP
    # A == 0: the kept code carries no signal (C P = 0 for PSD C), so its least-squares weight is 0
    W = torch.cholesky_solve(Y.T, L[0]).T if alive[0] else torch.zeros_like(Y)
    with torch.no_grad():
        o_proj.weight.copy_(W.to(device=o_proj.weight.device, dtype=o_proj.weight.dtype))


def _o_head_blocks(spec: ArchSpec, moments) -> torch.Tensor:
    """The per-query-head diagonal blocks ``C_h`` (H, d_h, d_h) of the ``o_proj`` input second moment."""
    d = spec.head_dim
    C = moments.second_moment().to(torch.float64).cpu()
    return torch.stack([C[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(spec.num_heads)])


def _split_costs(spec: ArchSpec) -> tuple[int, int, int]:
    """Parameters of one layer under ``split="error"``: Q/K (dense), per value head dim, per MLP channel."""
    n, d, H, G = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    return (H + G) * d * n, (H + G) * n, (3 if spec.mlp_kind == "gated" else 2) * n


def _output_bases(spec: ArchSpec, moments, w_o: torch.Tensor, rank: int) -> torch.Tensor:
    r"""Per-KV-head value bases chosen for ``o_proj``'s output, not the value energy.

    For query head ``h`` with ``o_proj`` input block ``z_h = A_h v_{g(h)}``
    (attention mixing ``A_h``, linear) and weight block ``W_h``, projecting the
    value head onto ``range(P)`` delivers ``P^T z_h`` exactly. With the
    least-squares ``o_proj`` the loss is a reduced-rank regression, minimised
    for one head by the row space of the whitened SVD's right factor of ``W_h``
    under ``C_h = E[z_h z_h^T]``. Heads sharing a KV head share ``P``; they are
    stacked, ``[W_h]_h``, under the pooled ``sum_h C_h`` (exact for one head
    per group or equal ``C_h``). Returns orthonormal ``(G, d_h, r)`` float64.
    """
    d, gs = spec.head_dim, spec.group_size
    blocks = _o_head_blocks(spec, moments)
    W = w_o.to(torch.float64).cpu()
    out = []
    for g in range(spec.num_kv_heads):
        heads = range(g * gs, (g + 1) * gs)
        stacked = torch.cat([W[:, h * d:(h + 1) * d] for h in heads], dim=0)
        pooled = blocks[g * gs:(g + 1) * gs].sum(dim=0)
        right = lrmath.whitened_svd(stacked, pooled, rank).right  # (r, d_h): the kept code P^T z
        out.append(torch.linalg.qr(right.T).Q)
    return torch.stack(out)


def _value_output_losses(spec: ArchSpec, moments, w_o: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    r"""Per-token ``o_proj`` output error of keeping ``r = 0 .. d_h`` value dims, shape ``(d_h + 1,)``.

    ``bases`` (G, d_h, d_h) are nested (the first ``r`` columns are the rank-``r``
    basis). Each head is priced with its own least-squares ``o_proj`` block,
    ``tr(W_h C_h W_h^T) - tr(W_h C_h P (P^T C_h P)^{-1} P^T C_h W_h^T)``, i.e.
    without the cross-head gains of the joint refit (an upper bound on it).
    """
    d, H = spec.head_dim, spec.num_heads
    W = w_o.to(torch.float64).cpu().reshape(-1, H, d).transpose(0, 1)  # (H, n, d)
    Ch = _o_head_blocks(spec, moments)
    Q = bases.to(torch.float64).cpu()[torch.arange(H) // spec.group_size]  # (H, d, d)
    total = float(torch.einsum("hnd,hnd->", W @ Ch, W))
    # nested bases: with Q^T C Q = L L^T, the rank-r kept energy tr(B_r A_r^-1 B_r^T) (B = W C Q,
    # A_r the leading block) is the energy of the first r rows of L^-1 B^T, so one factorisation
    # per head prices every r
    A = Q.transpose(1, 2) @ Ch @ Q
    L, _, alive = lrmath.damped_cholesky(A, 1e-12)
    B = (W @ Ch @ Q) * alive[:, None, None]  # a dead head (A_h = 0, hence C_h Q = 0) keeps nothing
    Z = torch.linalg.solve_triangular(L, B.transpose(1, 2), upper=False)  # (H, d, n)
    kept = torch.cumsum((Z**2).sum(dim=(0, 2)), 0)
    return torch.cat([torch.tensor([total], dtype=torch.float64), (total - kept).clamp_min(0.0)])


def _round_channels(k: int, width: int, multiple: int) -> int:
    """``k`` MLP channels rounded down to ``multiple`` (a full-width MLP stays as it is)."""
    return k if k >= width else k // multiple * multiple


def _error_split(spec: ArchSpec, budget: int, vo_loss: torch.Tensor, path, tokens: int,
                 channel_multiple: int = 1) -> tuple[int, int]:
    """The (value head dim, MLP channels) within a layer's parameter budget with the least summed error.

    Both errors are in the residual stream, per token: ``vo_loss[r]`` from
    :func:`_value_output_losses`, the MLP's from the elimination path
    (interpolated between its rounds). Channel counts below the MLP width
    are rounded down to ``channel_multiple``.
    """
    d, f = spec.head_dim, spec.intermediate_size
    fixed, per_rank, per_channel = _split_costs(spec)
    counts = lrmath._backend.to_numpy(path.counts)[::-1].astype(float)
    objective = lrmath._backend.to_numpy(path.objective)[::-1] / tokens
    best = None
    for r in range(1, d + 1):
        k = _round_channels(min(f, (budget - fixed - per_rank * r) // per_channel), f, channel_multiple)
        if k < max(1, counts[0]):
            continue
        err = float(vo_loss[r]) + float(np.interp(k, counts, objective))
        if best is None or err < best[0]:
            best = (err, r, int(k))
    if best is None:
        raise ValueError(f"no (head dim, channels) split fits the layer budget of {budget} parameters")
    return best[1], best[2]


def _split_layer(model, spec: ArchSpec, layer: int, layer_stats, budget: int, ridge: float, v_basis: str,
                 channel_multiple: int = 1):
    """``split="error"``: one layer's head dim and channels within ``budget`` parameters (its IPRS share), the kept MLP channels
    (ascending), the nested value bases (G, d_h, d_h) it priced (their first ``r`` columns are the
    rank-``r`` bases), and the relative ridge the MLP's elimination path needed (``ridge``, unless
    degenerate calibration raised it)."""
    d = spec.head_dim
    fixed, per_rank, per_channel = _split_costs(spec)
    f = spec.intermediate_size
    k_min = max(1, _round_channels(min(f, (budget - fixed - per_rank * d) // per_channel), f, channel_multiple))
    w_o = weight64(get_linear(model, layer, "o", spec)).cpu()
    if v_basis == "output":
        bases = _output_bases(spec, layer_stats.inputs["o"], w_o, d)
    else:
        bases = torch.as_tensor(lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), d).basis)
    vo_loss = _value_output_losses(spec, layer_stats.inputs["o"], w_o, bases)
    down_stats = layer_stats.inputs["down"]
    # lrmath keeps every operand where the statistics are (the model's device during calibration)
    weight = weight64(get_linear(model, layer, "down", spec)).to(down_stats.gram.device)
    # one elimination down to the smallest count any split can use prices every count above it
    path, used_ridge = with_ridge_escalation(
        lambda r: lrmath.obs_path(down_stats.gram, k_min, ridge=r, weight=weight, psd_rtol=gram_psd_rtol(down_stats.dim)),
        ridge, f"layer {layer} MLP")
    head_rank, channels = _error_split(spec, budget, vo_loss, path, down_stats.count, channel_multiple)
    removed = lrmath._backend.to_numpy(path.removed)[: spec.intermediate_size - channels]
    kept = np.setdiff1d(np.arange(spec.intermediate_size), removed)  # ascending
    return head_rank, channels, kept, bases, used_ridge
