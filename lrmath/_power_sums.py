"""Power sums of one batch of rows and their exact shift / pairwise merge (the kernels of :class:`lrmath.Moments`).

A state is ``(count, mean, M2, M3, M4, D3, D4)`` with the sums taken about the mean:
``M2 = sum y y^T``, ``M3 = sum |y|^2 y``, ``M4 = sum |y|^4``, ``y = x - mean``, and the
per-feature ``D3 = sum y**3``, ``D4 = sum y**4`` (entrywise powers; what a diagonal
shrinkage target needs).
"""

from __future__ import annotations

import numpy as np

from ._backend import add_outer, as_work, device_of, gram, is_torch, sum_rows, work_dtype


def _centred_sums(x, xp, gram_dtype=None, per_feature=True, fourth=True):
    """Mean and centred sums of one batch ``x`` (..., n, dim), two passes in the work dtype.

    With ``gram_dtype`` (e.g. float32) only the O(n d^2) product of the already
    centred rows runs in that precision; it is returned in the work dtype. When
    ``x`` already has that dtype, :func:`_low_precision_sums` avoids the
    float64 copy of the batch. A long batch on the host is centred
    ``_HOST_CHUNK`` rows at a time, each chunk's Gram, norms and third sum
    taken while it is in cache (no n x d centred copy). Without ``per_feature``
    the entrywise sums come back as NaN (not computed); without ``fourth``, so
    do the third and fourth sums (only the mean and ``M2`` are computed).
    """
    work = work_dtype(xp, device_of(x))
    if gram_dtype is not None and x.dtype == gram_dtype and x.dtype != work:
        return _low_precision_sums(x, xp, work, per_feature, fourth)  # before any float64 copy of x is made
    w = as_work(x, xp)
    mean = xp.mean(w, axis=-2)
    n = w.shape[-2]
    if not _on_host(w, xp):
        if w is not x:  # our own copy: centre in place (one n x d allocation fewer)
            w -= mean[..., None, :]
            return (mean, *_sums_of_centred(w, xp, gram_dtype, per_feature, fourth=fourth))
        return (mean, *_sums_of_centred(w - mean[..., None, :], xp, gram_dtype, per_feature, fourth=fourth))
    if w is not x:  # our own copy: centred in place
        return (mean, *_sums_of_centred(w, xp, gram_dtype, per_feature,
                                        _centre_into(w, mean, w, xp, per_feature, fourth)))
    if n <= 2 * _HOST_CHUNK:
        y = xp.empty_like(w)
        return (mean, *_sums_of_centred(y, xp, gram_dtype, per_feature,
                                        _centre_into(w, mean, y, xp, per_feature, fourth)))
    y = None

    def chunk(rows):
        nonlocal y
        part_x = w[..., rows, :]
        if y is None or y.shape != part_x.shape:
            y = xp.empty_like(part_x)  # one buffer for every chunk (a new one for a shorter last chunk)
        return _sums_of_centred(y, xp, gram_dtype, per_feature, _centre_into(part_x, mean, y, xp, per_feature, fourth))

    return (mean, *_sum_blocks(n, _HOST_CHUNK, chunk))


def _sum_blocks(n, size, part):
    """Sum, entry by entry, of the tuples ``part(rows)`` over consecutive row blocks of ``size``, in order."""
    total = None
    for start in range(0, n, size):
        p = part(slice(start, start + size))
        total = p if total is None else tuple(a + b for a, b in zip(total, p))
    return total


def _centre_into(x, mean, out, xp, per_feature, fourth=True):
    """``out = x - mean`` on the host, ``_VECTOR_BLOCK`` rows at a time, with the vector sums of each
    block taken while it is in cache (one pass over the rows fewer than centring, then summing);
    ``out`` may be ``x``. Returns :func:`_vector_sums` of ``out``, summed in the same blocks (the
    same numbers as calling it afterwards; NaN without ``fourth``)."""
    if not fourth:
        _subtract(x, mean[..., None, :], out, xp)
        return _nan_sums(out, xp)

    def block(rows):
        _subtract(x[..., rows, :], mean[..., None, :], out[..., rows, :], xp)
        return _vector_sums_block(out[..., rows, :], xp, per_feature)

    return _sum_blocks(x.shape[-2], _VECTOR_BLOCK, block)


def _subtract(a, b, out, xp) -> None:
    if is_torch(xp):
        import torch

        with torch.no_grad():  # statistics carry no gradient; out= refuses tensors that require one
            torch.sub(a, b, out=out)
    else:
        np.subtract(a, b, out=out)


def _sums_of_centred(y, xp, gram_dtype, per_feature=True, vector=None, fourth=True):
    """``(sum y y^T, sum |y|^2 y, sum |y|^4, sum y**3, sum y**4)`` of rows ``y`` in the work dtype.

    The Gram runs in ``gram_dtype`` when given; ``vector``: the last four, already computed.
    """
    if gram_dtype is None or gram_dtype == y.dtype:
        m2 = gram(y, xp)
    else:
        m2 = xp.astype(gram(xp.astype(y, gram_dtype), xp), y.dtype)
    return (m2, *(vector if vector is not None else _vector_sums(y, xp, per_feature, fourth)))


def _vector_sums(y, xp, per_feature=True, fourth=True):
    """``(sum |y|^2 y, sum |y|^4, sum y**3, sum y**4)`` of rows ``y``: O(n d) work.

    On the host the rows are taken ``_VECTOR_BLOCK`` at a time, so the entrywise
    powers stay in the core's cache (2x faster at 4096 x 576 than whole-batch
    temporaries, measured); without ``per_feature`` the last two are NaN, and
    without ``fourth`` all four are (nothing is computed).
    """
    if not fourth:
        return _nan_sums(y, xp)
    if not _on_host(y, xp):
        return _vector_sums_block(y, xp, per_feature)
    return _sum_blocks(y.shape[-2], _VECTOR_BLOCK, lambda rows: _vector_sums_block(y[..., rows, :], xp, per_feature))


def _vector_sums_block(y, xp, per_feature):
    r2 = xp.vecdot(y, y, axis=-1)  # the same rounding with and without per_feature
    m3, m4 = (r2[..., None, :] @ y)[..., 0, :], xp.vecdot(r2, r2, axis=-1)
    if not per_feature:
        nan = xp.full(y.shape[:-2] + y.shape[-1:], float("nan"), dtype=y.dtype, device=device_of(y))
        return m3, m4, nan, nan
    y2 = y * y
    return m3, m4, _column_dot(y2, y, xp), _column_dot(y2, y2, xp)


def _nan_sums(y, xp):
    """NaN in the shapes of :func:`_vector_sums` of ``y``: the sums a state does not keep."""
    vec, batch = y.shape[:-2] + y.shape[-1:], y.shape[:-2]
    return tuple(xp.full(shape, float("nan"), dtype=y.dtype, device=device_of(y)) for shape in (vec, batch, vec, vec))


def _column_dot(a, b, xp):
    """``sum_k a_ki b_ki`` per column, without an n x d temporary where the library allows."""
    if xp.__name__.endswith("numpy"):
        return np.einsum("...ki,...ki->...i", a, b)
    return (xp.ones_like(a[..., 0])[..., None, :] @ (a * b))[..., 0, :]


def _on_host(x, xp) -> bool:
    if is_torch(xp):
        return x.device.type == "cpu"
    return xp.__name__.endswith("numpy")


_VECTOR_BLOCK = 256  # rows per block of the entrywise powers: 256 x 576 float64 fits a core's L2

# rows of a long host batch centred at a time (4096 x 576 float64 = 19 MB): measured ~10 % faster
# than centring 65,536 rows at once (benchmarks/test_bench_shrinkage.py, one thread)
_HOST_CHUNK = 4096


def _low_precision_sums(x, xp, work, per_feature=True, fourth=True):
    r""":func:`_centred_sums` of a batch already in the low Gram precision (e.g. float32 activations).

    The exact float64 mean ``m`` is rounded to ``c`` in ``x``'s dtype, the rows
    are centred about ``c`` in that dtype (``z = x - c``, each entry rounded
    once, as the float64 path rounds ``y`` before its low-precision Gram), and
    the power sums of ``z`` (``Z_2 = \sum z z^T``, ``R_k = \|z_k\|^2``,
    ``Z_3 = \sum R_k z_k``, ``Z_4 = \sum R_k^2``) run in that dtype. With
    ``\delta = m - c`` the rows ``y = z - \delta`` sum to zero and ``z = y + \delta``,
    so the sums of ``z`` are those of ``y`` shifted by ``\delta`` (:func:`_shift`),
    which inverts exactly: ``M_2 = Z_2 - n \delta\delta^T``, then ``M_3`` and ``M_4``
    by subtracting the shift's terms (``M_4``'s uses ``M_3``).

    No float64 copy of the batch is made (the mean's float64 column sums read
    ``x`` as it is), which removes about half of the statistics' overhead on
    top of the Gram product on CPUs.
    """
    n = x.shape[-2]
    mean = sum_rows(x, xp, work) / n
    c = xp.astype(mean, x.dtype)
    z = x - c[..., None, :]
    delta = mean - xp.astype(c, work)
    z2 = xp.astype(gram(z, xp), work)  # a fresh float64 copy, which _unshift updates in place
    if not fourth:
        return (mean, *_unshift(n, delta, z2, None, None, None, None, xp, fourth=False))
    sums = (xp.astype(a, work) for a in _vector_sums(z, xp, per_feature))
    return (mean, *_unshift(n, delta, z2, *sums, xp, per_feature=per_feature))


def _shift(count, m2, m3, m4, d, xp, m2d=None):
    r"""Third and fourth sums of ``z = y + d`` from the sums of rows ``y`` that sum to zero.

    With :math:`\sum y = 0`, :math:`\|z\|^2 = \|y\|^2 + 2 y^\top d + \|d\|^2` gives

    .. math::
        \sum z z^\top &= M_2 + n\, d d^\top \\
        \sum \|z\|^2 z &= M_3 + 2 M_2 d + (\operatorname{tr} M_2 + n \|d\|^2)\, d \\
        \sum \|z\|^4 &= M_4 + 4 d^\top M_3 + 4 d^\top M_2 d + 2 \|d\|^2 \operatorname{tr} M_2
                        + n \|d\|^4 .

    Only the last two are formed here (matrix-vector work); the second-moment
    part is merged once by :func:`_merge`, so a merge costs one d x d update.
    ``m2d`` (``M_2 d``) may be passed when the caller already has it.
    """
    if m2d is None:
        m2d = (m2 @ d[..., :, None])[..., 0]
    dm2d = xp.sum(d * m2d, axis=-1)
    dd = xp.sum(d * d, axis=-1)
    tr = xp.linalg.trace(m2)
    dm3 = xp.sum(d * m3, axis=-1)
    s3 = m3 + 2.0 * m2d + (tr + count * dd)[..., None] * d
    s4 = m4 + 4.0 * dm3 + 4.0 * dm2d + 2.0 * dd * tr + count * (dd * dd)
    return s3, s4


def _shift_diag(count, m2, d3, d4, d, xp):
    r"""Per-feature third and fourth sums of ``z = y + d`` from those of rows ``y`` that sum to zero.

    Entrywise, with :math:`\sum y = 0` and :math:`v = \operatorname{diag} M_2`:

    .. math::
        \sum z^3 = D_3 + 3 d v + n d^3, \qquad
        \sum z^4 = D_4 + 4 d D_3 + 6 d^2 v + n d^4 .
    """
    v = xp.linalg.diagonal(m2)
    d2 = d * d
    return d3 + 3.0 * d * v + count * (d2 * d), d4 + 4.0 * d * d3 + 6.0 * d2 * v + count * (d2 * d2)


def _unshift(n, delta, z2, z3, z4, zd3, zd4, xp, fourth=True, per_feature=True):
    r"""Sums about the mean from the sums of ``z = y + \delta`` (rows ``y`` summing to zero).

    The inverse of :func:`_shift`: ``M_2 = Z_2 - n \delta\delta^\top``,
    then ``M_3``, ``M_4`` (which uses ``M_3``) and the per-feature sums by subtracting
    the shift's terms. ``z2`` must be the caller's own array (updated in place).
    """
    m2 = add_outer(z2, delta, -n, xp)
    if not fourth:
        return (m2, *_nan_sums(delta[..., None, :], xp))
    m2d = (m2 @ delta[..., :, None])[..., 0]  # the one matrix-vector product both shifts need
    zero3, zero4 = xp.zeros_like(z3), xp.zeros_like(z4)
    m3 = z3 - _shift(n, m2, zero3, zero4, delta, xp, m2d=m2d)[0]
    m4 = z4 - _shift(n, m2, m3, zero4, delta, xp, m2d=m2d)[1]
    if not per_feature:
        nan = _nan_sums(delta[..., None, :], xp)
        return m2, m3, m4, nan[2], nan[3]
    zero = xp.zeros_like(zd3)
    d3 = zd3 - _shift_diag(n, m2, zero, zero, delta, xp)[0]
    d4 = zd4 - _shift_diag(n, m2, d3, zero, delta, xp)[1]
    return m2, m3, m4, d3, d4


def _merge(a, b, xp, per_feature=True, fourth=True):
    """Chan et al.'s pairwise merge of two ``(count, mean, m2, m3, m4, d3, d4)`` states.

    ``M2 = M2_a + M2_b + (n_a n_b / n) g g^T`` with ``g`` the gap between the
    means (the sum of both parts' shifts ``n d d^T``, formed once). Without
    ``per_feature`` the entrywise sums are not kept: ``a``'s are returned as
    they are (a dozen small operations fewer per update, which is most of the
    cost of an update on a GPU, where each is a kernel launch). Without
    ``fourth`` neither are the third and fourth sums: NaN is returned for all four.
    """
    na, nb = a[0], b[0]
    n = na + nb
    gap = b[1] - a[1]
    mean = a[1] + (nb / n) * gap
    m2 = add_outer(a[2] + b[2], gap, na * nb / n, xp)  # one d x d allocation
    if not fourth:
        return (n, mean, m2, *_nan_sums(mean[..., None, :], xp))
    # both parts are shifted to the pooled mean by a small step, never by the mean itself
    da = (-nb / n) * gap
    db = (na / n) * gap
    a3, a4 = _shift(na, *a[2:5], da, xp)
    b3, b4 = _shift(nb, *b[2:5], db, xp)
    if not per_feature:
        return (n, mean, m2, a3 + b3, a4 + b4, a[5], a[6])
    ad3, ad4 = _shift_diag(na, a[2], *a[5:7], da, xp)
    bd3, bd4 = _shift_diag(nb, b[2], *b[5:7], db, xp)
    return (n, mean, m2, a3 + b3, a4 + b4, ad3 + bd3, ad4 + bd4)
