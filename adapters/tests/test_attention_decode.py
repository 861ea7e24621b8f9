"""Decode steps on reduced value heads: one query token attends on the ``r``-dim value cache as it is.

The grouped single-query path of :mod:`lrmath_hf._value_attention` must compute what SDPA computes on
the values zero-padded to ``d_h`` (the prefill path), for every head layout and mask SDPA takes.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ._tiny_models import ARCHS, cache_kwarg, cache_of, tiny_model, token_batch
from .test_attention import IMPLEMENTATIONS, RTOL, _fold_all, _no_eos, _rel


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

    from lrmath_hf._value_attention import _padded_value_attention

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
    from lrmath_hf._value_attention import _single_query_attention

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


@pytest.mark.skipif("sdpa" not in IMPLEMENTATIONS, reason="this transformers has no SDPA attention")
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per-head"])
def test_decode_step_on_reduced_values_is_differentiable(mask_kind):
    """Under autograd the grouped path (in-place mask and scale included) has SDPA's gradients on padded values."""
    from types import SimpleNamespace

    from lrmath_hf._value_attention import _single_query_attention

    rank = 3
    query, key, value, keep = _decode_inputs(6, 2, rank)
    mask = _decode_masks(keep, 6)[mask_kind]
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    weights = torch.randn(2, 1, 6, rank, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def gradients(attend):
        inputs = [t.clone().requires_grad_() for t in (query, key, value)]
        (attend(*inputs) * weights).sum().backward()
        return [t.grad for t in inputs]

    got = gradients(lambda q, k, v: _single_query_attention(q, k, v, mask, 0.3)[0])
    reference = gradients(lambda q, k, v: ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, q, k, torch.nn.functional.pad(v, (0, q.shape[-1] - rank)), mask, scaling=0.3)[0][..., :rank])
    for g, r in zip(got, reference):
        assert _rel(g, r) < RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_on_reduced_values_on_cuda(dtype):
    """The grouped single-query path computes SDPA's padded result on a CUDA device too."""
    from types import SimpleNamespace

    from lrmath_hf._value_attention import _single_query_attention

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

    from lrmath_hf._value_attention import _single_query_attention

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


def test_decode_path_choice_follows_the_measurements():
    """Grouped on the CPU and on CUDA in float32; the padded fused kernel on CUDA in bfloat16 / float16
    (scripts/decode_attention_paths.py on an H200, docs/results-gpu-2026-11-28.md)."""
    from types import SimpleNamespace

    from lrmath_hf._value_attention import _grouped_decode_pays

    def query(device, dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert _grouped_decode_pays(query("cpu", torch.float32)) and _grouped_decode_pays(query("cpu", torch.bfloat16))
    assert _grouped_decode_pays(query("cuda", torch.float32))
    assert not _grouped_decode_pays(query("cuda", torch.bfloat16))
    assert not _grouped_decode_pays(query("cuda", torch.float16))
    assert not _grouped_decode_pays(query("mps", torch.float32))
