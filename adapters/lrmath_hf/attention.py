"""Attention with a value head dim smaller than the query/key head dim (FLAT-LLM V/O).

FLAT-LLM folds a per-KV-head basis ``Q_g`` (d_h, r) into the value and output
projections::

    W_v,g <- Q_g^T W_v,g          (rows of KV head g; the bias likewise)
    W_o,h <- W_o,h Q_{g(h)}       (columns of query head h, g(h) = h // (H / G))

so each head's values live in ``r`` dimensions, while queries and keys keep
``d_h`` (RoPE and the softmax scale are untouched).  At full rank with an
orthogonal ``Q_g`` the model is unchanged, because ``Q_g Q_g^T = I``.

How the forward is changed
--------------------------
The transformers decoders (llama, mistral, qwen2; 5.x) compute::

    value_states = self.v_proj(x).view(hidden_shape).transpose(1, 2)

with ``hidden_shape = (*input_shape, -1, self.head_dim)``; everything after
that line already accepts a value dim different from the key dim (the
caches store ``value_states.shape[-1]``, eager attention is two matmuls and
the SDPA integration reshapes its output with ``value.shape[-1]``).  So the
only piece changed is that one reshape: ``v_proj``'s forward is wrapped to tag
its output as :class:`ValueHeads`, a tensor whose head split ``view(..., -1, d_h)``
yields ``(..., G, r)`` heads instead.  Any other operation on the tagged tensor
returns a plain tensor.  The attention module's forward is wrapped too, to
re-install the tag if ``v_proj`` is replaced later.  Both are instance
``forward`` attributes rather than hooks (:func:`_wrap_forward` says why).
No decoder code is copied; the full-rank tests compare against the unmodified
model.

Fused kernels (SDPA's flash path on CPU and CUDA, FlashAttention) need one
head dim for queries, keys and values, so with ``r < d_h`` SDPA silently falls
back to its unfused math path (on SmolLM2-135M that made a prefill slower than
the dense model's).  A reduced attention module therefore sees its config
through :class:`_ValueConfig`, which routes every non-eager implementation to
the padded wrapper of :mod:`lrmath_hf._value_attention`: the values are
zero-padded to ``d_h`` after the cache (which keeps ``r``), the model's own
implementation runs, and the padding's output columns, which are exactly
zero, are dropped.  A decode step (one query token) under SDPA on the CPU
(and on CUDA in float32) skips the padding, which would copy the whole value
cache every step, and attends on the ``r``-dim values directly, heads grouped
by KV head; that made a reduced layer's decode attention faster than the
dense layer's instead of slower.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ._value_attention import _UNPADDED, _padded_name
from .specs import ArchSpec, get_spec, iter_layers

__all__ = [
    "ValueHeads",
    "fold_value_output",
    "set_value_head_dim",
    "get_value_head_dim",
    "value_head_dims",
]


def _split_request(tensor: torch.Tensor, shape: tuple, num_heads: int, head_dim: int) -> bool:
    """Whether ``shape`` is the per-head split ``(*lead, -1 or G, d_h)`` of ``tensor``."""
    if len(shape) != tensor.dim() + 1 or shape[-1] != head_dim or shape[-2] not in (-1, num_heads):
        return False
    lead = shape[:-2]
    if lead == tensor.shape[:-1]:  # the attention forward's own request: one tuple compare
        return True
    # Lead dims must name the tensor's own lead dims (at most one inferred with -1).
    inferred = sum(1 for s in (*lead, shape[-2]) if s == -1)
    return inferred <= 1 and all(s in (-1, t) for s, t in zip(lead, tensor.shape[:-1]))


class ValueHeads(torch.Tensor):
    """A ``v_proj`` output of width ``G r`` whose head split yields ``r``-dim heads.

    ``view`` / ``reshape`` to ``(*lead, -1, d_h)`` (the attention forward's
    ``hidden_shape``) return ``(*lead, G, r)``; every other operation returns a
    plain :class:`torch.Tensor`, so the tag never outlives the reshape.

    The two methods are plain overrides and ``__torch_function__`` is
    disabled (outputs are not re-wrapped): a Python ``__torch_function__``
    cost about 10 us per decode step and layer, the override about 4.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _lrmath_heads: tuple[int, int, int]  # (G, r, d_h)

    def _split(self, method, args):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        shape = shape if type(shape) is tuple else tuple(shape)
        num_heads, value_dim, head_dim = self._lrmath_heads
        if _split_request(self, shape, num_heads, head_dim):
            return method(self, (*self.shape[:-1], num_heads, value_dim))
        return method(self, *args)

    def view(self, *args):
        return self._split(torch.Tensor.view, args)

    def reshape(self, *args):
        return self._split(torch.Tensor.reshape, args)


def _run_inner(module: nn.Module, inner: Any, args: tuple, kwargs: dict) -> Any:
    # The forward a wrapper replaced: an instance forward it found, else the class's.
    return inner(*args, **kwargs) if inner is not None else type(module).forward(module, *args, **kwargs)


def _tagging_forward(v_proj: nn.Module, *args: Any, heads: tuple[int, int, int], inner: Any, **kwargs: Any):
    # v_proj's forward while its attention runs r-dim value heads: the head split will see them.
    output = _run_inner(v_proj, inner, args, kwargs)
    # Left inside a foreign wrapper after the tag was removed: no longer tags. (After a re-tag
    # the outermost tagging forward runs last, so its heads are the ones the output keeps.)
    if _TAG not in v_proj.__dict__:
        return output
    tagged = output.as_subclass(ValueHeads)
    tagged._lrmath_heads = heads
    return tagged


def _reduced_forward(attn: nn.Module, *args: Any, inner: Any, **kwargs: Any):
    # The attention's forward with reduced value heads: (re)tag v_proj, then the forward itself.
    _ensure_value_tag(attn)
    return _run_inner(attn, inner, args, kwargs)


def _wrap_forward(module: nn.Module, wrapper: Any, **keywords: Any) -> functools.partial:
    """Make ``wrapper`` the instance ``forward`` of ``module``, around the forward it had.

    An instance ``forward`` (not a forward hook): a module with hooks takes
    ``nn.Module``'s slow call path.  Against the two hooks this replaced, a
    decode step of SmolLM2-135M at ``auto`` 50 % (27 reduced layers, one CPU
    thread) was 1.004x faster, paired median of 9 (range 0.98x-1.02x).  A
    forward already installed on the instance (accelerate's, say) is kept
    inside and called.
    """
    forward = functools.partial(wrapper, module, inner=module.__dict__.get("forward"), **keywords)
    module.forward = forward
    return forward


def _unwrap_forward(module: nn.Module, wrapper: Any) -> None:
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is wrapper:
        inner = forward.keywords["inner"]
        if inner is None:
            del module.forward
        else:
            module.forward = inner


_TAG = "_lrmath_value_tag"  # on v_proj: its current tagging forward (the partial, which holds the heads)


def _ensure_value_tag(attn: nn.Module) -> None:
    # Runs every forward of a reduced attention, so the common case is a few dict lookups.
    v_proj = attn.v_proj
    value_dim = attn.value_head_dim
    heads = (v_proj.out_features // value_dim, value_dim, attn.head_dim)
    tag = v_proj.__dict__.get(_TAG)
    if tag is not None and v_proj.__dict__.get("forward") is tag and tag.keywords["heads"] == heads:
        return
    _remove_tag(v_proj)
    v_proj.__dict__[_TAG] = _wrap_forward(v_proj, _tagging_forward, heads=heads)


def _remove_tag(v_proj: nn.Module) -> None:
    _unwrap_forward(v_proj, _tagging_forward)
    v_proj.__dict__.pop(_TAG, None)


def _remove_wrappers(attn: nn.Module) -> None:
    _unwrap_forward(attn, _reduced_forward)
    _remove_tag(attn.v_proj)


class _ValueConfig:
    """A reduced attention module's view of the model config.

    Reads and writes go to the model's config, so a later
    ``model.set_attn_implementation`` still applies; only
    ``_attn_implementation`` differs: fused implementations are routed
    through :func:`lrmath_hf._value_attention._padded_value_attention`.
    """

    __slots__ = ("_lrmath_config",)

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_lrmath_config", config)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_lrmath_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_lrmath_config":  # copy / unpickle restore the slot
            object.__setattr__(self, name, value)
        else:
            setattr(self._lrmath_config, name, value)

    @property
    def _attn_implementation(self) -> str | None:
        implementation = self._lrmath_config._attn_implementation
        return implementation if implementation in _UNPADDED else _padded_name(implementation)


def _head_counts(attn_module: nn.Module) -> tuple[int, int]:
    # Query heads H and key/value heads G, from the module's own config.
    config = attn_module.config
    num_heads = int(config.num_attention_heads)
    return num_heads, int(getattr(config, "num_key_value_heads", None) or num_heads)


def get_value_head_dim(attn_module: nn.Module) -> int:
    """Current value head dim of an attention module (``head_dim`` when unreduced)."""
    return int(getattr(attn_module, "value_head_dim", attn_module.head_dim))


def set_value_head_dim(attn_module: nn.Module, value_head_dim: int) -> None:
    """Make ``attn_module`` run with ``value_head_dim``-dim value heads.

    Parameters
    ----------
    attn_module : nn.Module
        A decoder attention module (``LlamaAttention`` and kin) whose
        ``v_proj`` already emits ``G * value_head_dim`` features and whose
        ``o_proj`` reads ``H * value_head_dim``.
    value_head_dim : int
        ``r`` in ``[1, head_dim]``; ``head_dim`` restores the unmodified forward.

    Notes
    -----
    Sets the attribute ``value_head_dim``, installs the forward wrappers described in
    the module docstring and the config view that keeps fused attention.
    Idempotent.  :func:`fold_value_output` calls it; call it directly only
    when rebuilding a reduced model from its parts.
    """
    head_dim = int(attn_module.head_dim)
    value_head_dim = int(value_head_dim)
    if not 1 <= value_head_dim <= head_dim:
        raise ValueError(f"value_head_dim {value_head_dim} outside [1, head_dim={head_dim}]")
    num_heads, num_kv_heads = _head_counts(attn_module)
    v_out = attn_module.v_proj.out_features
    o_in = attn_module.o_proj.in_features
    if (v_out, o_in) != (num_kv_heads * value_head_dim, num_heads * value_head_dim):
        raise ValueError(
            f"v_proj emits {v_out} and o_proj reads {o_in} features: not whole heads of {value_head_dim} "
            f"({num_kv_heads} value heads, {num_heads} query heads)"
        )
    _remove_wrappers(attn_module)
    if isinstance(attn_module.config, _ValueConfig):
        attn_module.config = attn_module.config._lrmath_config
    if value_head_dim == head_dim:
        if "value_head_dim" in vars(attn_module):
            del attn_module.value_head_dim
        return
    attn_module.value_head_dim = value_head_dim
    attn_module.config = _ValueConfig(attn_module.config)
    _wrap_forward(attn_module, _reduced_forward)
    _ensure_value_tag(attn_module)


def fold_value_output(attn_module: nn.Module, spec: ArchSpec, bases: Any) -> None:
    """Fold per-KV-head value bases into ``v_proj`` / ``o_proj`` (FLAT-LLM V/O).

    Parameters
    ----------
    attn_module : nn.Module
        Attention module with dense ``nn.Linear`` ``v_proj`` and ``o_proj``.
    spec : ArchSpec
        Gives ``H``, ``G`` and the GQA map ``g(h) = h // (H / G)``.
    bases : array (G, d, r)
        Numpy or torch; ``bases[g]`` spans the kept value subspace of KV head
        ``g`` (``d`` is the current value head dim, ``d_h`` the first time).

    Notes
    -----
    ``W_v,g <- Q_g^T W_v,g``, ``b_v,g <- Q_g^T b_v,g``,
    ``W_o,h <- W_o,h Q_{g(h)}`` (``b_o`` unchanged); computed in float64 and
    cast back to the module's dtype.  Both linears are replaced by narrower
    ``nn.Linear`` modules, then :func:`set_value_head_dim` makes the attention
    run with ``r``-dim values (the V cache shrinks by ``r / d``).
    Tian et al., FLAT-LLM, arXiv 2505.23966, Sec. 3.
    """
    v_proj, o_proj = attn_module.v_proj, attn_module.o_proj
    for name, module in (("v_proj", v_proj), ("o_proj", o_proj)):
        if type(module) is not nn.Linear:
            raise TypeError(f"{name} is a {type(module).__name__}; fold V/O before any other surgery on it")
    g_heads, h_heads = spec.num_kv_heads, spec.num_heads
    value_dim = get_value_head_dim(attn_module)
    device = v_proj.weight.device
    basis = torch.as_tensor(bases).to(dtype=torch.float64, device=device)
    if basis.shape[:2] != (g_heads, value_dim) or basis.dim() != 3:
        raise ValueError(f"bases must be (G={g_heads}, d={value_dim}, r), got {tuple(basis.shape)}")
    rank = basis.shape[2]
    with torch.no_grad():
        w_v = v_proj.weight.to(torch.float64).reshape(g_heads, value_dim, -1)
        new_v = nn.Linear(v_proj.in_features, g_heads * rank, bias=v_proj.bias is not None,
                          device=device, dtype=v_proj.weight.dtype)
        new_v.weight.copy_(torch.einsum("gdr,gdn->grn", basis, w_v).reshape(g_heads * rank, -1))
        if v_proj.bias is not None:
            b_v = v_proj.bias.to(torch.float64).reshape(g_heads, value_dim)
            new_v.bias.copy_(torch.einsum("gdr,gd->gr", basis, b_v).reshape(-1))
        kv_of_head = torch.arange(h_heads, device=device) // spec.group_size
        w_o = o_proj.weight.to(torch.float64).reshape(o_proj.out_features, h_heads, value_dim)
        new_o = nn.Linear(h_heads * rank, o_proj.out_features, bias=o_proj.bias is not None,
                          device=device, dtype=o_proj.weight.dtype)
        new_o.weight.copy_(torch.einsum("ohd,hdr->ohr", w_o, basis[kv_of_head]).reshape(o_proj.out_features, -1))
        if o_proj.bias is not None:
            new_o.bias.copy_(o_proj.bias)
    attn_module.v_proj, attn_module.o_proj = new_v, new_o
    set_value_head_dim(attn_module, rank)


def value_head_dims(model: nn.Module, spec: ArchSpec | None = None) -> dict[int, int]:
    """``{layer: r}`` for every layer whose value head dim was reduced."""
    spec = spec or get_spec(model)
    dims = {}
    for index, layer in iter_layers(model, spec):
        attn = layer.get_submodule(spec.attention_path)
        if "value_head_dim" in vars(attn):
            dims[index] = int(attn.value_head_dim)
    return dims
