"""``auto``: the combination that measured best on the real SmolLM2-135M (see docs/results.md).

FLAT-LLM's head-wise V/O PCA (value head dim and V cache shrink) plus
activation-aware SVD of q, k, gate, up, down, with every rank decided in one
global allocation of relative output energy per parameter.
"""

from __future__ import annotations

from . import RecipeResult, register
from .svd import run_svd


@register("auto")
def run_auto(model, spec, batches, *, ratio: float, progress: bool = True, **options) -> RecipeResult:
    """Run the measured-best combination; ``options`` override its defaults."""
    settings = {"vo": "pca", "energy": "relative", "whitening": "cholesky", "multiple": 8, **options}
    result = run_svd(model, spec, batches, ratio=ratio, progress=progress, **settings)
    result.details["auto_settings"] = settings
    return result
