"""Decode weight layout: strides change, values, ties and saved files do not; the choice follows the timings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lrmath_hf
from lrmath_hf import layout as layout_mod
from lrmath_hf.io import load_compressed, save_compressed
from lrmath_hf.layout import (LayoutTiming, layout_of, set_layout, standard_layout, time_layouts,
                              tune_decode_layout)
from lrmath_hf.modules import FactorizedLinear, HeadwiseProjection, count_parameters

from ._tiny_models import tiny_model, token_batch


def _fake_timings(model, rule, tokens: int = 1) -> dict:
    """A timing cache that makes ``rule(shape)`` (True: transposed) the choice for every weight of ``model``."""
    cache = {}
    for weight, _ in layout_mod._linear_weights(model):
        faster = rule(tuple(weight.shape))
        cache[layout_mod._timing_key(weight, tokens)] = LayoutTiming(standard_s=1.0, transposed_s=0.5 if faster else 2.0, rounds=1, copies=1)
    return cache


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_layout_of_names_both_layouts_and_refuses_others():
    w = torch.randn(6, 4)
    assert layout_of(w) == "standard"
    assert layout_of(w.t().contiguous().t()) == "transposed"
    assert layout_of(w[:, ::2]) is None and layout_of(torch.randn(3)) is None


def test_time_layouts_times_both_layouts_and_checks_input():
    t = time_layouts(torch.randn(48, 40), rounds=3, warmup=1, stream_mib=0.05)
    assert t.standard_s > 0 and t.transposed_s > 0 and t.rounds == 3 and t.copies >= 2
    for bad in (torch.randn(5), torch.zeros(0, 4), torch.ones(3, 3, dtype=torch.long)):
        with pytest.raises(ValueError):
            time_layouts(bad)
    with pytest.raises(ValueError):
        time_layouts(torch.randn(4, 4), tokens=0)


def test_choice_needs_the_margin():
    assert LayoutTiming(1.0, 0.9, 3, 1).choice(0.05) == "transposed"
    assert LayoutTiming(1.0, 0.96, 3, 1).choice(0.05) == "standard"
    assert LayoutTiming(1.0, 1.0, 3, 1).choice(0.0) == "standard"


def test_tuning_keeps_values_ties_and_outputs():
    model = tiny_model("llama", tie_word_embeddings=True)
    ids = token_batch()
    before = _logits(model, ids)
    params = count_parameters(model)
    report = tune_decode_layout(model, timings=_fake_timings(model, lambda shape: True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == params
    weights = list(layout_mod._linear_weights(model))
    assert all(layout_of(w) == "transposed" for w, _ in weights)
    assert report.transposed == len(weights) == len(report.choices)
    assert any(len(c.names) == 2 for c in report.choices)  # the tied head counted once, named twice
    # float64: the two layouts differ only in the BLAS kernel's summation order
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-12, atol=1e-12)
    assert set_layout(model, "standard") == len(weights)
    assert torch.equal(_logits(model, ids), before)


def test_choice_per_shape_follows_the_timings():
    model = tiny_model("qwen2")
    wide = lambda shape: shape[0] > shape[1]  # noqa: E731
    report = tune_decode_layout(model, timings=_fake_timings(model, wide))
    for choice in report.choices:
        expected = "transposed" if wide(choice.shape) else "standard"
        assert choice.layout == expected
        for name in choice.names:
            assert layout_of(model.get_parameter(name)) == expected
    assert report.chosen_s < report.standard_s
    assert "transposed" in report.summary()
    # tuning again with the opposite timings puts every weight back
    report = tune_decode_layout(model, timings=_fake_timings(model, lambda shape: False))
    assert report.transposed == 0
    assert all(w.is_contiguous() for w, _ in layout_mod._linear_weights(model))


def test_timings_are_measured_once_per_shape(monkeypatch):
    calls = []
    real = layout_mod.time_layouts

    def counting(weight, **kwargs):
        calls.append(tuple(weight.shape))
        return real(weight, **{**kwargs, "rounds": 1, "stream_mib": 0.01})

    monkeypatch.setattr(layout_mod, "time_layouts", counting)
    model = tiny_model("llama", dtype=torch.float32)
    cache: dict = {}
    report = tune_decode_layout(model, timings=cache)
    shapes = {c.shape for c in report.choices}
    assert sorted(calls) == sorted(shapes) and len(cache) == len(shapes)
    tune_decode_layout(tiny_model("llama", dtype=torch.float32, seed=1), timings=cache)
    assert len(calls) == len(shapes)
    for choice in report.choices:  # every layout is the one its (real) timing picks
        assert choice.layout == choice.timing.choice(report.margin)


def test_factorised_modules_are_included():
    gen = torch.Generator().manual_seed(0)
    right = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    right[:, [1, 5, 7, 9]] = torch.eye(4, dtype=torch.float64)
    model = nn.Sequential(
        FactorizedLinear.from_factors(torch.randn(10, 4, generator=gen, dtype=torch.float64), right,
                                      columns=[1, 5, 7, 9]),
        nn.Linear(10, 12, dtype=torch.float64),
        HeadwiseProjection.from_factors(torch.randn(3, 4, 2, generator=gen, dtype=torch.float64),
                                        torch.randn(3, 2, 12, generator=gen, dtype=torch.float64)),
    )
    x = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    before = model(x).detach()
    report = tune_decode_layout(model, timings=_fake_timings(model, lambda shape: True))
    names = {name for c in report.choices for name in c.names}
    assert names == {"0.left", "0.right_rest", "1.weight", "2.right"}
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-12, atol=1e-12)


def test_compressed_model_decodes_and_saves_after_tuning(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    lrmath_hf.compress(model, [token_batch(seed=s, length=32) for s in range(4)], recipe="auto", ratio=0.3,
                       progress=False)
    ids = token_batch(seed=9)
    before = _logits(model, ids)
    with torch.inference_mode():
        tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tune_decode_layout(model, timings=_fake_timings(model, lambda shape: True))
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        again = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(again, tokens)
    reloaded = load_compressed(save_compressed(model, tmp_path / "m"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(layout_of(w) == "standard" for w, _ in layout_mod._linear_weights(reloaded) if min(w.shape) > 1)


@pytest.mark.parametrize("recipe", ["auto", "svd", "latent"])
def test_compression_reads_values_not_layout(recipe):
    """A tuned model compresses to the same model as its stock copy (the CLI tunes before compressing)."""
    batches = [token_batch(seed=s, length=32) for s in range(4)]
    stock, tuned = tiny_model("llama", dtype=torch.float32), tiny_model("llama", dtype=torch.float32)
    set_layout(tuned, "transposed")
    for model in (stock, tuned):
        lrmath_hf.compress(model, batches, recipe=recipe, ratio=0.3, progress=False)
    set_layout(tuned, "standard")
    for (name, a), (_, b) in zip(stock.state_dict().items(), tuned.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_save_pretrained_inside_standard_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", dtype=torch.float32, tie_word_embeddings=True)
    ids = token_batch()
    before = _logits(model, ids)
    assert set_layout(model, "transposed") > 0
    with standard_layout(model):
        assert all(w.is_contiguous() for w, _ in layout_mod._linear_weights(model))
        model.save_pretrained(tmp_path / "hf")
    assert layout_of(model.lm_head.weight) == "transposed"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = nn.Linear(4, 3)
    for kwargs in ({"tokens": 0}, {"margin": 1.0}, {"margin": -0.1}, {"rounds": 0}):
        with pytest.raises(ValueError):
            tune_decode_layout(model, **kwargs)
    with pytest.raises(ValueError):
        set_layout(model, "column-major")
    assert tune_decode_layout(nn.ReLU()).choices == []


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(out_features=st.integers(1, 40), in_features=st.integers(1, 40), tokens=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_relaid_weight_computes_the_same_product(out_features, in_features, tokens, dtype):
    gen = torch.Generator().manual_seed(out_features * 41 + in_features)
    w = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    x = torch.randn(tokens, in_features, generator=gen, dtype=dtype)
    t = layout_mod._relaid(w, "transposed")
    assert torch.equal(t, w) and (min(w.shape) == 1 or layout_of(t) == "transposed")
    # tolerance from the dtype and the sum's length: the kernels only reorder the sums
    eps = torch.finfo(dtype).eps
    bound = 4 * in_features * eps * (x.abs() @ w.abs().t())
    assert ((torch.nn.functional.linear(x, t) - torch.nn.functional.linear(x, w)).abs() <= bound).all()
    assert layout_of(layout_mod._relaid(t, "standard")) == "standard"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_tuning_on_cuda_keeps_outputs():
    model = tiny_model("llama", dtype=torch.float32).cuda()
    ids = token_batch().cuda()
    before = _logits(model, ids)
    report = tune_decode_layout(model, rounds=3, stream_mib=8)
    assert "threads" not in report.device
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
