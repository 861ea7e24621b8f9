"""``lrmath_hf.compress``: one call from a Hugging Face model to a smaller one, with a report."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from .data import check_vocabulary
from .modules import count_parameters
from .recipes import check_options, get_recipe
from .recipes.common import linear_parameters
from .specs import get_spec

__all__ = ["CompressionReport", "compress", "calibration_batches"]


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` did, in numbers.

    ``ratio_achieved`` is the fraction of the compressible linears' parameters
    (q, k, v, o, gate, up, down; both factors of a factorised linear) that
    was removed; ``model_ratio_achieved`` the fraction of all parameters.
    """

    recipe: str
    ratio_requested: float
    ratio_achieved: float
    model_ratio_achieved: float
    linear_params_before: int
    linear_params_after: int
    model_params_before: int
    model_params_after: int
    ranks: dict[str, Any]
    timings: dict[str, float]
    calibration: dict[str, Any]
    options: dict[str, Any]
    details: dict[str, Any]
    versions: dict[str, str]
    spectra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the spectra (kept for plots), as JSON-ready values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spectra"}
        return json.loads(json.dumps(out, default=str))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), default=str, **kwargs)

    def summary(self) -> str:
        """A few human-readable lines."""
        t = self.timings
        # every phase the recipe timed, in its order (flar: search, factorisation, latency; others: decisions)
        phases = "".join(f"{name} {seconds:.1f} s; " for name, seconds in t.items()
                         if name not in ("calibration", "total") and isinstance(seconds, (int, float)))
        return "\n".join([
            f"recipe {self.recipe}: removed {100 * self.ratio_achieved:.1f}% of the compressible linears' parameters "
            f"({self.linear_params_before:,} -> {self.linear_params_after:,}), "
            f"{100 * self.model_ratio_achieved:.1f}% of the model",
            f"calibration {self.calibration.get('tokens', 0):,} tokens in {t.get('calibration', 0):.1f} s; "
            f"{phases}total {t.get('total', 0):.1f} s",
        ])


def _versions() -> dict[str, str]:
    import lrmath
    import transformers

    return {"lrmath": lrmath.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def calibration_batches(calibration, *, tokenizer=None, seq_len: int = 512, n_windows: int | None = 64,
                        batch_size: int = 1) -> list:
    """Normalise ``calibration`` into a list of model-input batches.

    ``calibration`` may be a text (``tokenizer`` required): its first
    ``n_windows`` non-overlapping windows of ``seq_len`` tokens; a 2-D tensor of
    token ids (rows are windows); or an iterable of batches (tensors or dicts of
    model inputs), used as given.
    """
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError("calibration is a text: pass tokenizer= to turn it into token windows")
        from .data import token_windows

        calibration = token_windows(tokenizer, calibration, seq_len=seq_len, n_windows=n_windows)
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim == 1:
            calibration = calibration[None]
        return list(torch.split(calibration, batch_size))
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def _check_batches(model: nn.Module, spec, batches: list) -> None:
    """Refuse calibration batches the model cannot read, naming the batch (before any work is done)."""
    key = "input_ids" if spec.kind == "decoder" else "pixel_values"
    for i, batch in enumerate(batches):
        x = batch
        if isinstance(batch, Mapping):  # dict, or a BatchEncoding / BatchFeature
            if key not in batch:
                if spec.kind == "decoder" and "inputs_embeds" in batch:
                    continue
                raise ValueError(f"calibration batch {i} is a dict without {key!r} (keys: {sorted(batch)})")
            x = batch[key]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batch {i} must be a tensor or a dict of tensors, got {type(x).__name__}")
        if spec.kind == "decoder":
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise TypeError(f"calibration batch {i} holds {x.dtype} values: a {spec.model_type} model "
                                "calibrates on token ids (an integer tensor); pass text with tokenizer=")
            check_vocabulary(x, model, f"calibration batch {i}")
        elif not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"calibration batch {i} ({x.dtype}, shape {tuple(x.shape)}) is not pixel values: "
                             f"a {spec.model_type} model calibrates on float (batch, channels, height, width) images")


def _tokens(batches) -> int:
    total = 0
    for b in batches:
        t = b.get("input_ids", b.get("pixel_values")) if isinstance(b, Mapping) else b
        total += int(t.shape[0] * t.shape[1]) if t.ndim >= 2 else int(t.numel())
    return total


@torch.no_grad()
def compress(model: nn.Module, calibration: Iterable | str | torch.Tensor, *, recipe: str = "auto",
             ratio: float = 0.2, tokenizer=None, progress: bool = True, calibration_source: str | None = None,
             **options) -> CompressionReport:
    """Compress ``model`` in place with a training-free, data-aware recipe.

    Parameters
    ----------
    model : torch.nn.Module
        A supported Hugging Face model (``lrmath_hf.specs.supported_model_types()``), on
        any device: statistics and decompositions run where the model is.
    calibration : iterable, tensor or str
        Token-id batches (or ``pixel_values`` batches for a ViT), a 2-D tensor
        of windows, or a text with ``tokenizer=`` (see :func:`calibration_batches`).
        Batches may stay on the host; each is moved to the model's input device.
    recipe : str
        ``auto``, ``svd``, ``svd-llm``, ``flat``, ``flat-paper``, ``latent``, ``flar``.
    ratio : float
        Fraction of the compressible linears' parameters to remove, in (0, 1).
    tokenizer : optional
        Needed when ``calibration`` is a text.
    progress : bool
        tqdm progress bars.
    calibration_source : str, optional
        A description of the calibration data for the report.
    **options
        Passed to the recipe (``lrmath_hf.recipes.recipe_options(recipe)`` lists them).

    Returns
    -------
    CompressionReport

    Raises
    ------
    ValueError
        ``ratio`` outside (0, 1); an unknown ``recipe`` or one that does not apply to
        the model (``flar`` on a decoder); an unsupported model; an empty
        calibration; a batch the model cannot read (token ids outside the
        vocabulary, images not 4-D floats).
    TypeError
        An option the recipe does not take; a decoder batch that is not integer
        token ids.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
    spec = get_spec(model)
    run = get_recipe(recipe)
    check_options(recipe, options)
    batches = calibration_batches(calibration, tokenizer=tokenizer)
    _check_batches(model, spec, batches)
    was_training = model.training
    model.eval()
    linear_before, model_before = linear_parameters(model, spec), count_parameters(model)
    start = time.perf_counter()
    outcome = run(model, spec, batches, ratio=float(ratio), progress=progress, **options)
    total = time.perf_counter() - start
    model.train(was_training)
    linear_after, model_after = linear_parameters(model, spec), count_parameters(model)
    timings = dict(outcome.timings, total=total)
    return CompressionReport(
        recipe=recipe,
        ratio_requested=float(ratio),
        ratio_achieved=1.0 - linear_after / linear_before,
        model_ratio_achieved=1.0 - model_after / model_before,
        linear_params_before=linear_before,
        linear_params_after=linear_after,
        model_params_before=model_before,
        model_params_after=model_after,
        ranks=outcome.ranks,
        timings=timings,
        calibration={"batches": len(batches), "tokens": outcome.calibration_tokens or _tokens(batches),
                     "source": calibration_source},
        # precomputed statistics (``stats=``) are data, not a setting: the report records the settings only
        options={k: v for k, v in options.items() if k != "stats"},
        details=outcome.details,
        versions=_versions(),
        spectra=outcome.spectra,
    )
