r"""Batches summed about one anchor, then folded into :class:`lrmath.Moments` at once (its GPU path).

On a GPU an update is bound by kernel launches, not arithmetic: the pairwise merge of
:func:`lrmath._power_sums._merge` is about a hundred small operations, which made
``Moments.update`` 0.05x (d = 576) and 0.26x (d = 1536) of a plain ``X^T X``
accumulation on an H200 (docs/benchmarks-cuda-2026-11-27.md). Here the rows of consecutive
batches are measured from one anchor ``c`` (the first batch's mean):
``z = x - c``, and their power sums simply add,

.. math:: S_1 = \sum z,\quad S_2 = \sum z z^\top,\quad S_3 = \sum \|z\|^2 z,\quad
          S_4 = \sum \|z\|^4 \;(\text{and } \textstyle\sum z^{\circ 3}, \sum z^{\circ 4}),

about a dozen operations per batch. Reading the statistics folds them back to sums
about the window's mean by the exact inverse shift (``M_2 = S_2 - n \delta\delta^\top``,
``\delta = S_1 / n``, :func:`lrmath._power_sums._unshift`), then merges once.

Accuracy: that subtraction cancels when the mean is far from the anchor. Each batch
is screened (one small transfer to the host, which on CUDA overlaps the batch's Gram
product): it joins only if, per feature, the window keeps
:math:`\sum_b n_b e_b^2 \le \tau \sum_b \sum_{k \in b} (x_k - \bar x_b)^2`, with :math:`e_b`
the offset of batch ``b``'s mean from ``c`` (``\tau`` = 1). Then
:math:`n\delta_i^2 \le \sum_b n_b e_{b,i}^2 \le \tau M_{2,ii}` (Jensen), so the cancellation
costs at most a factor :math:`1 + \tau` (one bit) on each diagonal entry. A batch that
fails (a stream whose mean jumps by more than its spread) is merged exactly by the
pairwise path instead, and the next one starts a new window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._backend import is_torch, to_numpy
from ._power_sums import _nan_sums, _unshift

DRIFT = 1.0  # tau above
_ROUNDING = 16.0  # a batch of a constant feature is centred only to ~ eps |c|: that much offset is rounding


class Sums(NamedTuple):
    """Power sums of rows measured from the anchor (None where not kept, in one batch's)."""

    count: int
    s1: Any
    s2: Any
    s3: Any
    s4: Any
    zd3: Any
    zd4: Any


class Window(NamedTuple):
    """The window's sums (device) and its screen's totals (host)."""

    anchor: Any
    sums: Sums
    offset: np.ndarray  # sum over batches of n_b e_b^2, per feature
    square: np.ndarray  # sum of z^2, per feature
    spare: Any = None  # torch: the second d x d buffer the next Gram product accumulates into

    @property
    def count(self) -> int:
        return self.sums.count


class Batch(NamedTuple):
    """One batch's sums; ``s2_total``: its ``s2`` is the window's with the batch's Gram added
    (written into the window's spare buffer), not the batch's own."""

    sums: Sums
    s2_total: bool = False


def measure(w, anchor, xp, window, *, own: bool, fourth: bool, per_feature: bool):
    """``(Batch, pending)``: the sums of ``z = w - anchor`` and, for :func:`screen`, its figures.

    The figures are sent to the host (asynchronously on CUDA) before the Gram product is
    queued, so waiting for them never waits for that product, which then runs while the host
    decides; ``w`` is centred in place when it is the caller's own copy.
    """
    if is_torch(xp):
        return _measure_torch(w, anchor, window, own, fourth, per_feature)
    if own:
        w -= anchor[..., None, :]
        z = w
    else:
        z = w - anchor[..., None, :]
    sz = xp.sum(z, axis=-2)
    z2 = z * z  # the squares, once: column sums, row sums and the per-feature powers all read them
    q = xp.sum(z2, axis=-2)
    r2 = r4 = s3 = zd3 = zd4 = None
    if fourth:
        r2 = xp.sum(z2, axis=-1)
        r4 = xp.sum(r2 * r2, axis=-1)  # the batch's fourth sum: an overflow shows here
    pending = (xp.concat([sz, q, xp.abs(anchor)] + ([r4[..., None]] if fourth else []), axis=-1), None)
    if fourth:
        s3 = (r2[..., None, :] @ z)[..., 0, :]
    if per_feature:
        zd3, zd4 = xp.sum(z2 * z, axis=-2), xp.sum(z2 * z2, axis=-2)
    return Batch(Sums(z.shape[-2], sz, xp.matrix_transpose(z) @ z, s3, r4, zd3, zd4)), pending


def _measure_torch(w, anchor, window, own, fourth, per_feature):
    """:func:`measure` in torch calls (a dozen launches, no wrapper layers: the host's time per
    batch is what bounds a GPU update), the Gram product accumulated straight into the window's
    spare buffer (``addmm``, no d x d add). The screen's column sums are ``sum`` and a fused
    column norm: on an H200 at 4,096 x 1,536 float64 those took 11 and 18 us where the one-pass
    ``var_mean`` took 97 us (``scripts/moments_gpu_profile.py``, docs/data/h200-2026-11-28)."""
    import torch

    z = w.sub_(anchor.unsqueeze(-2)) if own else w - anchor.unsqueeze(-2)
    n = z.shape[-2]
    sz = z.sum(-2)
    q = torch.linalg.vector_norm(z, dim=-2).square_()
    r2 = r4 = s3 = zd3 = zd4 = None
    parts = [sz, q, anchor.abs()]
    if fourth:
        r2 = torch.linalg.vector_norm(z, dim=-1).square_()
        r4 = torch.linalg.vecdot(r2, r2)  # the batch's fourth sum: an overflow shows here
        parts.append(r4.unsqueeze(-1))
    pending = _to_host_async(torch.cat(parts, dim=-1))
    if fourth:
        s3 = (r2.unsqueeze(-2) @ z).squeeze(-2)
    if per_feature:
        z2 = z * z
        zd3, zd4 = (z2 * z).sum(-2), (z2 * z2).sum(-2)
    zt = z.mT
    if window is None:
        return Batch(Sums(n, sz, zt @ z, s3, r4, zd3, zd4)), pending
    spare = window.spare
    if spare is None or _refuses_in_place(spare):
        spare = torch.empty_like(window.sums.s2)
    if z.ndim == 2:
        torch.addmm(window.sums.s2, zt, z, out=spare)
    else:
        torch.baddbmm(window.sums.s2.flatten(0, -3), zt.flatten(0, -3), z.flatten(0, -3),
                      out=spare.flatten(0, -3))
    return Batch(Sums(n, sz, spare, s3, r4, zd3, zd4), s2_total=True), pending


def screen(pending, n: int, d: int, window):
    """``(verdict, figures)``: ``"ok"``, ``"drift"`` (merge this batch exactly) or ``"nonfinite"``.

    ``"ok"`` while, per feature, the window's ``sum n_b e_b^2`` stays within ``tau`` times its
    rows' spread about their batch means, ``sum (z^2) - sum n_b e_b^2``: the bound the fold needs.
    """
    host = _host_values(pending)
    sz, square, c = host[..., :d], host[..., d:2 * d], host[..., 2 * d:3 * d]  # sum z, sum z^2, |anchor|
    if not (np.isfinite(sz).all() and np.isfinite(c).all() and np.isfinite(host[..., 3 * d:]).all()):
        return "nonfinite", None  # NaN / Inf in x, or (order 4) its fourth sum overflows
    if not np.isfinite(square).all():  # sum z^2 about the anchor overflows: the exact path decides
        return "drift", None
    offset = sz * sz / n
    rows = n
    if window is not None:
        offset, square, rows = offset + window.offset, square + window.square, rows + window.count
    eps = 2.0 ** -52 if host.dtype == np.float64 else 2.0 ** -23
    with np.errstate(over="ignore"):  # finite figures whose squares overflow: a drift, merged exactly
        ok = ((1.0 + DRIFT) * offset <= DRIFT * square + rows * (_ROUNDING * eps * c) ** 2).all()
    return ("ok" if ok else "drift"), (offset, square)


def add(window, anchor, batch: Batch, figures, xp) -> Window:
    """The window with ``batch`` added (a window of it alone about ``anchor`` when ``window`` is None)."""
    b = batch.sums
    if window is None:
        nan = _nan_sums(b.s2, xp)  # NaN for the sums not kept, once per window
        kept = (nan[i] if a is None else a for i, a in enumerate(b[3:]))
        return Window(anchor, Sums(b.count, b.s1, b.s2, *kept), *figures)
    w = window.sums

    def plus(a, bb):  # the small sums out of place (numpy reduces to scalars, which have no in-place add)
        return a if bb is None else a + bb

    if batch.s2_total:  # torch: the total is in what was the spare buffer, and the old sum becomes it
        s2, spare = b.s2, w.s2
    else:  # numpy / cupy: the window's own d x d array, updated in place
        s2, spare = w.s2, None
        s2 += b.s2
    sums = Sums(w.count + b.count, w.s1 + b.s1, s2, plus(w.s3, b.s3), plus(w.s4, b.s4), plus(w.zd3, b.zd3),
                plus(w.zd4, b.zd4))
    return Window(anchor, sums, *figures, spare)


def _to_host_async(a):
    """``(array, event)``: a torch tensor's copy to the host, asynchronous on CUDA."""
    if a.device.type == "cuda":
        import torch

        host = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
        host.copy_(a, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
    return a, None


def _host_values(pending) -> np.ndarray:
    a, done = pending
    if done is not None:
        done.synchronize()  # waits for the copy, not for work queued after it
        return a.numpy()
    return to_numpy(a)


def _refuses_in_place(a) -> bool:
    """A torch inference tensor outside inference mode: an in-place update (``out=`` too) raises."""
    import torch

    return a.is_inference() and not torch.is_inference_mode_enabled()


def _writable(a, xp):
    """``a``, or a copy where an in-place update is refused (:func:`_refuses_in_place`)."""
    return a.clone() if is_torch(xp) and _refuses_in_place(a) else a


def fold(window: Window, xp, fourth: bool, per_feature: bool):
    """``(count, mean, M2, M3, M4, D3, D4)`` of the window's rows, sums about their mean."""
    w = window.sums
    n = w.count
    delta = w.s1 / n
    sums = (_writable(w.s2, xp), w.s3, w.s4, w.zd3, w.zd4)
    return (n, window.anchor + delta, *_unshift(n, delta, *sums, xp, fourth, per_feature))
