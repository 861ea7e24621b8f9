"""lrmath_hf: apply lrmath's decisions to Hugging Face transformers models.

Data flows one way: model -> calibration statistics (lrmath accumulators) ->
decisions (ranks, bases, factors; pure lrmath functions) -> module surgery ->
saved model (safetensors + JSON manifest).  ``lrmath`` never imports this package.

Submodules load on first use so ``import lrmath_hf`` does not import transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "pipeline",
    "CompressionReport": "pipeline",
    "save_compressed": "io",
    "load_compressed": "io",
    "get_spec": "specs",
    "ArchSpec": "specs",
    "perplexity": "evaluate",
    "fold_value_output": "attention",
    "FactorizedLinear": "modules",
    "HeadwiseProjection": "modules",
    "load_model": "zoo",
    "load_text": "zoo",
    "list_models": "zoo",
    "token_windows": "data",
    "protocol_windows": "data",
    "throughput": "evaluate",
    "tune_decode_layout": "layout",
    "set_layout": "layout",
    "standard_layout": "layout",
}
_SUBMODULES = {"zoo", "data", "specs", "modules", "attention", "io", "evaluate", "calibrate", "distributed", "layout", "pipeline", "cli", "recipes"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lrmath_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
