"""What both halves of the ``lrmath`` command share: one-line errors, devices, ratios, options, output folders.

:mod:`lrmath_hf.cli` runs decoders on text, :mod:`lrmath_hf.cli_vision` ViT-family
encoders on images; :func:`model_kind` tells them apart before a model is loaded.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CLIError", "model_kind", "recipe_options_from", "device_from", "check_ratios", "ratio_folder",
           "staged", "publish", "save_folder", "report_model", "shared_statistics"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def model_kind(name: str) -> str | None:
    """``"decoder"`` or ``"encoder"`` for a zoo name, ``.gguf`` file, saved folder or hub id, read from
    its config alone; ``None`` where that cannot be read (the loader then says why)."""
    from . import zoo

    if name in zoo.MODELS:
        return zoo.MODELS[name]["kind"]
    if name.endswith(".gguf"):
        return "decoder"
    try:
        from transformers import AutoConfig

        from . import specs_vision  # noqa: F401  (registers the ViT families)
        from .specs import get_spec

        return get_spec(AutoConfig.from_pretrained(name)).kind
    except (OSError, ValueError, KeyError):
        return None


def recipe_options_from(pairs: list[str] | None, recipe: str) -> dict:
    """``--option KEY=VALUE`` pairs as recipe options (VALUE read as JSON, else kept as text), checked."""
    from .recipes import check_options

    options = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    try:
        # statistics are data, not a command-line setting
        check_options(recipe, options, hidden=("stats", "statistics", "search_memo", "latency_table"))
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    return options


def device_from(name: str):
    """The ``--device`` argument as a torch device: ``auto`` is CUDA where present, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: supported are cpu, cuda, cuda:N and auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_ratios(ratios: list[float]) -> list[float]:
    """Each ratio in (0, 1), and no two written to the same folder."""
    seen: dict[str, float] = {}
    for ratio in ratios:
        if not 0.0 < ratio < 1.0:
            raise CLIError(f"--ratio must be in (0, 1), got {ratio}")
        name = ratio_folder(ratio)
        if name in seen and seen[name] == ratio:
            raise CLIError(f"--ratio lists {ratio} twice; give each ratio once")
        if name in seen:
            raise CLIError(f"--ratio lists {seen[name]} and {ratio}: both would be written to {name}; "
                           "give each ratio once")
        seen[name] = ratio
    return ratios


def ratio_folder(ratio: float) -> str:
    """``ratio-0.20``; more digits only where two decimals would round the ratio."""
    text = f"{ratio:.2f}"
    return f"ratio-{text if float(text) == ratio else format(ratio, '.6g')}"


@contextmanager
def staged(out: Path):
    """An empty folder to build ``out`` in, hidden beside it; removed afterwards, whatever happens.

    The caller moves what it built into place with :func:`publish` as its last step, so a
    failure or Ctrl-C leaves nothing half-written.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        root = staging / "result"
        root.mkdir()
        yield root
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(built: Path, out: Path) -> None:
    """Move a finished staging folder into place (replacing ``out``, which ``--overwrite`` allowed)."""
    if out.exists():
        shutil.rmtree(out)
    built.rename(out)


def save_folder(model, report, folder: Path, args, ratio: float, before: dict, after: dict, started: float, *,
                processor=None) -> dict:
    """Write the loadable folder, report.json and plots; return the payload.

    ``processor`` (a tokenizer or an image processor) is saved beside the model, so that
    ``lrmath eval`` and ``from_pretrained``-style tools find it in the folder itself.
    """
    from .io import save_compressed

    payload = report.to_dict()
    save_compressed(model, folder, report=payload, recipe=args.recipe, options={"ratio": ratio})
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(folder)
    after["file_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    before.setdefault("file_bytes", before["parameters"] * next(model.parameters()).element_size())
    payload.update(model=args.model, before=before, after=after, command=shlex.join(sys.argv),
                   wall_seconds=time.perf_counter() - started)
    (folder / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    _write_plots(report, folder, model)
    return payload


def _write_plots(report, folder: Path, model) -> None:
    try:
        from .plots import write_plots
        from .specs import get_spec

        write_plots(report, folder, spec=get_spec(model))
    except ImportError:  # matplotlib is optional
        pass


def report_model(folder: Path) -> str | None:
    """The base model a folder's ``report.json`` names (the command records it), else ``None``."""
    report = Path(folder) / "report.json"
    return json.loads(report.read_text()).get("model") if report.is_file() else None


def shared_statistics(model, batches, recipe: str, options: dict, *, progress: bool) -> dict:
    """Calibration statistics computed once for every ratio of a sweep, as the recipe's option takes them.

    ``{"statistics": ...}`` for ``flar`` (held-out shrinkage: the two folds it scores on),
    ``{"stats": ...}`` for the recipes that take precomputed statistics, ``{}`` for the others
    (each ratio then calibrates on its own).
    """
    from .recipes import recipe_options
    from .recipes.common import run_calibration, union_plan
    from .recipes.flar import flar_statistics
    from .specs import get_spec

    accepted, spec = recipe_options(recipe) or (), get_spec(model)
    if "statistics" in accepted and spec.kind == "encoder":  # flar on a decoder: compress refuses it at once
        folds = 2 if options.get("shrinkage") == "heldout" else 1
        return {"statistics": flar_statistics(model, spec, batches, folds=folds, progress=progress)}
    if "stats" in accepted:
        return {"stats": run_calibration(model, spec, batches, union_plan(spec), progress=progress)}
    return {}
