"""Encoder specs for the ViT family: ViT, DeiT and DINOv2 (transformers 5.x layouts).

Registers ``vit``, ``deit`` and ``dinov2`` with :func:`lrmath_hf.specs.register_family`.
transformers 5.x gives all three the same block layout (``attention.q_proj`` ...
``attention.o_proj``, ``mlp.fc1`` / ``mlp.fc2``, a plain GELU MLP); they differ
only in where the block list lives:

=================================  ==========================================
model class                        block list
=================================  ==========================================
``ViTModel`` / ``DeiTModel``       ``layers``
``ViTForImageClassification``      ``vit.layers`` (DeiT: ``deit.layers``)
``Dinov2Model``                    ``encoder.layer``
``Dinov2ForImageClassification``   ``dinov2.encoder.layer``
=================================  ==========================================

The registered path is the one of the task model; :func:`lrmath_hf.specs.get_spec`
drops its first component for a bare backbone.  Input groups: ``{q, k, v}``
read the same (layer-normed) tokens, so one statistic serves the three;
``o``, ``up`` (fc1) and ``down`` (fc2) each read their own input.

:data:`FINAL_NORMS` names, per family, the layer norm that the backbone applies
after its last block (relative to ``model.base_model``), so a search can run
the tail of the network from a cached block input without copying model code.
"""

from __future__ import annotations

from typing import Any

from .specs import get_spec, iter_layers, register_family

__all__ = ["VISION_FAMILIES", "FINAL_NORMS", "final_norm", "encoder_layers", "mlp_width", "sync_mlp_width"]

_LINEARS = {
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "o": "attention.o_proj",
    "up": "mlp.fc1",
    "down": "mlp.fc2",
}
_GROUPS = (("q", "k", "v"), ("o",), ("up",), ("down",))
# q/k/v biases follow config.qkv_bias; the others always have one.
_BIAS = {"q": "qkv_bias", "k": "qkv_bias", "v": "qkv_bias", "o": True, "up": True, "down": True}

#: model_type -> block-list path of the task model (``ForImageClassification``).
VISION_FAMILIES = {"vit": "vit.layers", "deit": "deit.layers", "dinov2": "dinov2.encoder.layer"}

#: model_type -> path of the final layer norm inside ``model.base_model``.
FINAL_NORMS = {"vit": "layernorm", "deit": "layernorm", "dinov2": "layernorm"}



def mlp_width(config: Any) -> int:
    """Width of the MLP's hidden layer as the model builds it.

    ViT and DeiT read ``config.intermediate_size``; DINOv2 builds
    ``int(hidden_size * mlp_ratio)`` and ignores ``intermediate_size``.
    """
    if config.model_type == "dinov2":
        return int(config.hidden_size * config.mlp_ratio)
    return int(config.intermediate_size)


def sync_mlp_width(model_or_config: Any) -> Any:
    """Set ``config.intermediate_size`` to :func:`mlp_width` (a no-op for ViT / DeiT); returns the argument.

    ``get_spec`` reads ``config.intermediate_size``, which a DINOv2 config may
    lack or contradict (the model uses ``mlp_ratio``).  Until ``get_spec``
    honours the family's ``intermediate_size`` entry, call this once on a
    DINOv2 model before :func:`lrmath_hf.compress`.
    """
    config = getattr(model_or_config, "config", model_or_config)
    config.intermediate_size = mlp_width(config)
    return model_or_config


for _model_type, _layers_path in VISION_FAMILIES.items():
    register_family(
        _model_type, kind="encoder", layers_path=_layers_path, attention_path="attention",
        linears=_LINEARS, input_groups=_GROUPS, bias=_BIAS, mlp_kind="plain",
        rope=False, causal=False, intermediate_size=mlp_width,
    )


def final_norm(model: Any) -> Any:
    """The layer norm a ViT-family backbone applies after its last block.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``vit``, ``deit`` or ``dinov2`` model, bare or with a task head.

    Returns
    -------
    torch.nn.Module
        ``model.base_model.<FINAL_NORMS[model_type]>``; its output is the
        backbone's ``last_hidden_state``.
    """
    model_type = model.config.model_type
    if model_type not in FINAL_NORMS:
        raise ValueError(f"no final-norm entry for model_type {model_type!r}; known: {sorted(FINAL_NORMS)}")
    return model.base_model.get_submodule(FINAL_NORMS[model_type])


def encoder_layers(model: Any) -> list:
    """The blocks of a ViT-family model, in order."""
    spec = get_spec(model)
    return [layer for _, layer in iter_layers(model, spec)]
