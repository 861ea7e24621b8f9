"""Declarative per-architecture specs: where the linears are and how heads map.

One :class:`ArchSpec` per architecture family, keyed by ``config.model_type``.
A family contributes only *layout* (module paths, which linears share an input,
which biases exist, the MLP kind); the sizes (head counts, head dim, widths) are
read from the config by :func:`get_spec`.  Recipes and I/O never hard-code a
module path: they ask the spec.

The registry is shaped after peft's ``target_module_mapping`` and llm-compressor's
per-architecture mappings.  Encoder families (ViT, DeiT, DINOv2) fit the same
dataclass: ``kind="encoder"``, ``rope=False``, ``causal=False``, a plain MLP and
role paths relative to their own layer modules.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Iterator, Mapping

__all__ = [
    "ArchSpec",
    "get_spec",
    "supported_model_types",
    "register_family",
    "iter_layers",
    "get_layer",
    "get_attention",
    "linear_name",
    "get_linear",
    "set_linear",
]

# the first transformers release whose modules the registered layouts name (DINOv2 took the
# q_proj ... o_proj layout in 5.18; 5.17 still nests attention.attention.query); pyproject.toml agrees
MIN_TRANSFORMERS = "5.18"

ATTENTION_ROLES = ("q", "k", "v", "o")
GATED_MLP_ROLES = ("gate", "up", "down")
PLAIN_MLP_ROLES = ("up", "down")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Layout and sizes of one transformer model, resolved from its config.

    Parameters
    ----------
    model_type : str
        ``config.model_type`` of the family (``"llama"``, ``"mistral"``, ...).
    kind : {"decoder", "encoder"}
        Causal decoder or bidirectional encoder.
    layers_path : str
        Dotted path from the top-level model to the ``ModuleList`` of blocks.
    attention_path : str
        Path from a block to the module whose forward computes attention (the
        one holding ``head_dim`` and the q/k/v projections).
    linears : Mapping[str, str]
        Role (``q k v o gate up down``) -> path of that linear from a block.
    input_groups : tuple of tuple of str
        Roles that read the same input tensor, so one second-moment statistic
        serves the whole group: ``(("q", "k", "v"), ("o",), ("gate", "up"), ("down",))``.
    bias : Mapping[str, bool]
        Role -> whether that linear has a bias (Qwen2: q, k, v only).
    mlp_kind : {"gated", "plain"}
        ``down(act(gate x) * up x)`` or ``down(act(up x))``.
    activation : str
        ``config.hidden_act`` (``"silu"`` for the gated decoders, ``"gelu"`` for ViT).
    num_layers, hidden_size, intermediate_size : int
        Block count and widths.
    num_heads, num_kv_heads, head_dim : int
        Query heads ``H``, key/value heads ``G`` (``G = H`` without GQA) and
        the query/key head dimension ``d_h``.
    rope : bool
        Whether queries and keys are rotated (RoPE) after projection.
    causal : bool
        Causal self-attention.
    sliding_window : int or None
        Window of sliding-window layers (Mistral, Qwen2 with
        ``use_sliding_window``); ``None`` when no layer slides.
    layer_types : tuple of str or None
        Per-layer attention kind (``"full_attention"`` / ``"sliding_attention"``)
        where the config declares it.
    tie_word_embeddings : bool
        Whether the output head shares the input embedding matrix.

    Notes
    -----
    Grouped-query attention: query head ``h`` reads key/value head
    ``h // (H / G)`` (:meth:`kv_head`), the ``repeat_kv`` convention of
    transformers.
    """

    model_type: str
    kind: str
    layers_path: str
    attention_path: str
    linears: Mapping[str, str]
    input_groups: tuple[tuple[str, ...], ...]
    bias: Mapping[str, bool]
    mlp_kind: str
    activation: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool = True
    causal: bool = True
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # Read-only views so a shared spec cannot be mutated by a caller.
        object.__setattr__(self, "linears", MappingProxyType(dict(self.linears)))
        object.__setattr__(self, "bias", MappingProxyType(dict(self.bias)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        grouped = [role for group in self.input_groups for role in group]
        if sorted(grouped) != sorted(self.linears):
            raise ValueError(f"input_groups {self.input_groups} must cover the roles {tuple(self.linears)} once")

    @property
    def roles(self) -> tuple[str, ...]:
        """Linear roles in forward order (``q k v o`` then the MLP)."""
        return tuple(self.linears)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``H / G``."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, query_head: int) -> int:
        """Key/value head read by ``query_head``: ``h // (H / G)``."""
        if not 0 <= query_head < self.num_heads:
            raise IndexError(f"query head {query_head} out of range [0, {self.num_heads})")
        return query_head // self.group_size

    def query_heads(self, kv_head: int) -> range:
        """Query heads that read key/value head ``kv_head``."""
        if not 0 <= kv_head < self.num_kv_heads:
            raise IndexError(f"kv head {kv_head} out of range [0, {self.num_kv_heads})")
        return range(kv_head * self.group_size, (kv_head + 1) * self.group_size)

    def input_group(self, role: str) -> tuple[str, ...]:
        """The roles that share ``role``'s input (one statistic for all of them)."""
        for group in self.input_groups:
            if role in group:
                return group
        raise KeyError(f"unknown role {role!r}; roles: {self.roles}")

    def shape(self, role: str) -> tuple[int, int]:
        """Dense ``(out_features, in_features)`` of ``role`` as the config builds it."""
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        shapes = {
            "q": (h * d, self.hidden_size),
            "k": (g * d, self.hidden_size),
            "v": (g * d, self.hidden_size),
            "o": (self.hidden_size, h * d),
            "gate": (self.intermediate_size, self.hidden_size),
            "up": (self.intermediate_size, self.hidden_size),
            "down": (self.hidden_size, self.intermediate_size),
        }
        if role not in self.linears:
            raise KeyError(f"unknown role {role!r}; roles: {self.roles}")
        return shapes[role]

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding_attention"


# --- registry -----------------------------------------------------------------------------

# Layout of one family.  ``bias`` values are a bool or the name of a boolean config attribute.
_FAMILIES: dict[str, dict[str, Any]] = {}

_DECODER_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_DECODER_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def register_family(model_type: str, **layout: Any) -> None:
    """Register (or replace) the layout of an architecture family.

    Parameters
    ----------
    model_type : str
        The ``config.model_type`` this layout serves.
    **layout
        ``kind``, ``layers_path``, ``attention_path``, ``linears``,
        ``input_groups``, ``bias`` (role -> bool or config attribute name),
        ``mlp_kind`` and optionally ``rope``, ``causal``, ``sliding`` (how to
        read the sliding window: ``None``, ``"always"`` or ``"flag"`` for
        ``use_sliding_window``-style configs).
    """
    required = {"kind", "layers_path", "attention_path", "linears", "input_groups", "bias", "mlp_kind"}
    missing = required - set(layout)
    if missing:
        raise ValueError(f"family {model_type!r} lacks {sorted(missing)}")
    _FAMILIES[model_type] = dict(layout)


def supported_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values with a registered spec."""
    return tuple(sorted(_FAMILIES))


register_family(
    "llama", kind="decoder", layers_path="model.layers", attention_path="self_attn",
    linears=_DECODER_LINEARS, input_groups=_DECODER_GROUPS, mlp_kind="gated",
    bias={"q": "attention_bias", "k": "attention_bias", "v": "attention_bias", "o": "attention_bias",
          "gate": "mlp_bias", "up": "mlp_bias", "down": "mlp_bias"},
)
register_family(
    "mistral", kind="decoder", layers_path="model.layers", attention_path="self_attn",
    linears=_DECODER_LINEARS, input_groups=_DECODER_GROUPS, mlp_kind="gated",
    bias=dict.fromkeys(_DECODER_LINEARS, False), sliding="always",
)
register_family(
    "qwen2", kind="decoder", layers_path="model.layers", attention_path="self_attn",
    linears=_DECODER_LINEARS, input_groups=_DECODER_GROUPS, mlp_kind="gated",
    bias={"q": True, "k": True, "v": True, "o": False, "gate": False, "up": False, "down": False},
    sliding="flag",
)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config


def _sliding_window(config: Any, rule: str | None) -> int | None:
    window = getattr(config, "sliding_window", None)
    if rule is None or window is None:
        return None
    if rule == "flag" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def get_spec(model_or_config: Any) -> ArchSpec:
    """Resolve the :class:`ArchSpec` of a model or config.

    Parameters
    ----------
    model_or_config : transformers.PreTrainedModel or transformers.PretrainedConfig
        Anything with ``config.model_type`` (or a config itself).

    Returns
    -------
    ArchSpec
        The family layout with the sizes read from the config.

    Raises
    ------
    ValueError
        For a ``model_type`` without a registered family; the message lists
        the supported ones.
    """
    config = _config_of(model_or_config)
    model_type = config.model_type
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    bias = {
        role: bool(getattr(config, rule, False)) if isinstance(rule, str) else bool(rule)
        for role, rule in family["bias"].items()
    }
    layer_types = getattr(config, "layer_types", None)
    return ArchSpec(
        model_type=model_type,
        kind=family["kind"],
        layers_path=family["layers_path"],
        attention_path=family["attention_path"],
        linears=family["linears"],
        input_groups=tuple(tuple(g) for g in family["input_groups"]),
        bias=bias,
        mlp_kind=family["mlp_kind"],
        activation=str(getattr(config, "hidden_act", "")),
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        rope=family.get("rope", True),
        causal=family.get("causal", True),
        sliding_window=_sliding_window(config, family.get("sliding")),
        layer_types=tuple(layer_types) if layer_types is not None else None,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


# --- navigation ---------------------------------------------------------------------------


def _layers(model: Any, spec: ArchSpec) -> Any:
    try:
        return model.get_submodule(spec.layers_path)
    except AttributeError:
        # A bare base model (``LlamaModel``) lacks the task head's prefix.
        _, _, rest = spec.layers_path.partition(".")
        if rest:
            return model.get_submodule(rest)
        raise


def _layers_prefix(model: Any, spec: ArchSpec) -> str:
    layers = _layers(model, spec)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise LookupError("layer list not found among the model's modules")


def iter_layers(model: Any, spec: ArchSpec | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, block)`` for every transformer block of ``model``."""
    spec = spec or get_spec(model)
    yield from enumerate(_layers(model, spec))


def get_layer(model: Any, layer: int, spec: ArchSpec | None = None) -> Any:
    """The block at index ``layer``."""
    spec = spec or get_spec(model)
    return _layers(model, spec)[layer]


def get_attention(model: Any, layer: int, spec: ArchSpec | None = None) -> Any:
    """The attention module of block ``layer`` (holds ``head_dim`` and q/k/v/o)."""
    spec = spec or get_spec(model)
    return get_layer(model, layer, spec).get_submodule(spec.attention_path)


def linear_name(model: Any, layer: int, role: str, spec: ArchSpec | None = None) -> str:
    """Qualified module name of ``role`` in block ``layer`` (``model.layers.3.self_attn.q_proj``)."""
    spec = spec or get_spec(model)
    if role not in spec.linears:
        raise KeyError(f"unknown role {role!r}; roles: {spec.roles}")
    return f"{_layers_prefix(model, spec)}.{layer}.{spec.linears[role]}"


def get_linear(model: Any, layer: int, role: str, spec: ArchSpec | None = None) -> Any:
    """The module playing ``role`` in block ``layer`` (dense or already replaced)."""
    spec = spec or get_spec(model)
    if role not in spec.linears:
        raise KeyError(f"unknown role {role!r}; roles: {spec.roles}")
    try:
        return get_layer(model, layer, spec).get_submodule(spec.linears[role])
    except AttributeError as exc:  # e.g. DINOv2 before transformers 5.18 (attention.attention.query ...)
        import transformers

        raise ValueError(
            f"block {layer} of this {spec.model_type} model has no {spec.linears[role]!r} ({role}): lrmath_hf "
            f"knows the module layout of transformers >= {MIN_TRANSFORMERS}, and transformers "
            f"{transformers.__version__} is installed") from exc


def set_linear(model: Any, layer: int, role: str, module: Any, spec: ArchSpec | None = None) -> Any:
    """Put ``module`` in place of ``role`` in block ``layer``; return the old module."""
    spec = spec or get_spec(model)
    if role not in spec.linears:
        raise KeyError(f"unknown role {role!r}; roles: {spec.roles}")
    parent_path, _, attr = spec.linears[role].rpartition(".")
    block = get_layer(model, layer, spec)
    parent = block.get_submodule(parent_path) if parent_path else block
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


# Encoder families (vit, deit, dinov2) register themselves; imported last since they use register_family.
from . import specs_vision as _specs_vision  # noqa: E402,F401
