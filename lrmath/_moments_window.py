r"""Batches summed about one anchor, then folded into :class:`lrmath.Moments` at once (its GPU path).

On a GPU an update is bound by kernel launches, not arithmetic: the pairwise merge of
:func:`lrmath._power_sums._merge` is about a hundred small operations, which made
``Moments.update`` 0.05x (d = 576) and 0.26x (d = 1536) of a plain ``X^T X``
accumulation on an H200 (docs/benchmarks-cuda.md). Here the rows of consecutive
batches are measured from one anchor ``c`` (the first batch's mean):
``z = x - c``, and their power sums simply add,

.. math:: S_1 = \sum z,\quad S_2 = \sum z z^\top,\quad S_3 = \sum \|z\|^2 z,\quad
          S_4 = \sum \|z\|^4 \;(\text{and } \textstyle\sum z^{\circ 3}, \sum z^{\circ 4}),

about a dozen operations per batch. Reading the statistics folds them back to sums
about the window's mean by the exact inverse shift (``M_2 = S_2 - n \delta\delta^\top``,
``\delta = S_1 / n``, :func:`lrmath._power_sums._unshift`), then merges once.

Accuracy: that subtraction cancels when the mean is far from the anchor. Each batch
is screened first (one small host transfer): it joins only if, per feature,
``n_b e^2 \le \tau\, \sum (x - \bar x_b)^2`` with ``e`` its mean's offset from ``c``
(``\tau`` = 1). Then :math:`n\delta_i^2 \le \sum_b n_b e_{b,i}^2 \le \tau M_{2,ii}`, so the
cancellation costs at most a factor :math:`1 + \tau` (one bit) on each diagonal entry.
A batch that fails (a stream whose mean jumps by more than its spread) is merged
exactly by the pairwise path instead, and the next one starts a new window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._backend import is_torch, to_numpy
from ._power_sums import _nan_sums, _unshift

DRIFT = 1.0  # tau above
_ROUNDING = 16.0  # a batch of a constant feature is centred only to ~ eps |c|: that much offset is rounding


class Window(NamedTuple):
    anchor: Any
    count: int
    s1: Any
    s2: Any
    s3: Any
    s4: Any
    zd3: Any
    zd4: Any


class Screened(NamedTuple):
    """One batch measured from the anchor, with the reductions the screen and the sums share."""

    z: Any
    sz: Any
    r2: Any
    r4: Any
    z2: Any


def measure(w, anchor, xp, own: bool):
    """``z = w - anchor`` (in place when ``w`` is the caller's own copy)."""
    if own:
        w -= anchor[..., None, :]
        return w
    return w - anchor[..., None, :]


def screen(z, anchor, xp, fourth: bool, per_feature: bool):
    """``(Screened, verdict)``: verdict is ``"ok"``, ``"drift"`` or ``"nonfinite"`` (one host transfer)."""
    n = z.shape[-2]
    sz = xp.sum(z, axis=-2)
    # fused reductions, no n x d temporary of squares (the same rounding with and without per_feature)
    q = xp.linalg.vector_norm(z, axis=-2) ** 2
    r2 = xp.linalg.vector_norm(z, axis=-1) ** 2 if fourth else None
    z2 = z * z if per_feature else None
    r4 = xp.sum(r2 * r2, axis=-1) if fourth else None  # the batch's fourth sum: overflow shows here
    parts = [sz, q, xp.abs(anchor)] + ([r4[..., None]] if fourth else [])
    host = to_numpy(xp.concat(parts, axis=-1))
    d = sz.shape[-1]
    h_sz, h_q, h_c = host[..., :d], host[..., d:2 * d], host[..., 2 * d:3 * d]
    eps = np.finfo(host.dtype).eps
    with np.errstate(invalid="ignore", over="ignore"):
        if not np.all(np.isfinite(host)):
            return None, "nonfinite"
        floor = n * (_ROUNDING * eps * h_c) ** 2
        drift_ok = np.all((1.0 + DRIFT) * h_sz * h_sz / n <= DRIFT * h_q + floor)
    return Screened(z, sz, r2, r4, z2), ("ok" if drift_ok else "drift")


def add(window, anchor, b: Screened, xp, fourth: bool, per_feature: bool) -> Window:
    """The window with batch ``b`` added (a fresh window about ``anchor`` when ``window`` is None)."""
    z, n = b.z, b.z.shape[-2]
    zt = xp.matrix_transpose(z)
    if fourth:
        s3, s4 = (b.r2[..., None, :] @ z)[..., 0, :], b.r4
    if per_feature:
        zd3, zd4 = xp.sum(b.z2 * z, axis=-2), xp.sum(b.z2 * b.z2, axis=-2)
    if window is None:
        nan = _nan_sums(z, xp)
        return Window(anchor, n, b.sz, zt @ z, *(s3, s4) if fourth else nan[:2],
                      *(zd3, zd4) if per_feature else nan[2:])
    # the small sums out of place (numpy reduces to scalars, which have no in-place add)
    out = window._replace(count=window.count + n, s1=window.s1 + b.sz, s2=_add_gram(window.s2, z, zt, xp))
    if fourth:
        out = out._replace(s3=window.s3 + s3, s4=window.s4 + s4)
    if per_feature:
        out = out._replace(zd3=window.zd3 + zd3, zd4=window.zd4 + zd4)
    return out


def _add_gram(s2, z, zt, xp):
    """``s2 + z^T z``, in place where that is allowed (one GEMM, no d x d temporary)."""
    s2 = _writable(s2, xp)
    if is_torch(xp) and z.ndim == 2:
        return s2.addmm_(zt, z)
    s2 += zt @ z
    return s2


def _writable(a, xp):
    """``a``, or a copy where an in-place update is refused (a torch inference tensor outside inference mode)."""
    if is_torch(xp):
        import torch

        if a.is_inference() and not torch.is_inference_mode_enabled():
            return a.clone()
    return a


def fold(window: Window, xp, fourth: bool, per_feature: bool):
    """``(count, mean, M2, M3, M4, D3, D4)`` of the window's rows, sums about their mean."""
    n = window.count
    delta = window.s1 / n
    return (n, window.anchor + delta,
            *_unshift(n, delta, _writable(window.s2, xp), window.s3, window.s4, window.zd3, window.zd4, xp, fourth, per_feature))
