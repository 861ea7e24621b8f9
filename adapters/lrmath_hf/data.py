"""Text -> token windows, and images -> DINOv2 pixel values.

The evaluation protocol of the decoder adapters: calibration = the first 64 windows of
512 tokens of the wiki calibration split; evaluation = the first 80 non-overlapping
512-token windows of the wiki evaluation split; no special tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CALIBRATION_WINDOWS",
    "EVALUATION_WINDOWS",
    "SEQ_LEN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "token_windows",
    "protocol_windows",
    "check_vocabulary",
    "to_tensor_images",
    "preprocess_images",
    "random_crops",
]

SEQ_LEN = 512
CALIBRATION_WINDOWS = 64
EVALUATION_WINDOWS = 80
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tokens kept beyond the last window when only a prefix is tokenised: the cut can only
# change the last pre-token, so everything this far before it tokenises as in the whole text.
_PREFIX_MARGIN = 256


def check_vocabulary(ids: torch.Tensor, model, what: str) -> None:
    """Refuse token ids outside ``model``'s input vocabulary; ``what`` names them in the error.

    The embedding would otherwise fail deep inside the forward with ``index out of range``.
    """
    if not ids.numel():
        return
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or model.config.vocab_size
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{what} has token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab})")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(tokenizer, text: str, seq_len: int = SEQ_LEN, n_windows: int | None = None) -> torch.Tensor:
    """Cut a text into non-overlapping windows of token ids.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Called without special tokens (the SmolLM2 GGUF tokenizer adds no BOS anyway).
    text : str
    seq_len : int, optional
        Tokens per window.
    n_windows : int, optional
        The first ``n_windows`` windows; all complete windows when None.

    Returns
    -------
    torch.Tensor
        int64, shape ``(n, seq_len)``; the tail shorter than a window is dropped.

    Raises
    ------
    ValueError
        If the text holds fewer than ``n_windows`` windows (or not one).

    Notes
    -----
    With ``n_windows`` set, only a growing prefix of the text is tokenised (the wiki
    evaluation text is 853k tokens; the protocol uses 41k).  The ids equal those of the
    whole text because pre-tokenisation is local and a margin of tokens past the last
    window is discarded.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be positive, got {n_windows}")
    if n_windows is None:
        ids = _encode(tokenizer, text)
    else:
        need = n_windows * seq_len
        chars = max(4096, 8 * (need + _PREFIX_MARGIN))
        while True:
            ids = _encode(tokenizer, text[:chars])
            if chars >= len(text):
                break
            if len(ids) >= need + _PREFIX_MARGIN:
                ids = ids[:need]
                break
            chars *= 2
    n_available = len(ids) // seq_len
    n = n_available if n_windows is None else n_windows
    if n_available < n or n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens: {n_available} windows of {seq_len}, "
            f"{n_windows or 1} needed"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def protocol_windows(tokenizer, split: str, *, seq_len: int = SEQ_LEN, n_windows: int | None = None) -> torch.Tensor:
    """Token windows of the wiki text as the evaluation protocol takes them.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    split : {"calibration", "evaluation"}
    seq_len : int, optional
    n_windows : int, optional
        Default: 64 for calibration, 80 for evaluation.

    Returns
    -------
    torch.Tensor
        int64, shape ``(n_windows, seq_len)``.
    """
    from .zoo import load_text

    if n_windows is None:
        n_windows = CALIBRATION_WINDOWS if split == "calibration" else EVALUATION_WINDOWS
    return token_windows(tokenizer, load_text("wiki", split=split), seq_len, n_windows)


def to_tensor_images(images) -> list[torch.Tensor]:
    """Images as float ``(3, H, W)`` tensors in [0, 1]; grey images get 3 equal channels.

    Parameters
    ----------
    images : array or iterable of arrays
        uint8 ``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)`` arrays or PIL images, a dict of
        them (its values are used) or one uint8 array ``(N, H, W)`` of grey images.

    Returns
    -------
    list of torch.Tensor
    """
    if isinstance(images, dict):
        images = list(images.values())
    elif isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (3, 4):
        images = list(images)
    elif isinstance(images, np.ndarray) or hasattr(images, "mode"):
        images = [images]
    tensors = []
    for image in images:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        array = array[:, :, :3]
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        tensor = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1) / scale
        tensors.append(tensor)
    return tensors


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    """Bicubic, antialiased resize of a (3, H, W) tensor, clamped back to [0, 1]."""
    out = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _normaliser(mean, std):
    """``(x - mean) / std`` over RGB batches, with ``mean`` / ``std`` checked before any image is touched."""
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    if mean_t.shape not in ((), (3,)) or std_t.shape not in ((), (3,)):
        raise ValueError(f"mean and std take one value or one per RGB channel, got {tuple(mean_t.shape)} "
                         f"and {tuple(std_t.shape)}")
    if not bool((std_t > 0).all()):
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    return lambda batch: (batch - mean_t.reshape(1, -1, 1, 1)) / std_t.reshape(1, -1, 1, 1)


def preprocess_images(images, size: int = 224, *, resize: int | None = None, center_crop: bool = True,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """DINOv2 evaluation preprocessing: resize, center crop, ImageNet normalisation.

    Parameters
    ----------
    images : array, PIL image, or iterable / dict of them
        See :func:`to_tensor_images`.
    size : int, optional
        Output side in pixels (224, or 112 for a fast run; a multiple of 14).
    resize : int, optional
        Shorter side before cropping; default ``round(size * 256 / 224)`` as in
        facebook/dinov2-small.
    center_crop : bool, optional
        If False the whole image is resized to ``size x size`` (small digits).
    mean, std : float or sequence of 3 floats, optional
        Per-channel normalisation ``(x - mean) / std`` of the [0, 1] pixels; ImageNet's by
        default. Other checkpoints differ (google/vit-base-patch16-224: 0.5 and 0.5): pass
        the image processor's ``image_mean`` / ``image_std``.

    Returns
    -------
    torch.Tensor
        float32, shape ``(n, 3, size, size)``.
    """
    normalise = _normaliser(mean, std)
    out = []
    for image in to_tensor_images(images):
        if not center_crop:
            out.append(_resize(image, (size, size)))
            continue
        short = resize or round(size * 256 / 224)
        height, width = image.shape[1:]
        scale = short / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        image = _resize(image, (new_h, new_w))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out.append(image[:, top : top + size, left : left + size])
    return normalise(torch.stack(out))


def random_crops(images, n: int, size: int = 224, *, seed: int = 0, scale=(0.25, 1.0), flip: bool = True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Random resized crops and horizontal flips of some photos, for calibration.

    Parameters
    ----------
    images : array, PIL image, or iterable / dict of them
        See :func:`to_tensor_images`; crop ``i`` comes from image ``i % len(images)``.
    n : int
        Number of crops.
    size : int, optional
        Output side in pixels.
    seed : int, optional
        Seed of a private generator: the same seed gives the same crops.
    scale : tuple of float, optional
        Range of the crop area as a fraction of the image area (square crops).
    flip : bool, optional
        Flip half of the crops left-right.
    mean, std : float or sequence of 3 floats, optional
        Normalisation, as in :func:`preprocess_images`.

    Returns
    -------
    torch.Tensor
        float32, shape ``(n, 3, size, size)``, normalised (ImageNet by default).
    """
    normalise = _normaliser(mean, std)
    tensors = to_tensor_images(images)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = tensors[i % len(tensors)]
        height, width = image.shape[1:]
        side = int(round(np.sqrt(rng.uniform(*scale)) * min(height, width)))
        side = max(1, min(side, height, width))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = _resize(image[:, top : top + side, left : left + side], (size, size))
        if flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return normalise(torch.stack(out))
