"""Attention on reduced (``r < d_h``) value heads: the kernels behind :mod:`lrmath_hf.attention`.

Fused kernels (SDPA's flash path on CPU and CUDA, FlashAttention) need one
head dim for queries, keys and values, so with ``r < d_h`` SDPA silently falls
back to its unfused math path.  :func:`_padded_value_attention` therefore
zero-pads the values to ``d_h`` after the cache and runs the model's own
implementation, except for a decode step (one query token) where
:func:`_single_query_attention` attends on the ``r``-dim values directly.
:func:`_padded_name` registers one such wrapper per implementation with
transformers' ``AttentionInterface``; the reduced module's config view
(:class:`lrmath_hf.attention._ValueConfig`) names it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

_PADDED = "lrmath_padded_value"
_UNPADDED = (None, "eager", "paged|eager")  # implementations that take any value head dim


def _single_query_attention(query, key, value, attention_mask, scaling):
    """SDPA's result for one query token, on ``r``-dim values as they are, heads grouped by KV head.

    ``softmax(q_h K_g^T s + M) V_g`` for the ``H / G`` query heads of each KV
    head ``g`` at once (two batched matmuls, no ``repeat_kv``, no padding).
    ``attention_mask`` as SDPA takes it: boolean (True attends) or additive.
    Returns ``(batch, 1, H, r)``, the layout SDPA's wrapper returns.

    The products are 3-d ``bmm`` over ``batch * G`` (a 4-d ``matmul`` cost
    twice as much per call on one CPU thread), the first one applies the
    scale itself (``baddbmm_``, ``beta = 0``) and the mask updates its
    buffer in place: 33 against 47 us a step at 64 cached tokens for
    SmolLM2-135M's heads (``r = 58``, one CPU thread).
    """
    batch, heads, _, head_dim = query.shape
    groups, length, rank = key.shape[1], key.shape[2], value.shape[-1]
    per_group = heads // groups
    scale = head_dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch * groups, per_group, head_dim)
    keys = key.reshape(batch * groups, length, head_dim).transpose(1, 2)
    # beta = 0: the empty buffer is never read (not even its NaNs).  The in-place
    # updates are safe under autograd: no backward here needs the scores before them.
    scores = grouped.new_empty(batch * groups, per_group, length).baddbmm_(grouped, keys, beta=0, alpha=scale)
    if attention_mask is not None:
        mask = attention_mask
        if mask.shape[1] != 1:  # per query head: (b, H, 1, L) -> (b, G, H/G, L), as the scores
            mask = mask.reshape(mask.shape[0], groups, per_group, length)
        grid = scores.view(batch, groups, per_group, length)
        if mask.dtype == torch.bool:
            grid.masked_fill_(mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            grid.add_(mask)
    if scores.dtype in (torch.float16, torch.bfloat16):
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, value.reshape(batch * groups, length, rank)).view(batch, 1, heads, rank), None


_SDPA_ONLY = ("position_bias", "softcap", "s_aux")  # arguments the single-query path does not apply


def _padded_value_attention(module: nn.Module, query, key, value, attention_mask, *, implementation: str,
                            **kwargs):
    """The model's attention ``implementation`` with ``r``-dim values zero-padded to the query head dim.

    ``softmax(q k^T) [V, 0] = [softmax(q k^T) V, 0]``, so the first ``r``
    output columns are the reduced attention and the rest are dropped.

    A decode step under SDPA (one query token, no dropout) on the CPU, or on
    CUDA in float32, runs :func:`_single_query_attention` instead: padding
    copies the whole value cache on every step, and the fused kernel gains
    nothing on one query. ``scripts/decode_attention_paths.py`` on
    SmolLM2-135M's heads (9 query, 3 KV, ``r = 33``), one CPU thread (stop 22):
    34 us against 54 us padded at 96 cached tokens, 265 us against 473 us at
    2,048, 990 us against 2,243 us at 8,192 (the dense layer's SDPA: 38, 344
    and 1,552 us). On an H200 (docs/results-gpu-2026-11-28.md, the grouped
    path's earlier 4-d ``matmul`` form), float32: 67 us against 148-156 us
    padded from 96 to 2,048 cached tokens, 136 against 155 at 8,192; but
    bfloat16 keeps the padded fused kernel, 47-55 us against 82-153 us grouped.
    """
    rank, head_dim = value.shape[-1], query.shape[-1]
    if (rank < head_dim and query.shape[2] == 1 and implementation == "sdpa" and _grouped_decode_pays(query)
            and not kwargs.get("dropout") and all(kwargs.get(name) is None for name in _SDPA_ONLY)):
        return _single_query_attention(query, key, value, attention_mask, kwargs.get("scaling"))
    if rank < head_dim:
        value = torch.nn.functional.pad(value, (0, head_dim - rank))
    output, weights = ALL_ATTENTION_FUNCTIONS[implementation](module, query, key, value, attention_mask, **kwargs)
    return output[..., :rank], weights


def _grouped_decode_pays(query) -> bool:
    """Where the grouped single-query path was measured faster than padded SDPA (see above)."""
    return query.device.type == "cpu" or (query.device.type == "cuda" and query.dtype == torch.float32)


_PADDED_NAMES: dict[str, str] = {}  # model implementation -> its registered padded wrapper


def _padded_name(implementation: str) -> str:
    """Name of the padded wrapper around ``implementation``, registered on first use.

    One wrapper per implementation, with the name bound, so that the call does
    not read the config a second time (a transformers config attribute read
    costs microseconds, paid per layer and decode step).
    """
    name = _PADDED_NAMES.get(implementation)
    if name is None:
        name = f"{_PADDED}:{implementation}"
        AttentionInterface.register(name, functools.partial(_padded_value_attention, implementation=implementation))
        _PADDED_NAMES[implementation] = name
    return name
