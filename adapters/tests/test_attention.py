"""Reduced value head dim (FLAT-LLM V/O folding) against the unmodified models."""

from __future__ import annotations

import copy
import pickle

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


def test_forwards_installed_before_the_fold_are_kept_and_restored():
    """An instance forward already on the attention or v_proj (accelerate installs such) keeps running
    inside the wrappers, and is what remains when they are removed."""
    from lrmath_hf.attention import _remove_wrappers

    model = tiny_model("llama")
    ids = token_batch()
    reference = copy.deepcopy(model)
    _fold_all(reference, rank=4)
    expected = reference(ids).logits
    attn = get_attention(model, 0)
    calls = []

    def counting(module):
        forward = module.forward

        def wrapper(*args, **kwargs):
            calls.append(module)
            return forward(*args, **kwargs)
        module.forward = wrapper
        return wrapper

    attn_forward = counting(attn)
    _fold_all(model, rank=4)  # fold replaces v_proj: wrap the new one's forward too
    v_forward = counting(attn.v_proj)
    set_value_head_dim(attn, 4)  # re-installs around both
    assert torch.equal(model(ids).logits, expected)
    assert calls == [attn, attn.v_proj]
    _remove_wrappers(attn)  # what set_value_head_dim does first
    assert vars(attn)["forward"] is attn_forward and vars(attn.v_proj)["forward"] is v_forward
    # The tagging forward left inside v_forward (installed above it by the fold) no longer tags.
    assert type(attn.v_proj(torch.randn(2, attn.v_proj.in_features, dtype=torch.float64))) is torch.Tensor


def test_reduced_model_survives_pickling():
    """The wrappers are partials of module-level functions: a pickled model reloads and runs."""
    model = tiny_model("qwen2")
    ids = token_batch()
    _fold_all(model, rank=3)
    expected = model(ids).logits
    copied = pickle.loads(pickle.dumps(model))
    assert torch.equal(copied(ids).logits, expected)
    attn = get_attention(copied, 0)
    assert vars(attn.v_proj)["forward"].args[0] is attn.v_proj and vars(attn)["forward"].args[0] is attn


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


def test_set_value_head_dim_back_to_full_removes_the_wrappers():
    model = tiny_model("llama")
    attn = get_attention(model, 0)
    set_value_head_dim(attn, attn.head_dim)
    assert "forward" not in vars(attn) and "forward" not in vars(attn.v_proj)
    assert attn.config is model.config
    spec = get_spec(model)
    fold_value_output(attn, spec, _orthogonal_bases(spec, 6, 0))
    assert "forward" in vars(attn) and "forward" in vars(attn.v_proj) and get_value_head_dim(attn) == 6
    assert not attn._forward_pre_hooks and not attn.v_proj._forward_hooks  # no hooks: nn.Module's fast path
    set_value_head_dim(attn, 6)  # idempotent: one wrapper each, not two
    assert vars(attn)["forward"].keywords["inner"] is None and vars(attn.v_proj)["forward"].keywords["inner"] is None
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
