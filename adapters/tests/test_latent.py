"""``latent`` (LatentLLM) on tiny llama / mistral / qwen2: exact at full rank, the weighted joint
objectives realised by the installed modules, budgets met, GQA / MQA / MHA, save/reload, generate."""

import pytest
import torch

import lrmath_hf
from lrmath_hf.modules import FactorizedLinear
from lrmath_hf.recipes.common import linear_parameters, run_calibration
from lrmath_hf.recipes.latent import latent_plan, run_latent
from lrmath_hf.specs import get_linear, get_spec

from ._tiny_models import ARCHS, tiny_model, token_batch


def calibration(n=6, length=24, seed=1):
    return [token_batch(seed=seed + i, batch=2, length=length) for i in range(n)]


def rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_reproduces_logits(arch):
    """Every linear factorised at full rank (joint QK / VO, whitened SVD MLP): logits unchanged (float64)."""
    model = tiny_model(arch)
    spec = get_spec(model)
    ids = token_batch(seed=7)
    dense = logits(model, ids)
    result = run_latent(model, spec, calibration(), ratio=0.0, ranks="full", progress=False)
    for layer in range(spec.num_layers):
        for role in spec.roles:
            assert isinstance(get_linear(model, layer, role, spec), FactorizedLinear), (layer, role)
        for name in ("qk", "vo"):
            assert result.details["joint"][layer][name]["relative_error"] < 1e-12
    assert rel_err(logits(model, ids), dense) < 1e-10


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_full_rank_multi_query_and_multi_head(kv_heads):
    """Besides the tiny configs' GQA (4 -> 2): MQA (4 -> 1) and plain MHA (4 -> 4), exact at full rank."""
    model = tiny_model("llama", num_key_value_heads=kv_heads)
    spec = get_spec(model)
    ids = token_batch(seed=2)
    dense = logits(model, ids)
    run_latent(model, spec, calibration(), ratio=0.0, ranks="full", progress=False)
    assert get_linear(model, 0, "k", spec).out_features == kv_heads * spec.head_dim
    assert rel_err(logits(model, ids), dense) < 1e-10


def _inputs(model, spec, batches, layer=0):
    """The q/k/v input rows of ``layer`` (float64), captured on the dense model."""
    rows = []
    handle = get_linear(model, layer, "q", spec).register_forward_pre_hook(
        lambda mod, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(rows).T  # (n, tokens)


def _head_maps(W, n_heads, kv):
    return W.reshape(n_heads, -1, W.shape[-1])[kv] if kv is not None else W.reshape(n_heads, -1, W.shape[-1])


def _weights(module):
    return module.left.detach() @ module.right_matrix().detach() if isinstance(module, FactorizedLinear) \
        else module.weight.detach()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_installed_modules_realise_the_weighted_joint_fits(arch):
    """The installed q/k (v/o) give the attention-map (head-output) error the recipe reports.

    Joint QK: ``sum_i ||X^T (G_i - Ghat_i) X||^2 / sum_i ||X^T G_i X||^2`` with
    ``G_i = W_q,i^T W_k,g(i)``; joint VO: ``sum_i ||(W_o,i W_v,g(i) - Ghat_i) X||^2``
    relative; measured on the calibration tokens, from the modules' weights.
    """
    model = tiny_model(arch)
    spec = get_spec(model)
    batches = calibration()
    X = _inputs(model, spec, batches)
    H, G = spec.num_heads, spec.num_kv_heads
    kv = torch.arange(H) // spec.group_size
    dense = {role: _weights(get_linear(model, 0, role, spec)) for role in ("q", "k", "v", "o")}
    result = run_latent(model, spec, batches, ratio=0.0, ranks={"q": 24, "k": 16, "v": 16, "o": 24},
                        damping=0.0, progress=False)
    small = {role: _weights(get_linear(model, 0, role, spec)) for role in ("q", "k", "v", "o")}

    def qk_maps(w):
        Q, K = _head_maps(w["q"] @ X, H, None), _head_maps(w["k"] @ X, G, kv)
        return Q.transpose(1, 2) @ K  # (H, tokens, tokens): X^T G_i X

    def vo_outputs(w):
        o = w["o"].reshape(w["o"].shape[0], H, -1).permute(1, 0, 2)  # (H, n, d_h)
        return o @ _head_maps(w["v"] @ X, G, kv)  # (H, n, tokens): W_o,i W_v,g(i) X

    joint = result.details["joint"][0]
    for name, fn in (("qk", qk_maps), ("vo", vo_outputs)):
        exact = fn(dense)
        measured = float(((fn(small) - exact) ** 2).sum() / (exact**2).sum())
        # the statistics' Gram products are float32 (merged in float64): agreement to ~1e-6
        assert measured == pytest.approx(joint[name]["relative_error"], rel=1e-4), name
        assert 0 < measured < joint[name]["hosvd_relative_error"] * (1 + 1e-4)


def test_error_decreases_as_ranks_grow():
    model0 = tiny_model("mistral")
    spec = get_spec(model0)
    ids = token_batch(seed=4)
    dense = logits(model0, ids)
    batches = calibration()
    stats = run_calibration(model0, spec, batches, latent_plan(spec), progress=False)
    errors, qk = [], []
    for r in (4, 8, 16, 24):
        model = tiny_model("mistral")
        ranks = {role: min(r, min(spec.shape(role))) for role in spec.roles}
        result = run_latent(model, spec, batches, ratio=0.0, ranks=ranks, stats=stats, progress=False)
        errors.append(rel_err(logits(model, ids), dense))
        qk.append(result.details["joint"][0]["qk"]["relative_error"])
    assert errors == sorted(errors, reverse=True), errors
    assert qk == sorted(qk, reverse=True), qk


@pytest.mark.parametrize("arch", ARCHS)
def test_meets_ratio_generates_and_round_trips(arch, tmp_path):
    model = tiny_model(arch, dtype=torch.float32)
    spec = get_spec(model)
    before = linear_parameters(model, spec)
    report = lrmath_hf.compress(model, calibration(), recipe="latent", ratio=0.3, multiple=1, progress=False)
    after = linear_parameters(model, spec)
    assert report.linear_params_before == before and report.linear_params_after == after
    # the allocation never removes less than asked, and overshoots by less than one rank of one matrix
    assert 0.3 <= report.ratio_achieved <= 0.31, report.ratio_achieved
    assert report.details["realised_parameters"] == after
    assert any(isinstance(get_linear(model, layer, role, spec), FactorizedLinear)
               for layer in range(spec.num_layers) for role in ("q", "k", "v", "o"))
    ids = token_batch(seed=5)
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    prompt = ids[:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)
    lrmath_hf.save_compressed(model, tmp_path / "m", report=report.to_dict(), recipe="latent")
    loaded = lrmath_hf.load_compressed(tmp_path / "m")
    assert torch.equal(logits(loaded, ids), out)


def test_block_identity_default_multiple_round_trips(tmp_path):
    model = tiny_model("qwen2", dtype=torch.float32)
    report = lrmath_hf.compress(model, calibration(), recipe="latent", ratio=0.3, block_identity=True,
                                progress=False)
    # ranks in multiples of 8 on 16-dim heads are coarse
    assert 0.3 <= report.ratio_achieved <= 0.45, report.ratio_achieved
    spec = get_spec(model)
    mods = [get_linear(model, layer, role, spec) for layer in range(spec.num_layers) for role in spec.roles]
    assert any(isinstance(m, FactorizedLinear) and m.block_identity for m in mods)
    ids = token_batch(seed=6)
    out = logits(model, ids)
    lrmath_hf.save_compressed(model, tmp_path / "m", report=report.to_dict(), recipe="latent")
    assert torch.equal(logits(lrmath_hf.load_compressed(tmp_path / "m"), ids), out)


def test_reuses_statistics():
    batches = calibration()
    ids = token_batch(seed=8)
    a = tiny_model("llama")
    spec = get_spec(a)
    stats = run_calibration(a, spec, batches, latent_plan(spec), progress=False)
    ra = run_latent(a, spec, batches, ratio=0.4, stats=stats, progress=False)
    b = tiny_model("llama")
    rb = run_latent(b, spec, batches, ratio=0.4, progress=False)
    assert ra.ranks == rb.ranks and "calibration" not in ra.timings
    assert rel_err(logits(a, ids), logits(b, ids)) < 1e-10
    partial = run_calibration(tiny_model("llama"), spec, batches, latent_plan(spec).__class__(
        inputs={"down": spec.linears["down"]}), progress=False)
    with pytest.raises(ValueError, match="stats lack"):
        run_latent(tiny_model("llama"), spec, batches, ratio=0.4, stats=partial, progress=False)


@pytest.mark.parametrize("options, match", [
    ({"ratio": 1.0}, "ratio"),
    ({"whitening": "qr"}, "whitening"),
    ({"damping": -1.0}, "damping"),
    ({"multiple": 0}, "multiple"),
    ({"ranks": "half"}, "ranks"),
    ({"ranks": {"x": 4}}, "unknown roles"),
    ({"ranks": {"q": 0}}, "ranks"),
    ({"ranks": {"k": 33}}, "ranks"),
])
def test_rejects_bad_options(options, match):
    model = tiny_model("llama")
    spec = get_spec(model)
    kwargs = {"ratio": 0.3, **options}
    with pytest.raises(ValueError, match=match):
        run_latent(model, spec, calibration(n=1), progress=False, **kwargs)
