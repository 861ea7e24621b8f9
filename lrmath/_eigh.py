"""Batched symmetric eigendecomposition, with a verified Jacobi route on CUDA.

torch's CUDA ``eigh`` runs a batch of matrices larger than 32 x 32 one ``syevd`` call at
a time (it keeps cuSOLVER's batched Jacobi solver for the small ones), which made
``pca_truncate`` over a layer's heads no faster than a per-head loop on an H200
(1.02-1.07x at 3-32 heads of 64-128, docs/benchmarks-cuda-2026-11-27.md). CuPy's batched
``eigh`` calls cuSOLVER ``syevjBatched`` for any size; a probe on the same GPU
(scripts/eigh_paths.py) timed it 3.2x-12x faster than the per-head loop. So a
batched torch-CUDA input borrows it on the same memory (DLPack, torch's current
stream), and any batched Jacobi answer, CuPy's own included, is accepted only after
a backward-error check: Jacobi stops at a sweep limit without raising, and CuPy
does not check cuSOLVER's ``info`` by default.
"""

from __future__ import annotations

import warnings

import array_api_compat

from ._backend import each_matrix, is_torch, namespace
from ._validation import dtype_eps

__all__ = ["eigh", "backward_error_ok"]

# up to the sizes where the route paid and passed its check with room (H200, docs/results-gpu-2026-11-28.md:
# 7.5x at 9 x 64, 8.8x at 32 x 128, loss of orthogonality 28 d eps there); at 8 x 256 it was 1.9x with a
# loss of 49 d eps, too near the threshold of 60 to be worth a failed attempt
_JACOBI_MAX_DIM = 128
# torch already uses the batched Jacobi solver up to this size
_TORCH_BATCHED_MAX_DIM = 32
# backward error allowed, in units of d * machine epsilon: LAPACK's own acceptance threshold for its
# symmetric eigensolvers (TESTING/sep.in: 60, "theoretical limit ~500, empirically reached limit ~170")
_BACKWARD_FACTOR = 60.0
_cupy_state = {"module": None, "tried": False, "warned": False}


def eigh(A, xp=None):
    """``(eigenvalues ascending, eigenvectors)`` of a (batched) symmetric ``A``, on its library and device."""
    xp = xp or namespace(A)
    if array_api_compat.is_cupy_namespace(xp) and _batched(A):
        return _checked_or_loop(A, xp, xp.linalg.eigh(A))
    jacobi_pays = _TORCH_BATCHED_MAX_DIM < A.shape[-1] <= _JACOBI_MAX_DIM
    # a tensor that requires grad keeps torch's differentiable eigh (DLPack refuses to export it anyway)
    if is_torch(xp) and A.device.type == "cuda" and not A.requires_grad and _batched(A) and jacobi_pays:
        out = _borrow_cupy(A)
        if out is not None and backward_error_ok(A, *out, xp=xp):
            return out
    return xp.linalg.eigh(A)


def backward_error_ok(A, w, V, *, xp=None) -> bool:
    r"""Whether ``(w, V)`` is a backward-stable eigendecomposition of every matrix of ``A``.

    Accepts when, per matrix, :math:`\|AV - V\operatorname{diag} w\|_F \le c\, d\, u\, \|A\|_F`,
    :math:`\|V^\top V - I\|_F \le c\, d\, u` (``u`` the dtype's machine epsilon, ``c`` = 60, the
    threshold LAPACK's tests accept its own symmetric eigensolvers by) and ``w`` is ascending.
    One device synchronisation.
    """
    xp = xp or namespace(A, w, V)
    d = A.shape[-1]
    tol = _BACKWARD_FACTOR * d * dtype_eps(A.dtype)
    resid = A @ V - V * w[..., None, :]
    gram = xp.matrix_transpose(V) @ V
    ortho = gram - xp.eye(d, dtype=A.dtype, device=array_api_compat.device(A))
    norm = xp.linalg.matrix_norm
    ok = xp.all((norm(resid) <= tol * norm(A)) & (norm(ortho) <= tol))
    if d > 1:
        ok = ok & xp.all(w[..., 1:] >= w[..., :-1])
    return bool(ok)  # the one synchronisation


def _batched(A) -> bool:
    return A.ndim > 2 and A.shape[-1] > 1 and all(s > 0 for s in A.shape) and \
        int(array_api_compat.size(A)) // (A.shape[-1] * A.shape[-2]) > 1


def _checked_or_loop(A, xp, out):
    """CuPy's batched (Jacobi) answer if it passes the check, else one ``syevd`` call per matrix."""
    if backward_error_ok(A, *out, xp=xp):
        return out
    return each_matrix(xp.linalg.eigh, A, xp)


def _borrow_cupy(A):
    """CuPy's batched ``eigh`` of a torch CUDA tensor, as torch tensors; ``None`` without a working CuPy."""
    cupy = _cupy()
    if cupy is None:
        return None
    import torch

    try:
        with cupy.cuda.Device(A.device.index), \
                cupy.cuda.ExternalStream(torch.cuda.current_stream(A.device).cuda_stream):
            w, V = cupy.linalg.eigh(cupy.from_dlpack(A.contiguous()))
            return torch.from_dlpack(w), torch.from_dlpack(V)
    except Exception as exc:  # a CuPy built for another CUDA, out of memory...: torch's own eigh still works
        if not _cupy_state["warned"]:
            _cupy_state["warned"] = True
            warnings.warn(f"CuPy's batched eigh failed ({exc.__class__.__name__}: {exc}); using torch.linalg.eigh",
                          RuntimeWarning, stacklevel=3)
        return None


def _cupy():
    if not _cupy_state["tried"]:
        _cupy_state["tried"] = True
        try:
            import cupy
        except Exception:  # not installed, or no CUDA runtime for it
            cupy = None
        _cupy_state["module"] = cupy
    return _cupy_state["module"]
