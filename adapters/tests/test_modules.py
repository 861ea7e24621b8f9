"""Factorised and head-wise leaf modules: exact algebra, storage, surgery helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lrmath_hf.modules import (
    FactorizedLinear,
    HeadwiseProjection,
    count_parameters,
    manifest_entry,
    module_from_entry,
    replace_linear,
)
from lrmath_hf.specs import get_linear, get_spec

from ._tiny_models import tiny_model, token_batch

F64 = torch.float64


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(a, b, tol=1e-12):
    return ((a - b).norm() / b.norm()).item() < tol


def test_factorized_linear_computes_two_products_plus_bias():
    rng = _rng()
    left, right, bias = rng.standard_normal((12, 3)), rng.standard_normal((3, 20)), rng.standard_normal(12)
    module = FactorizedLinear.from_factors(left, right, bias, dtype=F64)
    x = torch.as_tensor(rng.standard_normal((2, 5, 20)))
    expected = x @ torch.as_tensor(right.T @ left.T) + torch.as_tensor(bias)
    assert _close(module(x), expected)
    assert count_parameters(module) == 3 * (12 + 20) + 12
    assert module.manifest_entry() == {"kind": "factorized", "in_features": 20, "out_features": 12, "rank": 3,
                                       "bias": True, "dtype": "float64", "columns": None}
    assert "rank=3" in repr(module)


def test_block_identity_storage_is_exact_and_smaller():
    """R with R[:, columns] = I stores r(m + n - r) numbers and computes the same y."""
    rng = _rng(1)
    out_f, in_f, rank = 10, 16, 4
    columns = [7, 2, 11, 0]  # any order: R[:, columns[i]] = e_i
    right = rng.standard_normal((rank, in_f))
    right[:, columns] = np.eye(rank)
    left = rng.standard_normal((out_f, rank))
    module = FactorizedLinear.from_factors(left, right, columns=columns, dtype=F64)
    plain = FactorizedLinear.from_factors(left, right, dtype=F64)
    x = torch.as_tensor(rng.standard_normal((3, in_f)))
    assert _close(module(x), plain(x))
    assert torch.equal(module.right_matrix(), plain.right)
    assert count_parameters(module) == rank * (out_f + in_f - rank) < out_f * in_f
    assert count_parameters(plain) - count_parameters(module) == rank * rank
    assert module.manifest_entry()["columns"] == columns
    assert set(dict(module.named_parameters())) == {"left", "right_rest"}
    assert not module.state_dict().keys() - {"left", "right_rest"}  # indices live in the manifest


def test_block_identity_rejects_non_identity_block():
    rng = _rng(2)
    right = rng.standard_normal((2, 6))
    with pytest.raises(ValueError, match="not the identity"):
        FactorizedLinear.from_factors(rng.standard_normal((5, 2)), right, columns=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        FactorizedLinear(6, 5, 2, columns=[1, 1])
    with pytest.raises(ValueError, match="rank"):
        FactorizedLinear(6, 5, 7)


def test_headwise_projection_matches_per_head_formula_and_q_proj_layout():
    rng = _rng(3)
    heads, head_dim, rank, width = 4, 8, 3, 32
    expansion = rng.standard_normal((heads, head_dim, rank))
    right = rng.standard_normal((heads, rank, width))
    bias = rng.standard_normal(heads * head_dim)
    module = HeadwiseProjection.from_factors(expansion, right, bias, dtype=F64)
    x = rng.standard_normal((2, 5, width))
    per_head = [x @ right[h].T @ expansion[h].T for h in range(heads)]
    expected = np.concatenate(per_head, axis=-1) + bias
    assert _close(module(torch.as_tensor(x)), torch.as_tensor(expected))
    # Equal to the dense linear with block rows E_h A_h: the drop-in for q_proj.
    dense = np.concatenate([expansion[h] @ right[h] for h in range(heads)], axis=0)
    assert _close(module(torch.as_tensor(x)), torch.as_tensor(x @ dense.T + bias))
    assert module.out_features == heads * head_dim
    assert count_parameters(module) == heads * rank * (width + head_dim) + heads * head_dim
    assert module.manifest_entry()["kind"] == "headwise"
    # any leading shape: one vector, one decode token, no tokens at all
    for lead in [(), (1, 1), (3, 0)]:
        xs = rng.standard_normal(lead + (width,))
        got = module(torch.as_tensor(xs))
        assert got.shape == lead + (heads * head_dim,)
        assert got.numel() == 0 or _close(got, torch.as_tensor(xs @ dense.T + bias))


def test_headwise_full_rank_pca_reproduces_q_proj_in_model():
    """Q_h = orthogonal basis per head, A_h = Q_h^T W_h: the model's logits are unchanged."""
    model = tiny_model("qwen2")  # q has a bias
    spec = get_spec(model)
    ids = token_batch()
    reference = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    for layer in range(spec.num_layers):
        q_proj = get_linear(model, layer, "q", spec)
        bases = torch.linalg.qr(torch.randn(spec.num_heads, spec.head_dim, spec.head_dim, generator=gen, dtype=F64)).Q
        rows = q_proj.weight.detach().reshape(spec.num_heads, spec.head_dim, -1)
        right = torch.einsum("hdr,hdn->hrn", bases, rows)
        module = HeadwiseProjection.from_factors(bases, right, q_proj.bias.detach())
        replace_linear(model, f"model.layers.{layer}.self_attn.q_proj", module)
    assert _close(model(ids).logits, reference, 1e-10)


def test_manifest_entries_round_trip_to_same_shapes_on_meta():
    rng = _rng(4)
    modules = [
        FactorizedLinear.from_factors(rng.standard_normal((6, 2)), rng.standard_normal((2, 9)), np.ones(6)),
        HeadwiseProjection.from_factors(rng.standard_normal((2, 4, 3)), rng.standard_normal((6, 9))),
        nn.Linear(9, 5, bias=False, dtype=torch.float16),
    ]
    right = rng.standard_normal((3, 9))
    right[:, [4, 1, 8]] = np.eye(3)
    modules.append(FactorizedLinear.from_factors(rng.standard_normal((7, 3)), right, columns=[4, 1, 8]))
    for module in modules:
        entry = json.loads(json.dumps(manifest_entry(module)))  # JSON-safe
        skeleton = module_from_entry(entry, device="meta")
        assert type(skeleton) is type(module)
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
        assert {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()} == shapes
        assert all(p.is_meta for p in skeleton.parameters())
        assert manifest_entry(skeleton) == entry
    with pytest.raises(ValueError, match="unknown module kind"):
        module_from_entry({"kind": "conv", "dtype": "float32"})
    with pytest.raises(TypeError):
        manifest_entry(nn.ReLU())


def test_replace_linear_returns_old_and_counts_drop():
    model = tiny_model("llama")
    before = count_parameters(model)
    name = "model.layers.0.mlp.down_proj"
    old = model.get_submodule(name)
    rank = 8
    new = FactorizedLinear(old.in_features, old.out_features, rank, dtype=F64)
    assert replace_linear(model, name, new) is old
    assert model.get_submodule(name) is new
    assert count_parameters(model) == before - old.weight.numel() + rank * (old.in_features + old.out_features)
    with pytest.raises(TypeError):
        replace_linear(model, "model.layers.0.self_attn.head_dim", new)


def test_count_parameters_counts_tied_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))
