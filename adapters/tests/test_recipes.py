"""Recipes on tiny llama / mistral / qwen2: exact at full rank, budgets met, save/reload, generate."""

import copy
import json

import numpy as np
import pytest
import torch

import lrmath
import lrmath_hf
from lrmath_hf.attention import fold_value_output
from lrmath_hf.recipes.common import input_plan, install_factors, linear_parameters, run_calibration
from lrmath_hf.recipes.flat import flat_plan
from lrmath_hf.recipes.svd import whitened_factors
from lrmath_hf.specs import get_attention, get_spec

from ._tiny_models import ARCHS, tiny_model, token_batch

RECIPES = ("svd", "svd-llm", "flat", "flat-paper", "global", "auto", "latent")


def calibration(n=6, length=24, seed=1):
    return [token_batch(seed=seed + i, batch=2, length=length) for i in range(n)]


def rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_whitened_factors_reproduce_logits(arch):
    """Every linear replaced by its full-rank whitened factorisation: logits unchanged (float64)."""
    model = tiny_model(arch)
    spec = get_spec(model)
    ids = token_batch(seed=7)
    dense = model(ids).logits
    stats = run_calibration(model, spec, calibration(), input_plan(spec), progress=False)
    factors = whitened_factors(model, spec, stats, damping=0.0)
    for (layer, role), res in factors.items():
        install_factors(model, spec, layer, role, res.left, res.right)
    assert rel_err(model(ids).logits, dense) < 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_value_pca_reproduces_logits(arch):
    """FLAT V/O with all components kept (a rotation per KV head): logits unchanged."""
    model = tiny_model(arch)
    spec = get_spec(model)
    ids = token_batch(seed=3)
    dense = model(ids).logits
    stats = run_calibration(model, spec, calibration(), flat_plan(spec, qk=True), progress=False)
    for layer, layer_stats in enumerate(stats.layers):
        basis = lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), spec.head_dim).basis
        fold_value_output(get_attention(model, layer, spec), spec, basis)
    assert rel_err(model(ids).logits, dense) < 1e-10


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_meets_budget_and_round_trips(arch, recipe, tmp_path):
    model = tiny_model(arch, dtype=torch.float32)
    spec = get_spec(model)
    before = linear_parameters(model, spec)
    report = lrmath_hf.compress(model, calibration(), recipe=recipe, ratio=0.3, progress=False)
    after = linear_parameters(model, spec)
    assert report.linear_params_before == before and report.linear_params_after == after
    assert report.ratio_achieved == pytest.approx(1 - after / before)
    # the budget is met up to rounding of ranks (multiples of 8 on 16-dim heads are coarse)
    assert 0.15 <= report.ratio_achieved <= 0.45, report.ratio_achieved
    ids = token_batch(seed=5)
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    lrmath_hf.save_compressed(model, tmp_path / "m", report=report.to_dict(), recipe=recipe)
    loaded = lrmath_hf.load_compressed(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, logits)


def test_compress_rejects_bad_input():
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="ratio"):
        lrmath_hf.compress(model, calibration(), recipe="svd", ratio=1.2, progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        lrmath_hf.compress(model, calibration(), recipe="nope", ratio=0.2, progress=False)
    with pytest.raises(ValueError, match="empty"):
        lrmath_hf.compress(model, [], recipe="svd", ratio=0.2, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        lrmath_hf.compress(model, "some text", recipe="svd", ratio=0.2, progress=False)


def test_compress_refuses_what_the_model_cannot_read_before_any_work():
    """Bad calibration batches, unknown options and a recipe for another family are named up front."""
    model = tiny_model("llama", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = calibration() + [torch.full((1, 8), 128)]  # vocab is 128: ids 0..127
    with pytest.raises(ValueError, match=r"batch 6 has token ids in \[128, 128\], outside .*\[0, 128\)"):
        lrmath_hf.compress(model, bad, recipe="auto", ratio=0.2, progress=False)
    with pytest.raises(ValueError, match="batch 0 has token ids in \\[-1"):
        lrmath_hf.compress(model, [torch.full((1, 8), -1)], recipe="svd", ratio=0.2, progress=False)
    with pytest.raises(TypeError, match="batch 0 holds torch.float32 values: a llama model calibrates on token ids"):
        lrmath_hf.compress(model, [torch.randn(1, 8)], recipe="auto", ratio=0.2, progress=False)
    with pytest.raises(ValueError, match="dict without 'input_ids'"):
        lrmath_hf.compress(model, [{"ids": calibration()[0]}], recipe="auto", ratio=0.2, progress=False)
    with pytest.raises(TypeError, match="batch 0 must be a tensor"):
        lrmath_hf.compress(model, [[1, 2, 3]], recipe="auto", ratio=0.2, progress=False)
    with pytest.raises(TypeError, match="recipe 'auto' has no option 'nope'; its options: .*selection"):
        lrmath_hf.compress(model, calibration(), recipe="auto", ratio=0.2, progress=False, nope=1)
    with pytest.raises(TypeError, match="recipe 'svd-llm' has no option 'selection'"):
        lrmath_hf.compress(model, calibration(), recipe="svd-llm", ratio=0.2, progress=False, selection="obs")
    with pytest.raises(ValueError, match="'flar' is FLAR-SVD for ViT-family encoders.*llama is a decoder"):
        lrmath_hf.compress(model, calibration(), recipe="flar", ratio=0.2, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was touched


def test_tokenizer_batches_are_accepted():
    """A tokenizer's BatchEncoding (a Mapping, not a dict) calibrates like the bare token ids."""
    from transformers import BatchEncoding

    ranks = []
    def encoding(ids):
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    for wrap in (lambda ids: ids, encoding):
        model = tiny_model("llama", dtype=torch.float32)
        ranks.append(lrmath_hf.compress(model, [wrap(b) for b in calibration()], recipe="svd-llm", ratio=0.3,
                                        progress=False).ranks)
    assert ranks[0] == ranks[1]


def test_recipe_options_name_every_keyword_a_recipe_takes():
    from lrmath_hf.recipes import available_recipes, recipe_options

    for name in available_recipes():
        options = recipe_options(name)
        assert options is not None and "ratio" not in options and "progress" not in options, name
    assert set(recipe_options("flat")) <= set(recipe_options("auto"))
    assert "shrinkage" in recipe_options("flar") and "damping" in recipe_options("svd-llm")


def test_sequential_calibration_sees_compressed_inputs():
    """In sequential mode each layer's statistics come from the already-compressed layers before it."""
    model = tiny_model("llama")
    spec = get_spec(model)
    plan = input_plan(spec, roles=("q",))
    batches = calibration()
    dense_stats = run_calibration(copy.deepcopy(model), spec, batches, plan, progress=False)

    def shrink_layer(index, stats):  # a crude compression: zero the MLP output of layer 0
        if index == 0:
            torch.nn.init.zeros_(model.model.layers[0].mlp.down_proj.weight)

    seq = run_calibration(model, spec, batches, plan, progress=False, sequential=True, on_layer=shrink_layer)
    g_dense = dense_stats.layers[1].inputs["q+k+v"].gram
    g_seq = seq.layers[1].inputs["q+k+v"].gram
    assert not torch.allclose(g_dense, g_seq)
    # layer 0 saw the same inputs either way
    assert torch.allclose(dense_stats.layers[0].inputs["q+k+v"].gram, seq.layers[0].inputs["q+k+v"].gram)


def _o_proj_output(model, spec, batches, layer=0):
    """Outputs of layer ``layer``'s o_proj over ``batches`` (layer 0 sees the same inputs in any model)."""
    outs = []
    o_proj = get_attention(model, layer, spec).o_proj
    handle = o_proj.register_forward_hook(lambda m, a, out: outs.append(out.detach().reshape(-1, out.shape[-1])))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        handle.remove()
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_o_is_never_worse_than_the_fold_on_the_calibration_data(arch):
    """``refit_o``: the least-squares o_proj on the kept value subspaces beats FLAT's ``W_o Q``."""
    from lrmath_hf.recipes.flat_output import _refit_o

    model = tiny_model(arch)
    spec = get_spec(model)
    batches = calibration()
    dense = _o_proj_output(model, spec, batches)
    stats = run_calibration(model, spec, batches, flat_plan(spec, qk=False, refit_o=True), progress=False)
    layer_stats = stats.layers[0]
    basis = lrmath.pca_truncate(layer_stats.head_outputs["v"].second_moment(), spec.head_dim // 2).basis
    errors = {}
    for refit in (False, True):
        trial = copy.deepcopy(model)
        w_o = trial.model.layers[0].self_attn.o_proj.weight.detach().clone()
        fold_value_output(get_attention(trial, 0, spec), spec, basis)
        if refit:
            _refit_o(trial, spec, 0, layer_stats.inputs["o"], w_o, torch.as_tensor(basis), damping=1e-12)
        errors[refit] = float(((_o_proj_output(trial, spec, batches) - dense) ** 2).sum())
    assert errors[True] <= errors[False] * (1 + 1e-8)
    assert errors[True] < errors[False]  # GQA heads and cross-head correlations leave room


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_obs_and_refit_meet_budget_and_round_trip(arch, tmp_path):
    model = tiny_model(arch, dtype=torch.float32)
    report = lrmath_hf.compress(model, calibration(), recipe="flat", ratio=0.3, progress=False,
                                selection="obs", refit_o=True)
    assert 0.25 <= report.ratio_achieved <= 0.35, report.ratio_achieved
    ids = token_batch(seed=5)
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    lrmath_hf.save_compressed(model, tmp_path / "m", report=report.to_dict(), recipe="flat")
    assert torch.equal(lrmath_hf.load_compressed(tmp_path / "m")(ids).logits, logits)
    with pytest.raises(ValueError, match="selection"):
        lrmath_hf.compress(tiny_model(arch), calibration(), recipe="flat", ratio=0.3, progress=False,
                           selection="random")


def _o_loss(W, C, P):
    """``min_B E||W z - B P^T z||^2`` for ``E[z z^T] = C``: the least-squares o_proj on ``range(P)``."""
    CP = C @ P
    return float(torch.trace(W @ C @ W.T) - torch.trace(W @ CP @ torch.linalg.solve(P.T @ CP, CP.T @ W.T)))


@pytest.mark.parametrize("seed", range(4))
def test_output_bases_are_the_optimal_value_subspace_for_one_head(seed):
    """``v_basis="output"``, one query head per KV head: the subspace attains the reduced-rank optimum.

    With a least-squares ``o_proj`` the loss over rank-``r`` value subspaces is
    minimised at ``sum_{i>r} sigma_i^2`` of ``W C^{1/2}``; PCA of the values and
    random subspaces can only do worse.
    """
    from types import SimpleNamespace

    from lrmath_hf.recipes.flat_output import _output_bases

    g = torch.Generator().manual_seed(seed)
    n, d, heads, r = 12, 8, 2, 3
    mix = torch.randn(heads * d, heads * d, generator=g, dtype=torch.float64)
    z = torch.randn(500, heads * d, generator=g, dtype=torch.float64) @ mix
    C = z.T @ z
    W = torch.randn(n, heads * d, generator=g, dtype=torch.float64)
    spec = SimpleNamespace(head_dim=d, group_size=1, num_kv_heads=heads, num_heads=heads)
    moments = SimpleNamespace(second_moment=lambda: C)
    bases = _output_bases(spec, moments, W, r)
    assert bases.shape == (heads, d, r)
    for h in range(heads):
        block = slice(h * d, (h + 1) * d)
        Wh, Ch, P = W[:, block], C[block, block], bases[h]
        assert torch.allclose(P.T @ P, torch.eye(r, dtype=P.dtype), atol=1e-12)
        optimum = float(lrmath.whitened_svd(Wh, Ch, r).dropped)
        scale = float(torch.trace(Wh @ Ch @ Wh.T))
        assert abs(_o_loss(Wh, Ch, P) - optimum) <= 1e-9 * scale
        pca = torch.linalg.eigh(Ch).eigenvectors[:, -r:]
        assert _o_loss(Wh, Ch, pca) >= optimum - 1e-9 * scale
        for _ in range(5):
            rand = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
            assert _o_loss(Wh, Ch, rand) >= optimum - 1e-9 * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_output_bases_meet_budget_and_reject_bad_option(arch):
    model = tiny_model(arch, dtype=torch.float32)
    report = lrmath_hf.compress(model, calibration(), recipe="flat", ratio=0.3, progress=False,
                                selection="obs", refit_o=True, v_basis="output")
    assert 0.25 <= report.ratio_achieved <= 0.35, report.ratio_achieved
    assert torch.isfinite(model(token_batch(seed=5)).logits).all()
    with pytest.raises(ValueError, match="v_basis"):
        lrmath_hf.compress(tiny_model(arch), calibration(), recipe="flat", ratio=0.3, progress=False,
                           v_basis="energy")


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_error_split_meets_budget_and_never_prices_worse_than_uniform(arch, tmp_path):
    """``split="error"``: within every layer's budget, and FLAT's uniform pair is never priced lower."""
    from lrmath_hf.recipes import flat as flat_mod
    from lrmath_hf.recipes import flat_output

    model = tiny_model(arch, dtype=torch.float64)
    spec = get_spec(model)
    batches = calibration()
    stats = run_calibration(model, spec, batches, flat_plan(spec, qk=False, refit_o=True), progress=False)
    w = 0.6
    layer_stats = stats.layers[0]
    w_o = model.model.layers[0].self_attn.o_proj.weight.detach().to(torch.float64)
    bases = flat_output._output_bases(spec, layer_stats.inputs["o"], w_o, spec.head_dim)
    vo = flat_output._value_output_losses(spec, layer_stats.inputs["o"], w_o, bases)
    assert vo[-1] <= 1e-9 * vo[0] and torch.all(vo[1:] <= vo[:-1] * (1 + 1e-9))  # more dims, less error
    C = layer_stats.inputs["o"].second_moment().to(torch.float64)
    d = spec.head_dim
    for r in (1, d // 2, d - 1):  # the one-factorisation pricing equals a direct solve per head and rank
        direct = sum(_o_loss(w_o[:, h * d:(h + 1) * d], C[h * d:(h + 1) * d, h * d:(h + 1) * d],
                             bases[h // spec.group_size][:, :r]) for h in range(spec.num_heads))
        assert abs(float(vo[r]) - direct) <= 1e-8 * float(vo[0])
    budget = flat_mod.layer_parameters(spec, w, qk=False)
    down = layer_stats.inputs["down"]
    W_down = model.model.layers[0].mlp.down_proj.weight.detach()
    path = lrmath.nystrom_select(down.gram, 1, ridge=1e-3, method="obs", weight=W_down).path
    r, k = flat_output._error_split(spec, budget, vo, path, down.count)
    n, d = spec.hidden_size, spec.head_dim
    used = (spec.num_heads + spec.num_kv_heads) * n * (d + r) + 3 * n * k
    assert used <= budget
    counts = path.counts.numpy()[::-1].astype(float)
    objective = path.objective.numpy()[::-1] / down.count
    price = lambda r_, k_: float(vo[r_]) + float(np.interp(k_, counts, objective))  # noqa: E731
    r_u, k_u = flat_mod._ranks(spec, w)
    assert price(r, k) <= price(r_u, k_u) * (1 + 1e-12)

    report = lrmath_hf.compress(copy.deepcopy(model).float(), batches, recipe="flat", ratio=0.3, progress=False,
                                selection="obs", refit_o=True, v_basis="output", split="error")
    assert 0.3 - 1e-9 <= report.ratio_achieved <= 0.36, report.ratio_achieved
    with pytest.raises(ValueError, match="split='error'"):
        lrmath_hf.compress(tiny_model(arch), batches, recipe="flat", ratio=0.3, progress=False, split="error")
    with pytest.raises(ValueError, match="split must"):
        lrmath_hf.compress(tiny_model(arch), batches, recipe="flat", ratio=0.3, progress=False, split="even")


@pytest.mark.parametrize("multiple", [8, 24])
def test_channel_multiple_rounds_mlp_widths_and_keeps_the_ratio(multiple):
    """``channel_multiple``: every reduced MLP width is a multiple (``auto`` uses 8, for aligned CPU GEMMs),
    the rounded widths are what the budget counts, and the error split still picks within the layer budget."""
    from lrmath_hf.recipes import flat as flat_mod

    model = tiny_model("llama", dtype=torch.float64)
    spec = get_spec(model)
    batches = calibration()
    for ratio in (0.2, 0.45):
        compressed = copy.deepcopy(model).float()
        report = lrmath_hf.compress(compressed, batches, recipe="auto", ratio=ratio, progress=False,
                                    channel_multiple=multiple)
        widths = [layer.mlp.down_proj.in_features for layer in compressed.model.layers]
        assert all(w % multiple == 0 or w == spec.intermediate_size for w in widths), widths
        assert ratio - 1e-9 <= report.ratio_achieved <= ratio + 0.15, report.ratio_achieved
        assert [report.ranks[str(i)]["mlp_channels"] for i in range(spec.num_layers)] == widths
    for w in np.linspace(0.05, 0.99, 23):
        r, k = flat_mod._ranks(spec, float(w), multiple)
        assert k % multiple == 0 or k == spec.intermediate_size
        assert flat_mod._ranks(spec, float(w))[1] - multiple < k  # rounded down by less than one multiple
    with pytest.raises(ValueError, match="channel_multiple"):
        lrmath_hf.compress(tiny_model("llama"), batches, recipe="auto", ratio=0.3, progress=False,
                           channel_multiple=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_sequential_calibrates_each_layer_on_the_compressed_earlier_layers(arch):
    """``sequential=True``: the kept fractions come from the dense importance, layer 0 sees dense inputs
    (same result as the one-pass mode), and later layers see the compressed earlier layers (different)."""
    model = tiny_model(arch, dtype=torch.float64)
    batches = calibration()
    options = dict(selection="obs", refit_o=True, v_basis="output", split="error")
    one_pass, seq = copy.deepcopy(model), copy.deepcopy(model)
    rep1 = lrmath_hf.compress(one_pass, batches, recipe="flat", ratio=0.3, progress=False, **options)
    rep2 = lrmath_hf.compress(seq, batches, recipe="flat", ratio=0.3, progress=False, sequential=True, **options)
    assert rep2.details["sequential"] is True
    np.testing.assert_allclose(rep1.details["kept_fraction"], rep2.details["kept_fraction"], rtol=0, atol=1e-12)
    assert rep1.ranks["0"] == rep2.ranks["0"]
    first = [(a, b) for (a, b) in zip(one_pass.model.layers[0].parameters(), seq.model.layers[0].parameters())]
    for a, b in first:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    later = zip(one_pass.model.layers[1].parameters(), seq.model.layers[1].parameters())
    assert any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in later)
    assert abs(rep2.ratio_achieved - rep1.ratio_achieved) <= 0.05
    logits = seq(input_ids=batches[0]).logits
    assert torch.isfinite(logits).all()
    stats = run_calibration(model, get_spec(model), batches, flat_plan(get_spec(model), qk=False, refit_o=True),
                            progress=False)
    with pytest.raises(ValueError, match="sequential"):
        lrmath_hf.compress(copy.deepcopy(model), batches, recipe="flat", ratio=0.3, progress=False,
                           sequential=True, stats=stats)


def test_precomputed_statistics_are_not_recorded_as_an_option():
    """``compress(..., stats=...)``: the report keeps the settings, not the statistics object."""
    model = tiny_model("llama", dtype=torch.float64)
    spec = get_spec(model)
    batches = calibration()
    stats = run_calibration(model, spec, batches, flat_plan(spec, qk=False, refit_o=True), progress=False)
    report = lrmath_hf.compress(copy.deepcopy(model), batches, recipe="flat", ratio=0.3, progress=False,
                                stats=stats, selection="obs")
    assert report.options == {"selection": "obs"}
    assert "stats" not in json.loads(report.to_json())["options"]


@pytest.mark.parametrize("recipe", ("svd", "flat", "auto", "latent"))
def test_second_moment_recipes_decide_the_same_on_statistics_that_keep_more(recipe, monkeypatch):
    """These recipes calibrate with ``order=2`` (mean and second moment only, the third and fourth sums
    skipped); given the union plan's order-4 statistics instead, every weight they produce is identical."""
    from lrmath_hf.recipes.common import union_plan

    model = tiny_model("llama", dtype=torch.float64)
    spec = get_spec(model)
    batches = calibration()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    orders = []

    class Recording(lrmath.Moments):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            orders.append(self.order)

    with monkeypatch.context() as patch:
        patch.setattr(lrmath, "Moments", Recording)
        own = lrmath_hf.compress(first, batches, recipe=recipe, ratio=0.3, progress=False)
    assert orders and set(orders) == {2}
    stats = run_calibration(model, spec, batches, union_plan(spec), progress=False)
    assert all(m.order == 4 for layer in stats.layers for m in layer.inputs.values())
    reused = lrmath_hf.compress(second, batches, recipe=recipe, ratio=0.3, progress=False, stats=stats)
    assert own.ranks == reused.ranks
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_host_view_shares_cpu_memory_and_leaves_other_arrays_alone():
    from lrmath_hf.recipes.common import host_view

    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    view = host_view(t)
    assert isinstance(view, np.ndarray) and np.shares_memory(view, t.numpy())
    assert host_view(view) is view
    p = torch.nn.Parameter(t.clone())
    assert host_view(p) is p  # a tensor that needs gradients is not exposed to numpy
