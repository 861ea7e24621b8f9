"""FLAR's held-out shrinkage on tiny encoders: fold statistics, held-out error, the choice, options."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lrmath
from lrmath_hf.recipes.flar import (
    HELDOUT_GRID,
    flar_statistics,
    fold_batches,
    heldout_error,
    heldout_intensity,
    merge_statistics,
    shrunk_covariance,
)
from lrmath_hf.specs import get_spec

from .test_flar import F64, _batches, _compress
from .test_vision_specs import tiny_vision_model


@pytest.fixture(scope="module")
def dense():
    return tiny_vision_model("dinov2")


def test_fold_statistics_merge_to_the_statistics_of_all_batches(dense):
    spec = get_spec(dense)
    folds = fold_batches(_batches(3), 2)
    assert [len(f) for f in folds] == [2, 1] and torch.equal(folds[1][0], _batches(3)[1])  # batch i -> fold i % 2
    assert [sum(len(b) for b in f) for f in fold_batches(_batches(1, size=5), 2)] == [3, 2]  # one batch: images
    with pytest.raises(ValueError, match="folds"):
        fold_batches(_batches(1, size=1), 2)
    whole = flar_statistics(dense, spec, _batches())
    parts = flar_statistics(dense, spec, _batches(), folds=2)
    merged = merge_statistics(parts)
    assert len(parts) == 2 and merged.tokens == whole.tokens == sum(p.tokens for p in parts)
    for a, b in zip(merged.layers, whole.layers):
        assert a.inputs.keys() == b.inputs.keys()
        for name in a.inputs:
            assert a.inputs[name].count == b.inputs[name].count
            torch.testing.assert_close(a.inputs[name].mean, b.inputs[name].mean, rtol=1e-12, atol=1e-12)
            # per-batch Gram products are float32 (CalibrationPlan.gram_dtype), merged in float64
            torch.testing.assert_close(a.inputs[name].covariance(), b.inputs[name].covariance(), rtol=1e-5, atol=1e-6)
    assert parts[0].layers[0].inputs["q+k+v"].count > 0  # the first fold is not empty either
    with pytest.raises(ValueError, match="folds"):
        flar_statistics(dense, spec, _batches(), folds=0)


def _moments(X):
    return lrmath.Moments(X.shape[1]).update(X)


@pytest.mark.parametrize("m", [6, 20])  # m <= p (eigh of W C W^T) and m > p (square root of C)
@pytest.mark.parametrize("center", [True, False])
def test_heldout_error_is_the_test_error_of_the_whitened_truncation(m, center):
    rng = np.random.default_rng(1)
    p, r = 10, 3
    mix = rng.standard_normal((p, p)) * np.logspace(0, 1.5, p)
    fit = _moments(torch.from_numpy(2.0 + rng.standard_normal((30, p)) @ mix))
    test = _moments(torch.from_numpy(1.0 + rng.standard_normal((50, p)) @ mix))
    W = [torch.from_numpy(rng.standard_normal((m, p))), torch.from_numpy(rng.standard_normal((4, p)))]
    grid = [0.0, 0.3, 1.0]
    got = heldout_error(W, fit, test, grid, [r, 2], center=center)
    for s, value in zip(grid, got):
        C, _ = shrunk_covariance(fit, s, center=center)
        L = torch.linalg.cholesky(C)
        expected = 0.0
        for w, rank in zip(W, [r, 2]):
            U, sv, Vh = torch.linalg.svd(w @ L, full_matrices=False)
            w_r = U[:, :rank] @ torch.diag(sv[:rank]) @ Vh[:rank] @ torch.linalg.inv(L)  # whitened truncation
            D = w - w_r
            if center:  # scored about the FIT's mean: the bias correction uses it
                d = test.mean - fit.mean
                T = test.covariance() + torch.outer(d, d)
            else:
                T = test.second_moment()
            expected += float(torch.trace(D @ T @ D.T))
        assert value == pytest.approx(expected, rel=1e-8)


def test_heldout_intensity_picks_zero_when_the_folds_agree_and_shrinks_noise():
    rng = np.random.default_rng(2)
    p = 16
    # anisotropic inputs, two folds with the SAME statistic: the held-out truth is the fit, so s = 0 is optimal
    X = torch.from_numpy(rng.standard_normal((24, p)) * np.logspace(0, 2, p))
    same = _moments(X)
    W = [torch.from_numpy(rng.standard_normal((8, p)))]
    choice = heldout_intensity(W, [same, same.copy()], _moments(torch.cat([X, X])), [3])
    assert choice["ledoit_wolf"] > 0  # Ledoit-Wolf would shrink ...
    assert choice["multiple"] == 0.0 and choice["intensity"] == 0.0  # ... the held-out choice does not
    assert min(choice["errors"][1:]) > choice["errors"][0]
    # isotropic inputs and few samples per fold: the sample covariance is noise, shrinking helps
    folds = [_moments(torch.from_numpy(rng.standard_normal((12, p)))) for _ in range(2)]
    full = folds[0].copy().merge(folds[1])
    choice = heldout_intensity(W, folds, full, [3])
    assert choice["multiple"] > 0 and choice["intensity"] > 0
    lw = float(lrmath.ledoit_wolf(full).shrinkage)
    assert choice["intensity"] == pytest.approx(min(1.0, choice["multiple"] * lw))
    assert choice["errors"][HELDOUT_GRID.index(choice["multiple"])] == min(choice["errors"])
    with pytest.raises(ValueError, match="2 folds"):
        heldout_intensity(W, [same], same, [3])
    with pytest.raises(ValueError, match="grid"):
        heldout_intensity(W, [same, same], same, [3], grid=[0.0, -1.0])


def test_heldout_reports_its_choice(dense):
    model = copy.deepcopy(dense)
    spec = get_spec(model)
    report = _compress(model, 0.3, criterion="weight", shrinkage="heldout")
    assert report.details["shrinkage"] == "heldout" and report.details["shrinkage_target"] == "diagonal"
    merged = merge_statistics(flar_statistics(dense, spec, _batches(), folds=2))
    multiples = report.details["heldout_multiple"]
    assert len(multiples) == spec.num_layers * len(spec.input_groups)
    for name, c in multiples.items():
        layer, group = name.split(".")
        lw = float(lrmath.ledoit_wolf(merged.layers[int(layer)].inputs[group], target="diagonal").shrinkage)
        assert c in HELDOUT_GRID
        assert report.details["shrinkage_intensity"][name] == pytest.approx(min(1.0, c * lw), rel=1e-6, abs=1e-12)
    assert _compress(copy.deepcopy(dense), 0.3, criterion="weight").details["shrinkage"] == "ledoit_wolf"  # default
    # precomputed folds give the same compression as calibrating inside
    again = _compress(copy.deepcopy(dense), 0.3, criterion="weight", shrinkage="heldout",
                      statistics=flar_statistics(dense, spec, _batches(), folds=2))
    assert again.ranks == report.ranks and again.details["shrinkage_intensity"] == report.details["shrinkage_intensity"]


def test_search_memo_is_not_shared_between_whitenings(dense):
    memo = {}
    _compress(copy.deepcopy(dense), 0.3, criterion="feature", allocation="threshold", search_memo=memo, shrinkage=0.0)
    other = _compress(copy.deepcopy(dense), 0.3, criterion="feature", allocation="threshold", search_memo=memo,
                      shrinkage=0.5)
    assert other.details["forward_passes"]["memo_hits"] == 0  # other factors: nothing to reuse


def test_heldout_options_are_refused(dense):
    spec = get_spec(dense)
    with pytest.raises(ValueError, match="fold statistics"):
        _compress(copy.deepcopy(dense), shrinkage="heldout", statistics=flar_statistics(dense, spec, _batches()))
    for grid in ([], [-0.5], ["a"], None):
        with pytest.raises(ValueError, match="grid"):
            _compress(copy.deepcopy(dense), shrinkage="heldout", heldout_grid=grid)
    with pytest.raises(ValueError, match="heldout"):
        shrunk_covariance(lrmath.Moments(3).update(torch.randn(5, 3, dtype=F64)), "heldout")
    with pytest.raises(ValueError, match="shrinkage"):
        _compress(copy.deepcopy(dense), shrinkage=True)


@pytest.mark.parametrize("m", [6, 20])
def test_sample_energy_tail_is_the_sample_error_of_the_shrunk_truncation(m):
    """``error_covariance="sample"``: every tail sum of ``sample_energy`` is
    ``tr((W - W_r) S_0 (W - W_r)^T)`` for the truncation whitened under the SHRUNK covariance."""
    from lrmath_hf.recipes.flar import sample_energy

    rng = np.random.default_rng(3)
    p = 12
    mix = rng.standard_normal((p, p)) * np.logspace(0, 2, p)
    stats = _moments(torch.from_numpy(rng.standard_normal((40, p)) @ mix))
    S0, _ = shrunk_covariance(stats, "none")
    C, s = shrunk_covariance(stats, 0.2, target="diagonal")
    W = torch.from_numpy(rng.standard_normal((m, p)))
    svd = lrmath.whitened_svd(W, lrmath.whiten(C, method="cholesky"), min(m, p))
    energy = sample_energy(svd.singular_values, svd.right, S0)
    for r in range(min(m, p) + 1):
        D = W - svd.left[:, :r] @ svd.right[:r]
        assert float(energy[r:].sum()) == pytest.approx(float(torch.trace(D @ S0 @ D.T)), rel=1e-9, abs=1e-12)
    # at s = 0 the energies are the squared singular values
    svd0 = lrmath.whitened_svd(W, lrmath.whiten(S0, method="cholesky"), min(m, p))
    torch.testing.assert_close(sample_energy(svd0.singular_values, svd0.right, S0), svd0.singular_values**2,
                               rtol=1e-9, atol=1e-12 * float(svd0.singular_values[0]) ** 2)


def test_non_increasing_pools_violators_and_keeps_block_tail_sums():
    from lrmath_hf.recipes.flar_ranks import non_increasing

    x = torch.tensor([5.0, 1.0, 3.0, 2.0, 2.0, 0.5], dtype=F64)
    y = non_increasing(x)
    assert torch.all(y[:-1] >= y[1:])
    torch.testing.assert_close(y, torch.tensor([5.0, 2.0, 2.0, 2.0, 2.0, 0.5], dtype=F64))
    assert float(y.sum()) == pytest.approx(float(x.sum()))
    sorted_in = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    torch.testing.assert_close(non_increasing(sorted_in), sorted_in)  # already descending: unchanged


def test_sample_error_covariance_changes_only_ranks(dense):
    """The factors are whitened as before; with no shrinkage the option changes nothing at all."""
    base = copy.deepcopy(dense)
    same = copy.deepcopy(dense)
    r0 = _compress(base, shrinkage="none")
    r1 = _compress(same, shrinkage="none", error_covariance="sample")
    assert r0.ranks == r1.ranks
    pixels = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values=pixels).last_hidden_state,
                                   same(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)
    for shrinkage in (0.3, "ledoit_wolf"):  # targets mu I and Diag(S)
        report = _compress(copy.deepcopy(dense), shrinkage=shrinkage, error_covariance="sample")
        assert report.details["error_covariance"] == "sample" and 0.15 <= report.ratio_achieved <= 0.45
    with pytest.raises(ValueError, match="error_covariance"):
        _compress(copy.deepcopy(dense), error_covariance="held-out")
