"""lrmath: verified numerics for training-free, data-aware low-rank compression.

Every function dispatches on the arrays it is given (numpy, torch on any
device, cupy) through array-api-compat; there is no global backend.  Results
are float64 (float32 on devices without float64) on the input's device.

Submodules are imported on first use (SPEC 1 lazy loading) so that
``import lrmath`` stays cheap; ``dir(lrmath)`` and ``lrmath.__all__`` list the
public names.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # statistics
    "Moments": "moments",
    "PowerSums": "moments",
    "ledoit_wolf": "shrinkage",
    "oas": "shrinkage",
    "shrink": "shrinkage",
    "ShrinkageResult": "shrinkage",
    # whitening, PCA, SVD
    "whiten": "whitening",
    "Whitener": "whitening",
    "damped_cholesky": "whitening",
    "DampedCholesky": "whitening",
    "pca_truncate": "pca",
    "PCAResult": "pca",
    "whitened_svd": "svd",
    "SVDResult": "svd",
    "block_identity": "junction",
    # ranks
    "k_equiv": "search",
    "round_rank": "search",
    "bisect_rank": "search",
    "BisectResult": "search",
    "rank_for_error": "search",
    # allocation
    "angular_importance": "importance",
    "AngularImportance": "importance",
    "iprs_allocate": "allocation",
    "capped_simplex_projection": "allocation",
    "allocate_ranks": "allocation",
    "RankAllocation": "allocation",
    # joint subspaces and MLP
    "joint_subspaces": "tucker",
    "JointSubspaces": "tucker",
    "nystrom_select": "nystrom",
    "nystrom_refit": "nystrom",
    "nystrom_fold": "nystrom",
    "obs_path": "nystrom",
    "EliminationPath": "nystrom",
    "NystromResult": "nystrom",
    "joint_mlp": "updown",
    "JointMLPResult": "updown",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lrmath' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return __all__
