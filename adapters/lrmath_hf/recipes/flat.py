"""FLAT-LLM recipes: ``flat`` and ``flat-paper``.

Per layer ``l`` a kept fraction ``w_l`` comes from the angular importance by
IPRS (:func:`lrmath.iprs_allocate`); then

* V/O: head-wise PCA of the value outputs (per KV head under GQA) folded into
  ``W_v`` / ``W_o`` (:func:`lrmath_hf.attention.fold_value_output`): the value
  head dim and the V cache shrink to ``r = floor(w_l d_h)``;
* Q/K (optional): head-wise PCA of the query / key outputs before RoPE,
  expanded back to ``d_h`` before RoPE (:class:`lrmath_hf.modules.HeadwiseProjection`);
* MLP: Nystrom selection of ``floor(w_l d_mlp)`` intermediate channels by ridge
  leverage scores of the down-projection input, and the refit
  ``W_down <- W_down C[:, S] (C[S, S] + lam I)^{-1}`` (:func:`lrmath.nystrom_select`).

``flat-paper`` follows the published allocation and budget accounting
(``B = L * kept``, FLAT's kept-ratio formula when Q/K stay dense, the reference
importance with NaN -> 0.5); ``flat`` searches the kept fraction so that the
parameters actually removed match ``ratio`` exactly and uses a relative ridge.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import lrmath

from ..attention import fold_value_output
from ..calibrate import CalibrationPlan
from ..modules import HeadwiseProjection
from ..specs import ArchSpec, get_attention, get_linear, set_linear
from . import RecipeResult, register
from .common import gram_psd_rtol, run_calibration, timer, weight64

__all__ = ["flat_plan", "layer_parameters", "run_flat", "run_flat_paper"]


def flat_plan(spec: ArchSpec, *, qk: bool, refit_o: bool = False) -> CalibrationPlan:
    heads = {"v": (spec.linears["v"], spec.num_kv_heads, spec.head_dim)}
    if qk:
        heads["q"] = (spec.linears["q"], spec.num_heads, spec.head_dim)
        heads["k"] = (spec.linears["k"], spec.num_kv_heads, spec.head_dim)
    inputs = {"down": spec.linears["down"]}
    if refit_o:
        inputs["o"] = spec.linears["o"]
    return CalibrationPlan(inputs=inputs, head_outputs=heads, importance=True)


def _ranks(spec: ArchSpec, w: float) -> tuple[int, int]:
    head_rank = max(1, min(spec.head_dim, math.floor(w * spec.head_dim)))
    channels = max(1, min(spec.intermediate_size, math.floor(w * spec.intermediate_size)))
    return head_rank, channels


def layer_parameters(spec: ArchSpec, w: float, *, qk: bool) -> int:
    """Parameters of one layer's q, k, v, o, gate, up, down at kept fraction ``w``."""
    n, d, H, G = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    r, k = _ranks(spec, w)
    qk_params = (H + G) * r * (n + d) if qk else (H + G) * d * n
    mlp = (3 if spec.mlp_kind == "gated" else 2) * n * k
    return qk_params + G * r * n + n * H * r + mlp


def _dense_layer_parameters(spec: ArchSpec) -> int:
    n, d, H, G, f = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    return 2 * (H + G) * d * n + (3 if spec.mlp_kind == "gated" else 2) * n * f


def _search_keep(importance, spec: ArchSpec, ratio: float, qk: bool) -> np.ndarray:
    """Largest IPRS budget whose realised parameters remove at least ``ratio`` (bisection)."""
    L = len(importance)
    target = (1.0 - ratio) * L * _dense_layer_parameters(spec)

    def realised(keep: float) -> tuple[float, np.ndarray]:
        w = lrmath._backend.to_numpy(lrmath.iprs_allocate(importance, keep * L))
        return sum(layer_parameters(spec, float(x), qk=qk) for x in w), w

    lo, hi = 0.0, 1.0
    for _ in range(50):  # realised parameters are monotone in the budget
        mid = 0.5 * (lo + hi)
        if realised(mid)[0] <= target:
            lo = mid
        else:
            hi = mid
    return realised(lo)[1]


def _fold_qk(model, spec: ArchSpec, layer: int, role: str, moments, rank: int) -> None:
    n_heads = spec.num_heads if role == "q" else spec.num_kv_heads
    basis = lrmath.pca_truncate(moments.second_moment(), rank).basis  # (heads, d_h, r)
    dense = get_linear(model, layer, role, spec)
    W = weight64(dense).reshape(n_heads, spec.head_dim, -1)
    right = torch.einsum("hdr,hdn->hrn", basis, W)
    bias = None
    if dense.bias is not None:  # the projection keeps Q_h Q_h^T b_h
        b = dense.bias.detach().to(torch.float64).reshape(n_heads, spec.head_dim)
        bias = torch.einsum("hdr,hr->hd", basis, torch.einsum("hdr,hd->hr", basis, b)).reshape(-1)
    module = HeadwiseProjection.from_factors(basis, right, bias, dtype=dense.weight.dtype,
                                             device=dense.weight.device)
    set_linear(model, layer, role, module, spec)


def _refit_o(model, spec: ArchSpec, layer: int, moments, w_o: torch.Tensor, bases: torch.Tensor,
             damping: float = 1e-6) -> None:
    r"""Least-squares ``W_o`` for the kept value subspaces: ``W_o C P (P^T C P + lam I)^{-1}``.

    ``C`` is the second moment of the dense ``o_proj`` input ``z`` (all heads),
    ``P = blockdiag(Q_{g(h)})``: the folded heads deliver ``P^T z`` exactly, so
    this is the output-optimal ``o_proj`` for them (FLAT's ``W_o P`` is the
    special case ``C`` block-diagonal with ``Q`` invariant). ``lam`` is
    ``damping`` times the mean diagonal of ``P^T C P``.
    """
    o_proj = get_linear(model, layer, "o", spec)
    kv_of_head = torch.arange(spec.num_heads) // spec.group_size
    basis = bases.to(torch.float64).cpu()
    P = torch.block_diag(*[basis[g] for g in kv_of_head.tolist()])  # (H d_h, H r)
    C = moments.second_moment().to(torch.float64).cpu()
    CP = C @ P
    A = P.T @ CP
    A = A + damping * float(torch.diagonal(A).mean()) * torch.eye(A.shape[0], dtype=A.dtype)
    L = torch.linalg.cholesky(A)
    W = torch.cholesky_solve((w_o.cpu() @ CP).T, L).T
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
    A = A + 1e-12 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)[:, None, None] * torch.eye(d, dtype=A.dtype)
    L = torch.linalg.cholesky(A)
    Z = torch.linalg.solve_triangular(L, (W @ Ch @ Q).transpose(1, 2), upper=False)  # (H, d, n)
    kept = torch.cumsum((Z**2).sum(dim=(0, 2)), 0)
    return torch.cat([torch.tensor([total], dtype=torch.float64), (total - kept).clamp_min(0.0)])


def _error_split(spec: ArchSpec, budget: int, vo_loss: torch.Tensor, path, tokens: int) -> tuple[int, int]:
    """The (value head dim, MLP channels) within a layer's parameter budget with the least summed error.

    Both errors are in the residual stream, per token: ``vo_loss[r]`` from
    :func:`_value_output_losses`, the MLP's from the elimination path
    (interpolated between its rounds).
    """
    d, f = spec.head_dim, spec.intermediate_size
    fixed, per_rank, per_channel = _split_costs(spec)
    counts = lrmath._backend.to_numpy(path.counts)[::-1].astype(float)
    objective = lrmath._backend.to_numpy(path.objective)[::-1] / tokens
    best = None
    for r in range(1, d + 1):
        k = min(f, (budget - fixed - per_rank * r) // per_channel)
        if k < max(1, counts[0]):
            continue
        err = float(vo_loss[r]) + float(np.interp(k, counts, objective))
        if best is None or err < best[0]:
            best = (err, r, int(k))
    if best is None:
        raise ValueError(f"no (head dim, channels) split fits the layer budget of {budget} parameters")
    return best[1], best[2]


def _nystrom_mlp(model, spec: ArchSpec, layer: int, moments, channels: int, ridge: float,
                 selection: str = "leverage", kept=None) -> None:
    """Keep ``channels`` MLP channels (selected here, or the ascending ``kept`` given) and refit ``W_down``."""
    down = get_linear(model, layer, "down", spec)
    if kept is None:
        weight = weight64(down).cpu() if selection == "obs" else None
        sel = lrmath.nystrom_select(moments.gram, channels, ridge=ridge, method=selection, weight=weight,
                                    psd_rtol=gram_psd_rtol(moments.gram.shape[-1]))
        kept = sel.indices
        new_weight = weight64(down) @ sel.reconstruction
    else:  # W_down R solved for its rows directly (lrmath.nystrom_fold): R itself is never needed
        new_weight = lrmath.nystrom_fold(moments.gram, torch.as_tensor(kept), weight64(down).cpu(), ridge=ridge)
    keep = torch.as_tensor(lrmath._backend.to_numpy(kept), dtype=torch.long)
    roles = ("gate", "up") if spec.mlp_kind == "gated" else ("up",)
    for role in roles:
        dense = get_linear(model, layer, role, spec)
        narrow = nn.Linear(dense.in_features, channels, bias=dense.bias is not None,
                           device=dense.weight.device, dtype=dense.weight.dtype)
        with torch.no_grad():
            narrow.weight.copy_(dense.weight[keep.to(dense.weight.device)])
            if dense.bias is not None:
                narrow.bias.copy_(dense.bias[keep.to(dense.weight.device)])
        set_linear(model, layer, role, narrow, spec)
    down = get_linear(model, layer, "down", spec)
    new_down = nn.Linear(channels, down.out_features, bias=down.bias is not None,
                         device=down.weight.device, dtype=down.weight.dtype)
    with torch.no_grad():
        new_down.weight.copy_(new_weight.to(device=down.weight.device, dtype=down.weight.dtype))
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
    set_linear(model, layer, "down", new_down, spec)


def _split_layer(model, spec: ArchSpec, layer: int, layer_stats, w: float, ridge: float, v_basis: str):
    """``split="error"``: one layer's head dim and channels under its IPRS budget, the kept MLP channels
    (ascending), and the nested value bases (G, d_h, d_h) it priced (their first ``r`` columns are the
    rank-``r`` bases)."""
    budget = layer_parameters(spec, w, qk=False)
    d = spec.head_dim
    fixed, per_rank, per_channel = _split_costs(spec)
    k_min = max(1, min(spec.intermediate_size, (budget - fixed - per_rank * d) // per_channel))
    w_o = weight64(get_linear(model, layer, "o", spec)).cpu()
    if v_basis == "output":
        bases = _output_bases(spec, layer_stats.inputs["o"], w_o, d)
    else:
        bases = torch.as_tensor(lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), d).basis)
    vo_loss = _value_output_losses(spec, layer_stats.inputs["o"], w_o, bases)
    down_stats = layer_stats.inputs["down"]
    weight = weight64(get_linear(model, layer, "down", spec)).cpu()
    # one elimination down to the smallest count any split can use prices every count above it
    path = lrmath.obs_path(down_stats.gram, k_min, ridge=ridge, weight=weight,
                           psd_rtol=gram_psd_rtol(down_stats.gram.shape[-1]))
    head_rank, channels = _error_split(spec, budget, vo_loss, path, down_stats.count)
    removed = lrmath._backend.to_numpy(path.removed)[: spec.intermediate_size - channels]
    kept = np.setdiff1d(np.arange(spec.intermediate_size), removed)  # ascending
    return head_rank, channels, kept, bases


def _run(model, spec, batches, *, ratio, progress, qk, paper, ridge, stats=None, selection="leverage",
         refit_o=False, v_basis="pca", split="uniform") -> RecipeResult:
    if selection not in ("leverage", "obs"):
        raise ValueError(f"selection must be 'leverage' or 'obs', got {selection!r}")
    if v_basis not in ("pca", "output"):
        raise ValueError(f"v_basis must be 'pca' or 'output', got {v_basis!r}")
    if split not in ("uniform", "error"):
        raise ValueError(f"split must be 'uniform' or 'error', got {split!r}")
    if split == "error" and (qk or selection != "obs" or not refit_o):
        raise ValueError("split='error' prices the MLP by the obs elimination path and V/O by the "
                         "least-squares o_proj: it needs selection='obs', refit_o=True and qk=False")
    needs_o = refit_o or v_basis == "output"
    result = RecipeResult()
    if stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, flat_plan(spec, qk=qk, refit_o=needs_o),
                                    progress=progress)
    if needs_o and any("o" not in s.inputs for s in stats.layers):
        raise ValueError("refit_o=True and v_basis='output' need the o_proj input statistic ('o'); "
                         "calibrate with flat_plan(spec, qk=..., refit_o=True)")
    result.calibration_tokens = stats.tokens
    with timer(result.timings, "decisions"):
        mode = "reference" if paper else "paper"
        importance = np.array([float(s.importance.value(mode)) for s in stats.layers])
        L = len(importance)
        if paper:
            if qk:
                keep = 1.0 - ratio
            else:  # FLAT's accounting: Q/K dense, the other modules carry the whole budget
                n, d, H, G, f = (spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                 spec.intermediate_size)
                dq, dk, dv, do = H * d * n, G * d * n, G * d * n, H * d * n
                keep = ((1 - ratio) * (3 * f * n + dq + dk + dv + do) - (dq + dk)) / (3 * f * n + dv + do)
            w = lrmath._backend.to_numpy(lrmath.iprs_allocate(importance, keep * L))
        else:
            w = _search_keep(importance, spec, ratio, qk)
    with timer(result.timings, "surgery"):
        for layer, layer_stats in enumerate(stats.layers):
            head_rank, channels = _ranks(spec, float(w[layer]))
            kept = priced = None
            if split == "error":
                head_rank, channels, kept, priced = _split_layer(model, spec, layer, layer_stats, float(w[layer]),
                                                                  ridge, v_basis)
            if head_rank < spec.head_dim:
                pca = lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), head_rank)
                bases = pca.basis
                # for the plots: the value spectrum summed over KV heads, with the kept head dim
                result.spectra[f"{layer}.v"] = (lrmath._backend.to_numpy(pca.eigenvalues).sum(axis=0), head_rank)
                w_o = weight64(get_linear(model, layer, "o", spec))
                if priced is not None:  # the split already computed the nested bases
                    bases = priced[..., :head_rank].to(device=w_o.device)
                elif v_basis == "output":
                    bases = _output_bases(spec, layer_stats.inputs["o"], w_o, head_rank).to(
                        device=w_o.device)
                fold_value_output(get_attention(model, layer, spec), spec, bases)
                if refit_o:
                    _refit_o(model, spec, layer, layer_stats.inputs["o"], w_o, torch.as_tensor(bases))
            if qk and head_rank < spec.head_dim:
                for role in ("q", "k"):
                    _fold_qk(model, spec, layer, role, layer_stats.head_outputs[role], head_rank)
            if channels < spec.intermediate_size:
                _nystrom_mlp(model, spec, layer, layer_stats.inputs["down"], channels, ridge, selection, kept)
            result.ranks[str(layer)] = {"kept_fraction": float(w[layer]), "head_rank": head_rank,
                                        "mlp_channels": channels}
    result.details = {"importance": importance.tolist(), "kept_fraction": [float(x) for x in w],
                      "qk": qk, "ridge": ridge, "accounting": "paper" if paper else "exact",
                      "selection": selection, "refit_o": refit_o, "v_basis": v_basis, "split": split}
    return result


@register("flat")
def run_flat(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True, qk: bool = False,
             ridge: float = 1e-3, selection: str = "leverage", refit_o: bool = False,
             v_basis: str = "pca", split: str = "uniform", stats=None) -> RecipeResult:
    """FLAT-LLM with exact parameter accounting and a relative Nystrom ridge.

    Parameters
    ----------
    qk : bool
        Also compress Q/K by head-wise PCA before RoPE (few parameters saved per
        rank dropped, since each head keeps its ``d_h x r`` expansion).
    ridge : float
        Relative ridge of the Nystrom refit, ``lam = ridge * tr(C) / d``.
    selection : {"leverage", "obs"}
        MLP channels by ridge leverage scores (FLAT) or by output-aware
        elimination against ``W_down`` (:func:`lrmath.nystrom_select`).
    refit_o : bool
        Refit ``o_proj`` by least squares on the kept value subspaces
        (needs the ``o_proj`` input statistic; see :func:`_refit_o`).
    v_basis : {"pca", "output"}
        Value subspaces by head-wise PCA of the value outputs (FLAT) or by
        ``o_proj``'s output error under the attention-mixed inputs
        (:func:`_output_bases`; needs the ``o_proj`` input statistic).
    split : {"uniform", "error"}
        How a layer's IPRS budget is shared between V/O and the MLP: FLAT's
        one kept fraction for both, or the (head dim, channels) pair within
        the same parameters with the least summed residual-stream error
        (V/O priced per head with least-squares ``o_proj`` blocks, the MLP by
        the elimination path of :func:`lrmath.nystrom_select`; FLAT's pair is
        one of the candidates). Needs ``selection="obs"``, ``refit_o=True``.

    Notes
    -----
    Tian et al., FLAT-LLM (arXiv 2505.23966): Theorem 4.1 (V/O PCA error =
    dropped eigenvalues), Algorithm 1 (IPRS), appendix C (Nystrom MLP).
    """
    return _run(model, spec, batches, ratio=ratio, progress=progress, qk=qk, paper=False, ridge=ridge,
                stats=stats, selection=selection, refit_o=refit_o, v_basis=v_basis, split=split)


@register("flat-paper")
def run_flat_paper(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True,
                   qk: bool = False, ridge: float = 1e-6, stats=None) -> RecipeResult:
    """FLAT-LLM as published: IPRS with ``B = L * kept``, FLAT's budget formula, one rank per layer.

    The statistics stay float64 and the Nystrom refit keeps a tiny relative
    ridge (the reference's effectively-zero ridge explodes with fewer
    calibration tokens than MLP channels).
    """
    return _run(model, spec, batches, ratio=ratio, progress=progress, qk=qk, paper=True, ridge=ridge,
                stats=stats)
