"""Array backends the proofs run on: numpy and torch CPU always; torch CUDA and cupy where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


_HAS_TORCH = True
try:
    import torch  # noqa: F401
except ImportError:
    _HAS_TORCH = False

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("torch", id="torch-cpu",
                 marks=pytest.mark.skipif(not _HAS_TORCH, reason="torch not installed")),
    pytest.param("torch-cuda", id="torch-cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not _cuda_available(), reason="no CUDA device")]),
    pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not _cupy_available(), reason="no cupy / CUDA device")]),
]


def to_backend(a, backend: str, dtype=None):
    """Copy a numpy array (or a tuple of them) onto ``backend``, optionally casting."""
    if isinstance(a, (tuple, list)):
        return type(a)(to_backend(x, backend, dtype) for x in a)
    a = np.asarray(a if dtype is None else np.asarray(a, dtype=dtype))
    if backend == "numpy":
        return a.copy()
    if backend == "torch":
        import torch

        return torch.from_numpy(a.copy())
    if backend == "torch-cuda":
        import torch

        return torch.from_numpy(a.copy()).to("cuda")
    if backend == "cupy":
        import cupy

        return cupy.asarray(a)
    raise ValueError(backend)


def same_library(result, like) -> bool:
    """Result lives in the same library and on the same device as ``like``."""
    from lrmath._backend import device_of, library_name

    return library_name(result) == library_name(like) and str(device_of(result)) == str(device_of(like))
