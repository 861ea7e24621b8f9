"""Reduced value head dim (FLAT-LLM V/O folding) against the unmodified models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lrmath_hf.attention import (
    ValueHeads,
    fold_value_output,
    get_value_head_dim,
    set_value_head_dim,
    value_head_dims,
)
from lrmath_hf.modules import count_parameters
from lrmath_hf.specs import get_attention, get_spec, iter_layers

from ._tiny_models import ARCHS, cache_kwarg, cache_of, tiny_model, token_batch

IMPLEMENTATIONS = ["eager"] + (["sdpa"] if "sdpa" in ALL_ATTENTION_FUNCTIONS else [])
RTOL = 1e-10


def _orthogonal_bases(spec, rank, seed):
    """Random orthonormal (G, d_h, rank) bases: the first ``rank`` columns of Haar-like Q factors."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(spec.num_kv_heads, spec.head_dim, spec.head_dim, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(raw).Q[:, :, :rank]


def _fold_all(model, rank, seed=1):
    spec = get_spec(model)
    bases = {}
    for layer, _ in iter_layers(model, spec):
        bases[layer] = _orthogonal_bases(spec, rank, seed + layer)
        fold_value_output(get_attention(model, layer, spec), spec, bases[layer])
    return bases


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_fold_reproduces_logits(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    ids = token_batch(length=11)  # longer than the 4-token sliding windows
    reference = model(ids).logits
    folded = copy.deepcopy(model)
    _fold_all(folded, rank=get_spec(model).head_dim)
    assert value_head_dims(folded) == {}  # full rank: nothing to reduce
    # The fold did change the weights (a random rotation), yet not the function.
    attn = get_attention(folded, 0)
    assert not torch.allclose(attn.v_proj.weight, get_attention(model, 0).v_proj.weight)
    assert _rel(folded(ids).logits, reference) < RTOL


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_reduced_fold_equals_projected_values(arch, impl):
    """At any rank, folding equals the dense model with value outputs projected onto span(Q_g).

    ``W_o,h Q_g Q_g^T v`` is what the reduced model computes; a wrong GQA map or
    a wrong per-head layout would break the equality.
    """
    rank = 5
    model = tiny_model(arch, attn_implementation=impl)
    ids = token_batch(length=11)
    reduced = copy.deepcopy(model)
    bases = _fold_all(reduced, rank)
    spec = get_spec(model)
    projected = copy.deepcopy(model)
    with torch.no_grad():
        for layer, basis in bases.items():
            v_proj = get_attention(projected, layer).v_proj
            projector = torch.block_diag(*[q @ q.T for q in basis])
            v_proj.weight.copy_(projector @ v_proj.weight)
            if v_proj.bias is not None:
                v_proj.bias.copy_(projector @ v_proj.bias)
    out = reduced(ids, use_cache=True)
    assert _rel(out.logits, projected(ids).logits) < RTOL
    assert _rel(out.logits, model(ids).logits) > 1e-3  # truncation is visible
    assert value_head_dims(reduced) == dict.fromkeys(range(spec.num_layers), rank)
    for layer_cache in cache_of(out).layers:
        assert layer_cache.values.shape[-1] == rank
        assert layer_cache.keys.shape[-1] == spec.head_dim


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_reduced_cache_matches_no_cache(arch, impl):
    rank, new_tokens = 3, 5
    model = _no_eos(tiny_model(arch, attn_implementation=impl))
    _fold_all(model, rank)
    prompt = token_batch(seed=3, length=6)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               do_sample=False, return_dict_in_generate=True)
    sequence = prompt
    for _ in range(new_tokens):
        logits = model(sequence, use_cache=False).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated.sequences, sequence)
    spec = get_spec(model)
    for layer, layer_cache in enumerate(cache_of(generated).layers):
        assert layer_cache.values.shape[-1] == rank
        if spec.is_sliding(layer):  # the window bounds the cache: sliding attention is active
            assert layer_cache.values.shape[-2] < prompt.shape[1] + new_tokens
    # Incremental logits with the cache agree with a full recomputation.
    cache = cache_of(model(sequence[:, :-1], use_cache=True))
    step = model(sequence[:, -1:], use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]
    full = model(sequence, use_cache=False).logits[:, -1]
    assert _rel(step, full) < 1e-6  # float32 RMSNorm/softmax internals bound the agreement


def test_static_cache_generate_with_reduced_values():
    """Static caches allocate values with their own head dim, so they shrink too."""
    model = _no_eos(tiny_model("llama"))
    _fold_all(model, rank=3)
    prompt = token_batch(length=6)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    static = model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    assert torch.equal(static.sequences, model.generate(prompt, **kwargs))
    assert all(layer.values.shape[-1] == 3 for layer in cache_of(static).layers)


def test_fold_shrinks_parameters_and_cache():
    model = tiny_model("llama")
    spec = get_spec(model)
    dense = count_parameters(model)
    _fold_all(model, rank=4)
    attn = get_attention(model, 0)
    assert attn.v_proj.weight.shape == (spec.num_kv_heads * 4, spec.hidden_size)
    assert attn.o_proj.weight.shape == (spec.hidden_size, spec.num_heads * 4)
    saved = spec.num_layers * (spec.num_kv_heads + spec.num_heads) * (spec.head_dim - 4) * spec.hidden_size
    assert count_parameters(model) == dense - saved


def test_fold_accepts_numpy_and_composes():
    """Numpy bases work, and two folds equal one fold with the product basis."""
    model = tiny_model("qwen2")
    spec = get_spec(model)
    ids = token_batch()
    first, second = _orthogonal_bases(spec, 8, 5), _orthogonal_bases(spec, 8, 6)[:, :8, :3]
    twice = copy.deepcopy(model)
    attn = get_attention(twice, 1)
    fold_value_output(attn, spec, first.numpy())
    fold_value_output(attn, spec, second.numpy())
    assert get_value_head_dim(attn) == 3
    once = copy.deepcopy(model)
    fold_value_output(get_attention(once, 1), spec, torch.einsum("gdk,gkr->gdr", first, second))
    assert _rel(twice(ids).logits, once(ids).logits) < RTOL


def test_replacing_v_proj_after_fold_keeps_reduced_heads():
    """The attention pre-hook re-tags a v_proj swapped in after the fold."""
    model = tiny_model("mistral")
    ids = token_batch()
    _fold_all(model, rank=4)
    reference = model(ids).logits
    attn = get_attention(model, 0)
    clone = nn.Linear(attn.v_proj.in_features, attn.v_proj.out_features, bias=False, dtype=torch.float64)
    clone.load_state_dict(attn.v_proj.state_dict())
    attn.v_proj = clone
    assert torch.equal(model(ids).logits, reference)
    copied = copy.deepcopy(model)
    assert torch.equal(copied(ids).logits, reference)


def _attention_ops(model, ids):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids)
    return {event.key for event in prof.key_averages() if "dot_product" in event.key or "softmax" in event.key}


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
@pytest.mark.parametrize("arch", ARCHS)
def test_reduced_values_keep_the_fused_sdpa_kernel(arch):
    """Fused SDPA needs one head dim for q, k, v; padding the values keeps the reduced layers on it.

    Without the padding, SDPA falls back to its unfused math path (``aten::_softmax``),
    which made a reduced SmolLM2 prefill slower than the dense model's.
    """
    model = tiny_model(arch, attn_implementation="sdpa")
    ids = token_batch(length=11)
    dense_ops = _attention_ops(model, ids)
    assert not any("softmax" in op for op in dense_ops)
    _fold_all(model, rank=3)
    assert _attention_ops(model, ids) == dense_ops


def test_reduced_attention_follows_the_model_config():
    """The per-module config view reads and writes through to the model's config."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = token_batch(length=11)
    _fold_all(model, rank=3)
    attn = get_attention(model, 0)
    assert attn.config.hidden_size == model.config.hidden_size
    assert attn.config._attn_implementation != "sdpa"  # routed through the padding wrapper
    sdpa_logits = model(ids).logits
    copied = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    assert attn.config._attn_implementation == "eager"
    assert any("softmax" in op for op in _attention_ops(model, ids))
    assert _rel(model(ids).logits, sdpa_logits) < 1e-6  # eager attention takes its softmax in float32
    assert torch.equal(copied(ids).logits, sdpa_logits)  # the copy keeps its own view of its own config
    assert copied.model.layers[0].self_attn.config._lrmath_config is copied.config


def test_set_value_head_dim_back_to_full_removes_hooks():
    model = tiny_model("llama")
    attn = get_attention(model, 0)
    set_value_head_dim(attn, attn.head_dim)
    assert not attn._forward_pre_hooks and not attn.v_proj._forward_hooks
    assert attn.config is model.config
    spec = get_spec(model)
    fold_value_output(attn, spec, _orthogonal_bases(spec, 6, 0))
    assert attn._forward_pre_hooks and get_value_head_dim(attn) == 6
    with pytest.raises(ValueError, match="whole heads"):
        set_value_head_dim(attn, 4)  # v_proj emits 2*6 features, not heads of 4
    with pytest.raises(ValueError, match="outside"):
        set_value_head_dim(attn, attn.head_dim + 1)


def test_fold_validates_inputs():
    model = tiny_model("llama")
    spec = get_spec(model)
    attn = get_attention(model, 0)
    with pytest.raises(ValueError, match="bases must be"):
        fold_value_output(attn, spec, np.zeros((spec.num_heads, spec.head_dim, 4)))
    attn.o_proj = nn.Sequential(attn.o_proj)
    with pytest.raises(TypeError, match="o_proj"):
        fold_value_output(attn, spec, _orthogonal_bases(spec, 4, 0))


def test_value_heads_tag_is_confined_to_the_head_split():
    raw = torch.arange(2 * 3 * 10, dtype=torch.float64).reshape(2, 3, 10)
    tagged = raw.as_subclass(ValueHeads)
    tagged._lrmath_heads = (2, 5, 16)  # G=2 heads of r=5, d_h=16
    split = tagged.view((2, 3, -1, 16))
    assert type(split) is torch.Tensor and split.shape == (2, 3, 2, 5)
    assert torch.equal(split, raw.view(2, 3, 2, 5))
    assert tagged.reshape(2, 3, 2, 16).shape == (2, 3, 2, 5)
    assert type(tagged + 1) is torch.Tensor and type(tagged.detach()) is torch.Tensor
    assert tagged.view(6, 10).shape == (6, 10)  # any other reshape keeps its meaning


def _decode_inputs(heads, groups, rank, length=7, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, 8, generator=gen, dtype=torch.float64).to(dtype)
    key = torch.randn(batch, groups, length, 8, generator=gen, dtype=torch.float64).to(dtype)
    value = torch.randn(batch, groups, length, rank, generator=gen, dtype=torch.float64).to(dtype)
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :3] = False  # a left-padded row
    return query, key, value, keep


def _decode_masks(keep, heads):
    return {
        "none": None,
        "bool": keep,
        "additive": torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf")),
        "per-head": keep.expand(-1, heads, -1, -1).clone(),
        "per-head, one for the batch": keep[1:].expand(-1, heads, -1, -1).clone(),
    }


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per-head", "per-head, one for the batch"])
@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (4, 4), (6, 1)])
def test_decode_step_on_reduced_values_equals_the_padded_kernel(heads, groups, mask_kind):
    """One query token: the unpadded grouped path computes what SDPA computes on padded values."""
    from types import SimpleNamespace

    from lrmath_hf.attention import _padded_value_attention

    rank = 3
    query, key, value, keep = _decode_inputs(heads, groups, rank)
    mask = _decode_masks(keep, heads)[mask_kind]
    module = SimpleNamespace(num_key_value_groups=heads // groups, is_causal=True)
    padded = torch.nn.functional.pad(value, (0, query.shape[-1] - rank))
    reference, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, padded, mask, dropout=0.0, scaling=0.3)
    got, weights = _padded_value_attention(module, query, key, value, mask, implementation="sdpa",
                                           dropout=0.0, scaling=0.3)
    assert weights is None and got.shape == (2, 1, heads, rank)
    assert _rel(got, reference[..., :rank]) < RTOL
    # Without a scaling, SDPA's default 1 / sqrt(d_h) applies (d_h of the queries, not r).
    reference, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, padded, mask)
    got, _ = _padded_value_attention(module, query, key, value, mask, implementation="sdpa")
    assert _rel(got, reference[..., :rank]) < RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_step_on_reduced_values_in_low_precision(dtype):
    """Half-precision inputs take the softmax in float32, as SDPA's math does."""
    from lrmath_hf.attention import _single_query_attention

    query, key, value, keep = _decode_inputs(4, 2, 3, length=40, dtype=dtype)
    exact, _ = _single_query_attention(query.double(), key.double(), value.double(), keep, None)
    got, _ = _single_query_attention(query, key, value, keep, None)
    assert got.dtype == dtype
    # Inputs and the product with V are rounded to the format: a few units of its epsilon.
    assert _rel(got.double(), exact) < 8 * torch.finfo(dtype).eps


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
def test_reduced_decode_step_neither_pads_nor_calls_sdpa():
    """A decode step reads the r-dim value cache as it is; prefill keeps the fused kernel (padded)."""
    model = tiny_model("llama", attn_implementation="sdpa")
    _fold_all(model, rank=3)
    ids = token_batch(length=9)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cache = cache_of(model(ids[:, :-1], use_cache=True))
    prefill_ops = {event.key for event in prof.key_averages()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids[:, -1:], use_cache=True, **{cache_kwarg(model): cache})
    step_ops = {event.key for event in prof.key_averages()}
    assert "aten::constant_pad_nd" in prefill_ops and "aten::scaled_dot_product_attention" in prefill_ops
    assert "aten::constant_pad_nd" not in step_ops and "aten::scaled_dot_product_attention" not in step_ops


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_generate_with_reduced_values_matches_recomputation(arch):
    """Batched generation with a padding mask: the cached decode steps (unpadded path) agree with
    recomputing every step without a cache (prompt-length queries: the padded fused kernel)."""
    model = _no_eos(tiny_model(arch, attn_implementation="sdpa"))
    _fold_all(model, rank=3)
    prompt = token_batch(seed=5, length=8)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    new_tokens = 6
    generated = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
    sequence = prompt
    for step in range(new_tokens):
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        logits = model(sequence, attention_mask=full_mask, use_cache=False).logits[:, -1]
        assert _rel(generated.scores[step], logits) < 1e-6  # generate keeps its scores in float32
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated.sequences, sequence)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_on_reduced_values_on_cuda(dtype):
    """The grouped single-query path computes SDPA's padded result on a CUDA device too."""
    from types import SimpleNamespace

    from lrmath_hf.attention import _single_query_attention

    query, key, value, keep = (t.cuda() for t in _decode_inputs(8, 2, 5, length=300, dtype=dtype))
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    padded = torch.nn.functional.pad(value, (0, query.shape[-1] - 5))
    reference, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query.double(), key.double(), padded.double(), keep)
    got, _ = _single_query_attention(query, key, value, keep, None)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert _rel(got.double(), reference[..., :5]) < 8 * torch.finfo(dtype).eps


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
def test_decode_step_property_over_shapes_and_masks():
    """For any head layout, cache length, rank and mask, the grouped path equals SDPA on padded values."""
    from types import SimpleNamespace

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lrmath_hf.attention import _single_query_attention

    @settings(max_examples=60, derandomize=True, deadline=None, database=None)
    @given(batch=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 4),
           length=st.integers(1, 40), head_dim=st.sampled_from([4, 8, 16]), rank_fraction=st.floats(0.0, 0.99),
           mask_kind=st.sampled_from(["none", "bool", "additive", "per-head"]), seed=st.integers(0, 2**16))
    def check(batch, groups, per_group, length, head_dim, rank_fraction, mask_kind, seed):
        heads, rank = groups * per_group, 1 + int(rank_fraction * (head_dim - 1))
        gen = torch.Generator().manual_seed(seed)
        query = torch.randn(batch, heads, 1, head_dim, generator=gen, dtype=torch.float64)
        key = torch.randn(batch, groups, length, head_dim, generator=gen, dtype=torch.float64)
        value = torch.randn(batch, groups, length, rank, generator=gen, dtype=torch.float64)
        keep = torch.rand(batch, 1, 1, length, generator=gen) < 0.7
        keep[..., -1] = True  # the newest token (the query's own) is always visible
        mask = _decode_masks(keep, heads)[mask_kind]
        module = SimpleNamespace(num_key_value_groups=per_group, is_causal=True)
        padded = torch.nn.functional.pad(value, (0, head_dim - rank))
        reference, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, padded, mask)
        got, _ = _single_query_attention(query, key, value, mask, None)
        assert _rel(got, reference[..., :rank]) < RTOL

    check()
