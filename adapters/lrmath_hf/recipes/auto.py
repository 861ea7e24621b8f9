"""``global`` and ``auto``.

``auto`` is the recipe that measured best on the real SmolLM2-135M: today that
is ``flat`` (IPRS layer budgets from angular importance, head-wise V/O folded
into ``W_v`` / ``W_o``, Nystrom MLP with a relative ridge, exact parameter
accounting) with four output-aware refinements:

* ``selection="obs"``: MLP channels eliminated by their exact effect on the
  down projection's output;
* ``refit_o=True``: least-squares ``o_proj`` on the kept value subspaces;
* ``v_basis="output"``: the value subspaces chosen for ``o_proj``'s output
  under the attention-mixed values, not for the value energy;
* ``split="error"``: each layer's budget shared between V/O and the MLP by
  their summed residual-stream error.

Measured on the 20-window protocol (dense 13.26), 20 % / 40 %: plain ``flat``
23.68 / 55.98; + obs 22.30 / 50.79; + refit_o 19.99 / 37.94; + output bases
19.90 / 37.01; + error split 19.46 / 34.28. See docs/results.md for the runs.

``global``: structure-preserving compression with one global, output-error-driven allocation.

Factorising a linear costs ``r (m + n)`` parameters, so at moderate ratios a
low-rank pair keeps fewer directions than the same budget buys elsewhere.
``auto`` therefore uses only the two transformations that remove parameters
without a factorisation overhead, and lets them compete for one budget:

* V/O: FLAT-LLM's head-wise PCA of the value outputs folded into ``W_v`` /
  ``W_o`` (one value rank per layer; gains ``sum_g lambda_{g,r}``, cost
  ``(G + H) n`` per unit of rank), which also shrinks the V cache;
* MLP: Nystrom channel selection (ridge leverage order, FLAT-LLM appendix C)
  with the down-projection refit; the gain of each kept channel is measured
  in the MLP *output*: with ``P C P^T = L L^T`` in leverage order, keeping the
  first ``k`` channels reproduces ``tr(W_d C_k W_d^T) = sum_{j<=k} ||W_d P^T L e_j||^2``
  (cost ``3 n`` per channel for a gated MLP).

Every gain is normalised by the output energy of its block (relative output
error), and :func:`lrmath.allocate_ranks` picks the best components per
parameter across all layers. q and k stay dense (their PCA needs a per-head
expansion and saves little). The choice was measured on SmolLM2-135M against
the alternatives (see docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch

import lrmath

from ..attention import fold_value_output
from ..calibrate import CalibrationPlan
from ..specs import ArchSpec, get_attention, get_linear
from . import RecipeResult, register
from .common import gram_psd_rtol, run_calibration, timer, weight64
from .flat import _nystrom_mlp, run_flat
from .svd import _vo_spectrum

__all__ = ["mlp_channel_gains", "run_global", "run_auto"]


def mlp_channel_gains(W_down: torch.Tensor, moments, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Leverage order of the intermediate channels and each one's output-space gain.

    Returns ``(order, gains)``: keeping the first ``k`` channels of ``order``
    (what :func:`lrmath.nystrom_select` keeps) captures ``gains[:k].sum()`` of
    ``tr(W_d C W_d^T)`` (ridge-damped, the refit's metric).
    """
    C = moments.gram
    sel = lrmath.nystrom_select(C, 1, ridge=ridge, psd_rtol=gram_psd_rtol(C.shape[-1]))
    scores = lrmath._backend.to_numpy(sel.scores)
    order = np.argsort(-scores, kind="stable")
    perm = torch.as_tensor(order, device=C.device)
    Cp = C[perm][:, perm]
    damp = sel.lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    L = lrmath._backend.cholesky_or_none(Cp + damp)
    if L is None:  # numerically singular even with the ridge: fall back to the leverage scores
        return order, scores[order]
    gains = ((W_down[:, perm] @ L) ** 2).sum(dim=0)
    return order, lrmath._backend.to_numpy(gains)


@register("global")
def run_global(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True, multiple: int = 8,
             mlp_multiple: int = 32, ridge: float = 1e-3, stats=None) -> RecipeResult:
    """V/O PCA + Nystrom MLP with globally allocated value ranks and MLP widths.

    Parameters
    ----------
    ratio : float
        Fraction of all decoder-linear parameters (q, k, v, o, gate, up, down) to remove.
    multiple, mlp_multiple : int
        Value ranks are multiples of ``multiple``; MLP widths of ``mlp_multiple``.
    ridge : float
        Relative ridge of the Nystrom refit.
    stats : CalibrationResult, optional
        Reuse statistics of an earlier calibration (needs ``down`` inputs and ``v`` head outputs).
    """
    if spec.mlp_kind != "gated":
        raise ValueError(f"auto handles gated MLPs (llama, mistral, qwen2); {spec.model_type} is {spec.mlp_kind}")
    result = RecipeResult()
    plan = CalibrationPlan(inputs={"down": spec.linears["down"]},
                           head_outputs={"v": (spec.linears["v"], spec.num_kv_heads, spec.head_dim)},
                           importance=False, order=2)
    if stats is None:
        with timer(result.timings, "calibration"):
            stats = run_calibration(model, spec, batches, plan, progress=progress)
    result.calibration_tokens = stats.tokens
    n, d, H, G, f = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    L = len(stats.layers)
    with timer(result.timings, "decisions"):
        keys, spectra, cost, cap, orders = [], [], [], [], {}
        for layer, layer_stats in enumerate(stats.layers):
            vo = _vo_spectrum(layer_stats.head_outputs["v"])
            keys.append((layer, "vo"))
            spectra.append(vo / vo.sum() if vo.sum() > 0 else vo)
            cost.append((G + H) * n)
            cap.append(d)
            W_down = weight64(get_linear(model, layer, "down", spec))
            order, gains = mlp_channel_gains(W_down, layer_stats.inputs["down"], ridge)
            orders[layer] = order
            keys.append((layer, "mlp"))
            spectra.append(np.clip(gains, 0, None) / max(gains.sum(), np.finfo(float).tiny))
            cost.append(3 * n)
            cap.append(f)
        total = L * (2 * (H + G) * d * n + 3 * n * f)
        qk_dense = L * (H + G) * d * n
        budget = (1.0 - ratio) * total - qk_dense
        if budget <= 0:
            raise ValueError(f"ratio {ratio} removes more than v, o and the MLPs hold; use a smaller ratio")
        multiples = np.array([multiple if role == "vo" else mlp_multiple for _, role in keys])
        # allocate_ranks takes one grid; run it on blocks: each block of a group is one "rank unit"
        # gains in leverage order are not sorted: the running minimum is a lower bound on each block's gain
        block_spectra = [np.minimum.accumulate(np.add.reduceat(s, np.arange(0, len(s), m)))
                         for s, m in zip(spectra, multiples)]
        alloc = lrmath.allocate_ranks(block_spectra, budget, cost=np.asarray(cost, float) * multiples,
                                      min_rank=1)
        ranks = {key: min(int(b) * int(m), c) for key, b, m, c in zip(keys, alloc.ranks, multiples, cap)}
        result.spectra = {f"{layer}.{role}": (s, ranks[(layer, role)]) for (layer, role), s in zip(keys, spectra)}
    with timer(result.timings, "surgery"):
        for (layer, role), rank in ranks.items():
            if role == "vo" and rank < d:
                bases = lrmath.pca_truncate(stats.layers[layer].head_outputs["v"].second_moment(), rank).basis
                fold_value_output(get_attention(model, layer, spec), spec, bases)
            elif role == "mlp" and rank < f:
                _nystrom_mlp(model, spec, layer, stats.layers[layer].inputs["down"], rank, ridge)
            result.ranks[f"{layer}.{role}"] = rank
    result.details = {"ridge": ridge, "multiple": multiple, "mlp_multiple": mlp_multiple,
                      "allocation_gap": float(alloc.gap), "qk": "dense"}
    return result


@register("auto")
def run_auto(model, spec: ArchSpec, batches, *, ratio: float, progress: bool = True, **options) -> RecipeResult:
    """The measured-best recipe: ``flat`` with ``selection="obs"``, ``refit_o=True``, ``v_basis="output"``,
    ``split="error"``, ``channel_multiple=8``; ``options`` override."""
    options = {"selection": "obs", "refit_o": True, "v_basis": "output", "split": "error", "channel_multiple": 8,
               **options}
    result = run_flat(model, spec, batches, ratio=ratio, progress=progress, **options)
    result.details["auto"] = {"recipe": "flat", **{k: v for k, v in options.items() if k != "stats"}}
    return result


run_auto.forwards_options_to = "flat"  # its options are flat's (lrmath_hf.recipes.recipe_options)
