"""Save and reload compressed models: safetensors + a versioned JSON manifest.

A saved model is a folder::

    manifest.json       format + version, versions of the libraries, every
                        replaced module (kind, shapes, rank, dtype, block-identity
                        columns), per-layer value head dims, tied names, the
                        recipe, its options and the compression report
    config.json         the transformers config (``config.save_pretrained``)
    model.safetensors   every tensor once (tied tensors deduplicated)

Reloading builds the model skeleton from the config with no storage (meta
parameters), swaps in the modules the manifest lists, loads the tensors
strictly with ``assign=True`` and re-ties shared parameters: the dense model is
never allocated, nothing is unpickled and no remote code runs.

Saving is atomic: everything is written and fsynced in a temporary folder next
to the target, which is then renamed into place, so an interrupted save leaves
either no model or the previous one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .attention import set_value_head_dim, value_head_dims
from .modules import manifest_entry, module_from_entry, replace_linear
from .specs import get_attention, get_spec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IncompatibleManifestError",
    "save_compressed",
    "load_compressed",
    "read_manifest",
    "build_skeleton",
]

FORMAT = "lrmath-compressed"
FORMAT_VERSION = 1
# Oldest manifest version this reader understands.
MIN_FORMAT_VERSION = 1
MANIFEST, CONFIG, WEIGHTS = "manifest.json", "config.json", "model.safetensors"
_REPLACEABLE = (torch.nn.Linear,)


class IncompatibleManifestError(ValueError):
    """The manifest was written by an incompatible version of the format."""


# --- helpers -----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _jsonable(value: Any) -> Any:
    # Reports carry numpy / torch scalars and arrays, tuples, paths, dataclasses.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _versions() -> dict[str, str]:
    # lrmath and lrmath_hf ship in one distribution, so one version covers both.
    import lrmath
    import safetensors
    import transformers

    return {"lrmath": lrmath.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def _fsync(path: Path) -> None:
    # Directories are fsynced too so the renames themselves are durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _skeleton(model_class: type, config: Any, attn_implementation: str | None) -> torch.nn.Module:
    """The model built from ``config`` with meta parameters (buffers stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return model_class._from_config(config, **kwargs)


def _replaced_modules(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Entries for every module that differs from what the config builds."""
    # _from_config writes dtype and attention choice into the config: give it a copy.
    reference = _skeleton(type(model), copy.deepcopy(model.config), None)
    entries = {}
    for name, ref_module in reference.named_modules():
        if not isinstance(ref_module, _REPLACEABLE):
            continue
        module = model.get_submodule(name)
        same_kind = type(module) is type(ref_module)
        same_bias = (module.bias is None) == (ref_module.bias is None) if same_kind else False
        if same_kind and same_bias and module.weight.shape == ref_module.weight.shape:
            continue
        entries[name] = manifest_entry(module)
    return entries


def _unique_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases, and ``{alias: kept}`` for tied parameters."""
    tensors, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses views into shared storage: store a compact copy.
        tensors[name] = tensor.detach().contiguous().clone() if tensor.numel() else tensor.detach()
    return tensors, tied


def _nonpersistent_buffers(model: torch.nn.Module) -> dict[str, str]:
    persistent = set(model.state_dict())
    return {name: _dtype_name(buf.dtype) for name, buf in model.named_buffers()
            if name not in persistent and buf.is_floating_point()}


def _read_tensors(file: Path, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, one at a time, in torch-allocated storage.

    safetensors hands out CPU tensors at 8-byte alignment; BLAS kernels may sum
    in another order on such buffers, so each one is copied into the 64-byte
    aligned storage the saved model had (one extra tensor at a time, never the
    whole model).
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the weights the manifest names are missing")
    state = {}
    try:
        handle = safe_open(str(file), framework="pt", device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
        raise ValueError(f"{file} is not a readable safetensors file ({err}): truncated or damaged") from None
    with handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            elif tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor = tensor.clone()
            state[name] = tensor
    return state


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_folder(folder: Path, model: torch.nn.Module, manifest: dict, tensors: dict) -> None:
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", FORMAT: str(FORMAT_VERSION)})
    _fsync(folder / WEIGHTS)
    model.config.save_pretrained(folder)
    _fsync(folder / CONFIG)
    _write_json(folder / MANIFEST, manifest)
    _fsync(folder)


# --- public API --------------------------------------------------------------------------


def save_compressed(
    model: torch.nn.Module,
    path: str | os.PathLike,
    report: Any = None,
    *,
    recipe: str | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (compressed) transformers model as safetensors + a JSON manifest.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a supported family (:func:`lrmath_hf.specs.get_spec`),
        possibly with factorised / head-wise / narrowed linears and reduced
        value head dims.
    path : path-like
        Target folder; its parent is created if needed.
    report : object, optional
        The compression report (dataclass, ``to_dict()`` object or mapping);
        stored in the manifest, and its ``recipe`` / ``options`` too.
    recipe, options : optional
        Override the recipe name and options taken from ``report``.
    overwrite : bool
        Replace an existing target; otherwise an existing target is an error.

    Returns
    -------
    pathlib.Path
        The target folder.

    Raises
    ------
    FileExistsError
        When ``path`` exists and ``overwrite`` is false.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    spec = get_spec(model)
    report_json = _jsonable(report) if report is not None else None
    if isinstance(report_json, dict):
        recipe = recipe if recipe is not None else report_json.get("recipe")
        options = options if options is not None else report_json.get("options")
    tensors, tied = _unique_tensors(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "model_type": spec.model_type,
        "model_class": type(model).__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "files": {"weights": WEIGHTS, "config": CONFIG},
        "modules": _replaced_modules(model),
        "value_head_dims": {str(k): v for k, v in value_head_dims(model, spec).items()},
        "tied": tied,
        "buffers": _nonpersistent_buffers(model),
        "recipe": recipe,
        "options": _jsonable(options),
        "report": report_json,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _write_folder(staging, model, manifest, tensors)
        if target.exists():
            retired = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _saved_folder(path: str | os.PathLike) -> Path:
    """The saved folder, also when given the path of its manifest file."""
    path = Path(path)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the manifest of a saved model.

    Raises
    ------
    FileNotFoundError
        When ``path`` holds no manifest.
    ValueError
        When the manifest is not valid JSON.
    IncompatibleManifestError
        When the manifest is not this format or its version is not readable here.
    """
    manifest_path = _saved_folder(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: not a model saved by lrmath_hf.save_compressed")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}): the saved folder is damaged") from None
    if manifest.get("format") != FORMAT:
        raise IncompatibleManifestError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        written_by = manifest.get("versions", {}).get("lrmath", "unknown")
        raise IncompatibleManifestError(
            f"{manifest_path}: format version {version!r} (written by lrmath {written_by}) is not readable; "
            f"this lrmath reads versions {MIN_FORMAT_VERSION}..{FORMAT_VERSION}"
        )
    return manifest


def _model_class(name: str) -> type:
    # Only transformers' own classes: never code shipped with the checkpoint.
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"model class {name!r} is not a transformers model class")
    return cls


def build_skeleton(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The saved model's structure with meta parameters, and its manifest.

    Replaced modules and reduced value head dims are already in place; no
    parameter storage is allocated.
    """
    from transformers import AutoConfig

    folder = _saved_folder(path)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model = _skeleton(_model_class(manifest["model_class"]), config,
                      attn_implementation or manifest.get("attn_implementation"))
    for name, entry in manifest["modules"].items():
        replace_linear(model, name, module_from_entry(entry, device="meta", dtype=dtype))
    spec = get_spec(model)
    for layer, value_dim in manifest["value_head_dims"].items():
        set_value_head_dim(get_attention(model, int(layer), spec), value_dim)
    return model, manifest


def load_compressed(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Reload a model written by :func:`save_compressed`.

    Parameters
    ----------
    path : path-like
        The saved folder (or its ``manifest.json``).
    dtype : torch.dtype, optional
        Cast floating tensors to this dtype; default: as saved.
    device : str or torch.device, optional
        Where to load the tensors; default CPU.
    attn_implementation : str, optional
        Attention implementation; default: the one the model was saved with.

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode; with the saved dtype its logits are bit-identical to the
        saved model's.

    Raises
    ------
    IncompatibleManifestError
        For a manifest of another format version.
    FileNotFoundError
        When the manifest or the weights file it names is missing.
    ValueError
        When the manifest is not valid JSON or the weights file is truncated or
        damaged.
    RuntimeError
        When the tensors do not match the skeleton exactly (missing or
        unexpected names, wrong shapes).
    """
    folder = _saved_folder(path)
    model, manifest = build_skeleton(folder, dtype=dtype, attn_implementation=attn_implementation)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = _read_tensors(folder / manifest["files"]["weights"], device, dtype)
    for alias, kept in manifest["tied"].items():
        if kept in state:
            state[alias] = state[kept]
    model.load_state_dict(state, strict=True, assign=True)
    for alias, kept in manifest["tied"].items():
        owner, _, leaf = alias.rpartition(".")
        shared = dict(model.named_parameters()).get(kept)
        setattr(model.get_submodule(owner), leaf, shared if shared is not None else model.get_buffer(kept))
    # Non-persistent buffers (RoPE frequencies) are recomputed: give them the saved dtype.
    for name, dtype_name in manifest["buffers"].items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, leaf, getattr(module, leaf).to(dtype or getattr(torch, dtype_name)))
    model.to(device)
    if dtype is not None:
        model.config.dtype = dtype
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors never loaded: {leftover[:5]}")
    return model.eval()
