"""Quality of a compressed ViT: final-feature fidelity to the dense model, features for a linear probe.

Split from :mod:`lrmath_hf.evaluate` (language-model perplexity and tokens/s), which
re-exports every name here. Every function takes the model as it is and changes nothing
in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .calibrate import input_device

__all__ = ["FeatureFidelity", "feature_fidelity", "prediction_agreement", "vit_features", "fit_linear_probe",
           "linear_probe_accuracy", "linear_probe_correct"]


@torch.inference_mode()
def _hidden_states(model, pixel_values, batch_size: int) -> torch.Tensor:
    """Final (post-layernorm) token features, float32, on the CPU."""
    # A model with a head (ViTForImageClassification) is measured on its backbone.
    model = model.base_model
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    outs = []
    for start in range(0, pixel_values.shape[0], batch_size):
        batch = pixel_values[start : start + batch_size].to(device=device, dtype=dtype)
        outs.append(model(pixel_values=batch).last_hidden_state.float().cpu())
    return torch.cat(outs)


@dataclass(frozen=True)
class FeatureFidelity:
    """Agreement of a compressed ViT's final features with the dense model's, averaged over images.

    The ``*_per_image`` tuples keep each image's value (in input order) for paired tests
    (:func:`lrmath_hf.significance.paired_score_test`).
    """

    cls_cosine: float
    patch_cosine: float
    relative_error: float
    n_images: int
    cls_cosine_per_image: tuple[float, ...] = ()
    relative_error_per_image: tuple[float, ...] = ()


def feature_fidelity(dense_model, compressed_model, pixel_values, *, batch_size: int = 16) -> FeatureFidelity:
    """Cosine similarity and relative error of final ViT features against the dense model.

    Parameters
    ----------
    dense_model, compressed_model : transformers vision model
        Both return ``last_hidden_state`` of shape ``(n, 1 + patches, hidden)``.
    pixel_values : torch.Tensor
        ``(n, 3, H, W)``, e.g. from :func:`lrmath_hf.data.preprocess_images`.
    batch_size : int, optional

    Returns
    -------
    FeatureFidelity
        ``cls_cosine``: cosine of the CLS token; ``patch_cosine``: cosine of each patch
        token, averaged over patches; ``relative_error``: ``||F_c - F_d||_F / ||F_d||_F``
        of all final tokens.  Each is computed per image, then averaged over images.
    """
    dense = _hidden_states(dense_model, pixel_values, batch_size).double()
    compressed = _hidden_states(compressed_model, pixel_values, batch_size).double()
    cls_cos = F.cosine_similarity(dense[:, 0], compressed[:, 0], dim=-1)
    patch_cos = F.cosine_similarity(dense[:, 1:], compressed[:, 1:], dim=-1).mean(dim=1)
    rel = (compressed - dense).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1)
    return FeatureFidelity(
        cls_cosine=float(cls_cos.mean()),
        patch_cosine=float(patch_cos.mean()),
        relative_error=float(rel.mean()),
        n_images=int(dense.shape[0]),
        cls_cosine_per_image=tuple(float(v) for v in cls_cos),
        relative_error_per_image=tuple(float(v) for v in rel),
    )


def has_classifier(model) -> bool:
    """Whether ``model`` puts a classification head on its backbone (``...ForImageClassification``;
    DeiT's with-teacher variant has two, whose logits it averages)."""
    return model.base_model is not model and (hasattr(model, "classifier") or hasattr(model, "cls_classifier"))


@torch.inference_mode()
def prediction_agreement(dense_model, compressed_model, pixel_values, *, batch_size: int = 16) -> float:
    """Fraction of images on which two image classifiers predict the same top-1 class.

    Needs no labels: for a ``...ForImageClassification`` model it says how often
    compression changed the answer.

    Parameters
    ----------
    dense_model, compressed_model : transformers image classifier
        Both return ``logits`` of shape ``(n, classes)``.
    pixel_values : torch.Tensor
        ``(n, 3, H, W)``.
    batch_size : int, optional

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If either model has no classification head.
    """
    for model in (dense_model, compressed_model):
        if not has_classifier(model):
            raise ValueError(f"{type(model).__name__} has no classification head: compare features instead "
                             "(feature_fidelity)")
    same = 0
    for start in range(0, pixel_values.shape[0], batch_size):
        batch = pixel_values[start : start + batch_size]
        predictions = []
        for model in (dense_model, compressed_model):
            param = next(model.parameters())
            logits = model(pixel_values=batch.to(device=input_device(model), dtype=param.dtype)).logits
            predictions.append(logits.argmax(dim=-1).cpu())
        same += int((predictions[0] == predictions[1]).sum())
    return same / int(pixel_values.shape[0])


def vit_features(model, pixel_values, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Probe features of a ViT: the CLS token concatenated with the mean patch token.

    Parameters
    ----------
    model : transformers vision model
    pixel_values : torch.Tensor
        ``(n, 3, H, W)``.
    batch_size : int, optional
    progress : bool, optional
        Show a tqdm bar.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n, 2 * hidden)``.

    Notes
    -----
    DINOv2's standard linear-probe features (Oquab et al., 2023, section 7).
    """
    from tqdm.auto import tqdm

    feats = []
    starts = range(0, pixel_values.shape[0], batch_size)
    for start in tqdm(starts, desc="features", unit="batch", disable=not progress):
        hidden = _hidden_states(model, pixel_values[start : start + batch_size], batch_size)
        feats.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1))
    return torch.cat(feats).numpy()


def fit_linear_probe(features, labels, *, C: float = 1.0, max_iter: int = 2000):
    """Fit a logistic-regression probe on frozen (dense) features.

    Parameters
    ----------
    features : array, shape (n, d)
        From :func:`vit_features` of the DENSE backbone on the training split.
    labels : array, shape (n,)
    C : float, optional
        Inverse L2 strength of scikit-learn's ``LogisticRegression``.
    max_iter : int, optional

    Returns
    -------
    sklearn.pipeline.Pipeline
        Standardisation (statistics of the dense training features) then the classifier;
        keep it fixed and score compressed backbones with :func:`linear_probe_accuracy`.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise ModuleNotFoundError("the linear probe needs scikit-learn: pip install scikit-learn") from exc
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    return probe.fit(np.asarray(features, dtype=np.float64), np.asarray(labels))


def linear_probe_accuracy(probe, features, labels) -> float:
    """Top-1 accuracy of a fitted probe on features of the held-out split.

    Parameters
    ----------
    probe : sklearn estimator
        From :func:`fit_linear_probe` (fitted on dense features).
    features : array, shape (n, d)
        :func:`vit_features` of the backbone being scored (dense or compressed).
    labels : array, shape (n,)

    Returns
    -------
    float
        Fraction of correct predictions, in [0, 1].
    """
    return float(np.mean(linear_probe_correct(probe, features, labels)))


def linear_probe_correct(probe, features, labels) -> np.ndarray:
    """Per-example correctness (bool, shape ``(n,)``) of a fitted probe; what
    :func:`paired_accuracy_test` compares and :func:`linear_probe_accuracy` averages."""
    return probe.predict(np.asarray(features, dtype=np.float64)) == np.asarray(labels)
