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
from .common import gram_psd_rtol, run_calibration, timer, weight64, with_ridge_escalation
from .flat_output import _output_bases, _refit_o, _round_channels, _split_layer

__all__ = ["flat_plan", "layer_parameters", "run_flat", "run_flat_paper"]


def flat_plan(spec: ArchSpec, *, qk: bool, refit_o: bool = False) -> CalibrationPlan:
    heads = {"v": (spec.linears["v"], spec.num_kv_heads, spec.head_dim)}
    if qk:
        heads["q"] = (spec.linears["q"], spec.num_heads, spec.head_dim)
        heads["k"] = (spec.linears["k"], spec.num_kv_heads, spec.head_dim)
    inputs = {"down": spec.linears["down"]}
    if refit_o:
        inputs["o"] = spec.linears["o"]
    return CalibrationPlan(inputs=inputs, head_outputs=heads, importance=True, order=2)  # second moments only


def _ranks(spec: ArchSpec, w: float, channel_multiple: int = 1) -> tuple[int, int]:
    head_rank = max(1, min(spec.head_dim, math.floor(w * spec.head_dim)))
    f, m = spec.intermediate_size, channel_multiple
    channels = max(1, min(f, math.floor(w * f)))
    if channels < f:  # a reduced layer keeps at least one multiple
        channels = min(f, max(m, _round_channels(channels, f, m)))
    return head_rank, channels


def layer_parameters(spec: ArchSpec, w: float, *, qk: bool, channel_multiple: int = 1) -> int:
    """Parameters of one layer's q, k, v, o, gate, up, down at kept fraction ``w``."""
    n, d, H, G = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    r, k = _ranks(spec, w, channel_multiple)
    qk_params = (H + G) * r * (n + d) if qk else (H + G) * d * n
    mlp = (3 if spec.mlp_kind == "gated" else 2) * n * k
    return qk_params + G * r * n + n * H * r + mlp


def _dense_layer_parameters(spec: ArchSpec) -> int:
    n, d, H, G, f = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    return 2 * (H + G) * d * n + (3 if spec.mlp_kind == "gated" else 2) * n * f


def _search_keep(importance, spec: ArchSpec, ratio: float, qk: bool, channel_multiple: int = 1) -> np.ndarray:
    """Largest IPRS budget whose realised parameters remove at least ``ratio`` (bisection)."""
    L = len(importance)
    target = (1.0 - ratio) * L * _dense_layer_parameters(spec)

    def realised(keep: float) -> tuple[float, np.ndarray]:
        w = lrmath._backend.to_numpy(lrmath.iprs_allocate(importance, keep * L))
        return sum(layer_parameters(spec, float(x), qk=qk, channel_multiple=channel_multiple) for x in w), w

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


def _nystrom_mlp(model, spec: ArchSpec, layer: int, moments, channels: int, ridge: float,
                 selection: str = "leverage", kept=None) -> None:
    """Keep ``channels`` MLP channels (selected here, or the ascending ``kept`` given) and refit ``W_down``."""
    down = get_linear(model, layer, "down", spec)
    if kept is None:
        weight = weight64(down).to(moments.gram.device) if selection == "obs" else None
        sel, _ = with_ridge_escalation(
            lambda r: lrmath.nystrom_select(moments.gram, channels, ridge=r, method=selection, weight=weight,
                                            psd_rtol=gram_psd_rtol(moments.dim)), ridge, f"layer {layer} MLP")
        kept = sel.indices
        new_weight = weight64(down) @ sel.reconstruction
    else:  # W_down R solved for its rows directly (lrmath.nystrom_fold): R itself is never needed
        # (``ridge`` is then the one the split's elimination path already needed)
        new_weight, _ = with_ridge_escalation(
            lambda r: lrmath.nystrom_fold(moments.gram, torch.as_tensor(kept, device=moments.gram.device),
                                          weight64(down).to(moments.gram.device), ridge=r), ridge,
            f"layer {layer} MLP")
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


def _run(model, spec, batches, *, ratio, progress, qk, paper, ridge, stats=None, selection="leverage",
         refit_o=False, v_basis="pca", split="uniform", sequential=False, channel_multiple=1) -> RecipeResult:
    if selection not in ("leverage", "obs"):
        raise ValueError(f"selection must be 'leverage' or 'obs', got {selection!r}")
    if v_basis not in ("pca", "output"):
        raise ValueError(f"v_basis must be 'pca' or 'output', got {v_basis!r}")
    if split not in ("uniform", "error"):
        raise ValueError(f"split must be 'uniform' or 'error', got {split!r}")
    if int(channel_multiple) != channel_multiple or channel_multiple < 1:
        raise ValueError(f"channel_multiple must be a positive integer, got {channel_multiple!r}")
    channel_multiple = int(channel_multiple)
    if split == "error" and (qk or selection != "obs" or not refit_o):
        raise ValueError("split='error' prices the MLP by the obs elimination path and V/O by the "
                         "least-squares o_proj: it needs selection='obs', refit_o=True and qk=False")
    if sequential and stats is not None:
        raise ValueError("sequential=True takes each layer's statistics from the compressed earlier layers; "
                         "it cannot reuse stats= from a dense calibration")
    needs_o = refit_o or v_basis == "output"
    plan = flat_plan(spec, qk=qk, refit_o=needs_o)
    result = RecipeResult()
    if sequential:  # IPRS needs every layer's importance first: one dense pass that keeps only the cosines
        with timer(result.timings, "importance"):
            scored = run_calibration(model, spec, batches, CalibrationPlan(importance=True), progress=progress)
    elif stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, plan, progress=progress)
    if stats is not None and needs_o and any("o" not in s.inputs for s in stats.layers):
        raise ValueError("refit_o=True and v_basis='output' need the o_proj input statistic ('o'); "
                         "calibrate with flat_plan(spec, qk=..., refit_o=True)")
    with timer(result.timings, "decisions"):
        mode = "reference" if paper else "paper"
        importance = np.array([float(s.importance.value(mode)) for s in (scored if sequential else stats).layers])
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
            w = _search_keep(importance, spec, ratio, qk, channel_multiple)

    def compress_layer(layer: int, layer_stats) -> None:
        head_rank, channels = _ranks(spec, float(w[layer]), channel_multiple)
        kept = priced = None
        mlp_ridge = ridge
        if split == "error":
            budget = layer_parameters(spec, float(w[layer]), qk=False, channel_multiple=channel_multiple)
            head_rank, channels, kept, priced, mlp_ridge = _split_layer(model, spec, layer, layer_stats, budget,
                                                                        ridge, v_basis, channel_multiple)
        if head_rank < spec.head_dim:
            pca = lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), head_rank)
            bases = pca.basis
            # for the plots: the value spectrum summed over KV heads, with the kept head dim
            result.spectra[f"{layer}.v"] = (lrmath._backend.to_numpy(pca.eigenvalues).sum(axis=0), head_rank)
            w_o = weight64(get_linear(model, layer, "o", spec))
            if priced is not None:  # the split already computed the nested bases
                bases = priced[..., :head_rank].to(device=w_o.device)
            elif v_basis == "output":
                bases = _output_bases(spec, layer_stats.inputs["o"], w_o, head_rank).to(device=w_o.device)
            fold_value_output(get_attention(model, layer, spec), spec, bases)
            if refit_o:
                _refit_o(model, spec, layer, layer_stats.inputs["o"], w_o, torch.as_tensor(bases))
        if qk and head_rank < spec.head_dim:
            for role in ("q", "k"):
                _fold_qk(model, spec, layer, role, layer_stats.head_outputs[role], head_rank)
        if channels < spec.intermediate_size:
            _nystrom_mlp(model, spec, layer, layer_stats.inputs["down"], channels, mlp_ridge, selection, kept)
        result.ranks[str(layer)] = {"kept_fraction": float(w[layer]), "head_rank": head_rank,
                                    "mlp_channels": channels}

    if sequential:
        with timer(result.timings, "calibration+surgery"):
            stats = run_calibration(model, spec, batches, plan, progress=progress, sequential=True,
                                    on_layer=compress_layer)
    else:
        with timer(result.timings, "surgery"):
            for layer, layer_stats in enumerate(stats.layers):
                compress_layer(layer, layer_stats)
    result.calibration_tokens = stats.tokens
    result.details = {"importance": importance.tolist(), "kept_fraction": [float(x) for x in w],
                      "qk": qk, "ridge": ridge, "accounting": "paper" if paper else "exact",
                      "selection": selection, "refit_o": refit_o, "v_basis": v_basis, "split": split,
                      "sequential": sequential, "channel_multiple": channel_multiple}
    return result


@register("flat")
def run_flat(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True, qk: bool = False,
             ridge: float = 1e-3, selection: str = "leverage", refit_o: bool = False,
             v_basis: str = "pca", split: str = "uniform", sequential: bool = False, channel_multiple: int = 1,
             stats=None) -> RecipeResult:
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
    sequential : bool
        Take each layer's statistics from the already-compressed earlier layers
        (compress layer ``l``, then propagate the calibration through it). The
        kept fractions still come from the dense model's importance, which one
        extra forward pass (cosines only) measures first; about three forward
        passes in all. Cannot be combined with ``stats``.
    channel_multiple : int
        Kept MLP channels are a multiple of this (unless the layer stays
        dense); the budget accounting counts the rounded widths, so the ratio
        still holds. CPU GEMMs run about 1.4x slower per output column at
        widths that are not multiples of 8 (measured on SmolLM2's
        ``512 x 576 @ 576 x k``), so ``auto`` uses 8.

    Notes
    -----
    Tian et al., FLAT-LLM (arXiv 2505.23966): Theorem 4.1 (V/O PCA error =
    dropped eigenvalues), Algorithm 1 (IPRS), appendix C (Nystrom MLP).
    """
    return _run(model, spec, batches, ratio=ratio, progress=progress, qk=qk, paper=False, ridge=ridge,
                stats=stats, selection=selection, refit_o=refit_o, v_basis=v_basis, split=split,
                sequential=sequential, channel_multiple=channel_multiple)


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
