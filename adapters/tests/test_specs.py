"""Architecture specs: the declared layout matches the modules transformers builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lrmath_hf.specs import (
    get_attention,
    get_layer,
    get_linear,
    get_spec,
    iter_layers,
    linear_name,
    set_linear,
    supported_model_types,
)

from ._tiny_models import ARCHS, tiny_config, tiny_model, token_batch


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_matches_built_modules(arch):
    """Every role resolves to an nn.Linear of the declared shape and bias, in every layer."""
    model = tiny_model(arch)
    spec = get_spec(model)
    assert spec == get_spec(model.config)
    assert spec.model_type == arch and spec.kind == "decoder" and spec.mlp_kind == "gated"
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    layers = list(iter_layers(model, spec))
    assert [i for i, _ in layers] == list(range(spec.num_layers))
    for layer, _ in layers:
        attn = get_attention(model, layer, spec)
        assert attn.head_dim == spec.head_dim
        for role in spec.roles:
            linear = get_linear(model, layer, role, spec)
            assert isinstance(linear, nn.Linear)
            assert tuple(linear.weight.shape) == spec.shape(role)
            assert (linear.bias is not None) == spec.bias[role]
            assert model.get_submodule(linear_name(model, layer, role, spec)) is linear


def test_biases_and_sliding_windows_per_family():
    qwen, mistral, llama = (get_spec(tiny_config(a)) for a in ("qwen2", "mistral", "llama"))
    assert [r for r in qwen.roles if qwen.bias[r]] == ["q", "k", "v"]
    assert not any(mistral.bias.values()) and not any(llama.bias.values())
    assert get_spec(tiny_config("llama", attention_bias=True, mlp_bias=True)).bias == dict.fromkeys(llama.roles, True)
    assert mistral.sliding_window == 4 and mistral.is_sliding(0) and mistral.is_sliding(1)
    assert qwen.sliding_window == 4 and not qwen.is_sliding(0) and qwen.is_sliding(1)
    assert get_spec(tiny_config("qwen2", use_sliding_window=False)).sliding_window is None
    assert llama.sliding_window is None and not llama.is_sliding(0)


def test_input_groups_share_one_statistic():
    """q, k, v read the same tensor (and gate, up): checked with forward hooks on the real model."""
    model = tiny_model("llama")
    spec = get_spec(model)
    seen = {}
    handles = [
        get_linear(model, 1, role, spec).register_forward_hook(
            lambda mod, args, out, role=role: seen.__setitem__(role, args[0]))
        for role in spec.roles
    ]
    model(token_batch())
    for handle in handles:
        handle.remove()
    for group in spec.input_groups:
        for role in group:
            assert torch.equal(seen[role], seen[group[0]])
            assert spec.input_group(role) == group
    assert not torch.equal(seen["q"], seen["o"]) and not torch.equal(seen["gate"], seen["down"])


def test_gqa_mapping():
    spec = get_spec(tiny_config("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    assert spec.group_size == 4
    assert [spec.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(spec.query_heads(1)) == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        spec.kv_head(8)
    # Without GQA every query head reads its own key/value head.
    mha = get_spec(tiny_config("llama", num_key_value_heads=4))
    assert [mha.kv_head(h) for h in range(4)] == [0, 1, 2, 3]


def test_qwen2_head_dim_defaults_to_hidden_over_heads():
    spec = get_spec(tiny_config("qwen2"))
    assert spec.head_dim == 64 // 4


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*mistral.*qwen2"):
        get_spec(GPT2Config())
    with pytest.raises(TypeError):
        get_spec(object())
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())


def test_set_linear_and_base_model_navigation():
    model = tiny_model("mistral")
    spec = get_spec(model)
    replacement = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False, dtype=torch.float64)
    old = set_linear(model, 1, "up", replacement, spec)
    assert isinstance(old, nn.Linear) and get_linear(model, 1, "up", spec) is replacement
    assert model.model.layers[1].mlp.up_proj is replacement
    # The bare base model (no LM head prefix) resolves the same layers.
    base = model.model
    assert get_layer(base, 1, spec) is model.model.layers[1]
    assert linear_name(base, 0, "q", spec) == "layers.0.self_attn.q_proj"
    with pytest.raises(KeyError):
        get_linear(model, 0, "fc1", spec)


def test_spec_is_frozen():
    spec = get_spec(tiny_config("llama"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.head_dim = 8
    with pytest.raises(TypeError):
        spec.linears["q"] = "elsewhere"


def test_causal_lm_from_config_has_expected_layer_count():
    config = tiny_config("qwen2", num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(config)
    assert len(list(iter_layers(model))) == get_spec(model).num_layers == 3


def test_a_missing_module_names_the_transformers_versions_whose_layout_is_known():
    """A model built by an older transformers (DINOv2 before 5.18 nests attention.attention.query) is
    refused with the version that is needed, not with a bare AttributeError from deep inside."""
    import packaging.version as pv
    import transformers

    from lrmath_hf.specs import MIN_TRANSFORMERS, get_linear, get_spec, iter_layers

    model = tiny_model("llama", dtype=torch.float32)
    spec = get_spec(model)
    _, block = next(iter_layers(model, spec))
    del block.self_attn.q_proj  # what an older layout looks like from here: no such module
    with pytest.raises(ValueError, match=rf"transformers >= {MIN_TRANSFORMERS}.*{transformers.__version__}"):
        get_linear(model, 0, "q", spec)
    assert pv.Version(transformers.__version__) >= pv.Version(MIN_TRANSFORMERS)  # what pyproject.toml requires
