"""Input checks shared by the public functions.

Every check raises ``ValueError`` naming the argument and the problem; none of
them copies or mutates its input.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ._backend import namespace, to_numpy

__all__ = [
    "check_array",
    "check_finite",
    "check_square",
    "check_symmetric",
    "check_rank",
    "check_nonnegative_scalar",
    "check_int",
    "symmetry_tolerance",
    "dtype_eps",
]


def check_array(name: str, x, *, ndim=None, min_ndim=None):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array (numpy, torch or cupy), got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    xp = namespace(x)
    if not xp.isdtype(x.dtype, ("real floating", "integral")):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return xp


def check_finite(name: str, x, xp=None):
    xp = xp or namespace(x)
    if math.prod(x.shape):
        xf = x if xp.isdtype(x.dtype, "real floating") else xp.astype(x, xp.float64)
        if not bool(xp.all(xp.isfinite(xf))):
            raise ValueError(f"{name} contains NaN or Inf")


def check_square(name: str, C, *, finite: bool = True):
    xp = check_array(name, C, min_ndim=2)
    if C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions, got shape {tuple(C.shape)}")
    if C.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(C.shape)})")
    if finite:
        check_finite(name, C, xp)
    return xp


def symmetry_tolerance(C, xp) -> float:
    """Allowed ``max|C - C^T|`` relative to ``max|C|``: a few hundred ulps of the dtype times sqrt(d)."""
    eps = dtype_eps(C.dtype)
    return 256 * eps * math.sqrt(C.shape[-1])


def dtype_eps(dtype) -> float:
    """Unit roundoff of a numpy / torch / cupy float dtype (by name, so no library is imported)."""
    try:
        name = np.dtype(dtype).name  # numpy / cupy dtypes and scalar types
    except TypeError:
        name = str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> "float32"
    return {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23}.get(name, 2.0**-52)


def check_symmetric(name: str, C, xp=None):
    """Square, finite and symmetric up to a dtype- and size-derived tolerance."""
    xp = xp or check_square(name, C, finite=False)
    if not xp.isdtype(C.dtype, "real floating"):
        C = xp.astype(C, xp.float64)
    # max|C| as max(max C, -min C): no |C| temporary; it propagates NaN and Inf (no finiteness pass).
    # C - C^T is antisymmetric, so its largest entry is its largest magnitude. The three reductions
    # come to the host together: one device synchronisation
    top = bottom = asym = 0.0
    if math.prod(C.shape):
        with np.errstate(invalid="ignore"):  # Inf - Inf: the scale check below names the Inf
            extremes = xp.stack([xp.max(C), xp.min(C), xp.max(C - xp.matrix_transpose(C))])
        top, bottom, asym = (float(v) for v in to_numpy(extremes))
    scale = max(top, -bottom)
    if not math.isfinite(scale):
        raise ValueError(f"{name} contains NaN or Inf")
    if asym > symmetry_tolerance(C, xp) * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{name} is not symmetric: max|C - C^T| = {asym:.3g} exceeds "
            f"{symmetry_tolerance(C, xp):.2g} * max|C| = {symmetry_tolerance(C, xp) * scale:.3g}"
        )
    return xp


def check_rank(name: str, r, upper: int, lower: int = 0) -> int:
    """An integer rank in ``[lower, upper]``."""
    try:
        r_int = operator.index(r)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(r).__name__}") from None
    if not lower <= r_int <= upper:
        raise ValueError(f"{name} = {r_int} is outside [{lower}, {upper}]")
    return r_int


def check_int(name: str, value, minimum: int = 0) -> int:
    """An integer (``operator.index``) of at least ``minimum``."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_nonnegative_scalar(name: str, value) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v
