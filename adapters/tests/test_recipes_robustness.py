"""Recipes where calibration is degenerate or the model is not on the host.

Few or collinear calibration tokens leave float32-accumulated statistics PSD only to
rounding (damped factorisations, raised ridges); a model on CUDA must get every operand,
and its batches, on its own device (the GPU-marked tests skip without one).
"""

import pytest
import torch

import lrmath_hf

from ._tiny_models import tiny_model, token_batch
from .test_recipes import RECIPES, calibration


def test_damped_cholesky_handles_semidefinite_dead_and_indefinite_blocks():
    """Gram statistics PSD only to float32 rounding get the first damping that factors; zero blocks are dead.

    The value pricing and the ``o_proj`` refit of the output-aware FLAT recipes factor such blocks
    with :func:`lrmath.damped_cholesky` (its general contract: proofs_tests/test_damped_cholesky.py).
    """
    import lrmath
    from lrmath.whitening import CHOLESKY_SCHEDULE

    gen = torch.Generator().manual_seed(0)
    k = 48
    X = torch.randn(k, 6, generator=gen, dtype=torch.float32) * torch.logspace(0, 3, 6)
    rank_deficient = (X @ X.T).to(torch.float64)  # rank 6, float32 rounding: not PD numerically
    spd = torch.eye(k, dtype=torch.float64) + 0.1 * torch.ones(k, k, dtype=torch.float64)
    A = torch.stack([rank_deficient, torch.zeros(k, k, dtype=torch.float64), spd])
    L, _, alive = lrmath.damped_cholesky(A, 1e-12)
    assert alive.tolist() == [True, False, True]
    assert torch.equal(L, torch.tril(L))
    assert torch.equal(L[1], torch.eye(k, dtype=torch.float64))
    for h in (0, 2):
        m = float(A[h].diagonal().mean())
        shift = (L[h] @ L[h].T - A[h]).diagonal() / m  # the relative damping actually used
        alpha = float(shift.mean())
        assert alpha <= CHOLESKY_SCHEDULE[-1] * (1 + 1e-9)
        off = L[h] @ L[h].T - A[h] - alpha * m * torch.eye(k, dtype=torch.float64)
        assert float(off.abs().max()) <= 1e-10 * float(A[h].abs().max())
    assert float((L[2] @ L[2].T - spd).abs().max()) <= 1e-9  # SPD: the requested 1e-12 was enough
    for bad in (-torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))):
        with pytest.raises(ValueError, match="not positive semidefinite"):
            lrmath.damped_cholesky(bad[None], 1e-12)


@pytest.mark.parametrize("recipe", ["flat", "auto", "flat-paper"])
def test_output_aware_flat_survives_collinear_calibration(recipe):
    """Fewer calibration tokens than o_proj inputs (a rank-deficient float32 Gram) still compresses."""
    model = tiny_model("llama", dtype=torch.float32)
    batches = [token_batch(seed=11, batch=1, length=5)]
    options = {"refit_o": True} if recipe == "flat" else {}
    report = lrmath_hf.compress(model, batches, recipe=recipe, ratio=0.3, progress=False, **options)
    assert report.ratio_achieved > 0
    assert torch.isfinite(model(token_batch(seed=5)).logits).all()


def test_flat_paper_raises_the_ridge_with_a_warning_on_three_tokens():
    """flat-paper's small ridge is below the rounding of a 3-token Gram: raised, and said so."""
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="relative ridge raised from"):
        lrmath_hf.compress(model, [token_batch(seed=3, batch=1, length=3)], recipe="flat-paper", ratio=0.3,
                           progress=False)
    assert torch.isfinite(model(token_batch(seed=5)).logits).all()


def test_split_by_error_raises_each_layers_ridge_once():
    """Under ``split="error"`` the elimination path and the later fold factor the same statistic:
    the fold starts from the ridge the path needed, so each layer warns (at most) once."""
    import warnings

    model = tiny_model("llama", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrmath_hf.compress(model, [token_batch(seed=3, batch=1, length=3)], recipe="flat", ratio=0.3,
                           progress=False, split="error", selection="obs", refit_o=True, ridge=1e-9)
    raised = [str(w.message).split(":")[0] for w in caught if "relative ridge raised" in str(w.message)]
    assert raised, "three tokens should need a larger ridge than 1e-9"
    assert len(raised) == len(set(raised)), raised
    assert torch.isfinite(model(token_batch(seed=5)).logits).all()


def test_ridge_escalation_stops_at_its_cap_and_reraises():
    from lrmath.nystrom import RidgeTooSmallError
    from lrmath_hf.recipes.common import MAX_RIDGE, with_ridge_escalation

    tried = []

    def never(r):
        tried.append(r)
        raise RidgeTooSmallError("no")

    with pytest.raises(RidgeTooSmallError):
        with_ridge_escalation(never, 1e-6, "x")
    assert tried[0] == 1e-6 and tried[-1] == MAX_RIDGE and all(b > a for a, b in zip(tried, tried[1:]))
    assert with_ridge_escalation(lambda r: 2 * r, 1e-3, "x") == (2e-3, 1e-3)  # no warning, nothing raised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("recipe", RECIPES + ("flat-obs",))
def test_recipe_runs_on_cuda(recipe, tmp_path):
    """Every recipe on a model and calibration living on CUDA: no operand left on the host.

    (The first H200 run found ``auto`` mixing a host weight with device statistics.) The
    calibration stays on the host, as a tokenizer returns it.
    """
    model = tiny_model("llama", dtype=torch.float32).to("cuda")
    batches = calibration()  # host token ids, as a tokenizer gives them: compress moves them
    name, options = ("flat", {"selection": "obs", "refit_o": True}) if recipe == "flat-obs" else (recipe, {})
    report = lrmath_hf.compress(model, batches, recipe=name, ratio=0.3, progress=False, **options)
    assert 0.15 <= report.ratio_achieved <= 0.45, report.ratio_achieved
    assert all(p.device.type == "cuda" for p in model.parameters())
    ids = token_batch(seed=5).to("cuda")
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    lrmath_hf.save_compressed(model, tmp_path / "m", report=report.to_dict(), recipe=name)
    loaded = lrmath_hf.load_compressed(tmp_path / "m", device="cuda")
    assert torch.equal(loaded(ids).logits, logits)


def test_calibration_batches_follow_the_model_to_its_input_device():
    """Host batches are moved to where the model reads its inputs (a no-op on the CPU; CUDA: the GPU tests)."""
    from lrmath_hf.calibrate import input_device, to_input_device

    model = tiny_model("llama", dtype=torch.float32)
    assert input_device(model) == model.get_input_embeddings().weight.device
    ids = token_batch(seed=1)
    assert to_input_device(ids, model).device == input_device(model)
    moved = to_input_device({"input_ids": ids, "use_cache": False}, model)
    assert moved["use_cache"] is False and torch.equal(moved["input_ids"], ids)
