"""Streaming first to fourth moments of a stream of row vectors (Chan et al. pairwise update)."""

from __future__ import annotations

import contextlib
import operator
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import to_device

from ._backend import add_outer, as_work, device_of, from_numpy, is_torch, namespace, work_dtype
from ._moments_state import FORMAT_VERSION, read_state, state_shapes, write_state, zero_state
from . import _moments_window as window
from ._power_sums import _centred_sums, _merge, _on_host, _shift, _shift_diag
from ._validation import check_array, check_finite, check_int

__all__ = ["FORMAT_VERSION", "Moments", "PowerSums", "state_shapes"]


def _no_grad(xp):
    """Statistics carry no gradient (and an in-place update refuses tensors that require one)."""
    if is_torch(xp):
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


class PowerSums(NamedTuple):
    r"""Power sums of ``z_k = x_k - c`` about a point ``c`` (see :meth:`Moments.sums`).

    Attributes
    ----------
    count : int
        Number of rows ``n``.
    first : array, shape (..., dim)
        :math:`\sum_k z_k` (zero about the mean).
    second : array, shape (..., dim, dim)
        :math:`\sum_k z_k z_k^\top`.
    third : array, shape (..., dim)
        :math:`\sum_k \|z_k\|^2 z_k` (NaN when the :class:`Moments` has
        ``order=2``).
    fourth : array, shape (...)
        :math:`\sum_k \|z_k\|^4` (likewise).
    third_diag : array, shape (..., dim)
        :math:`\sum_k z_k^{\circ 3}` (entrywise cubes; NaN unless the
        :class:`Moments` keeps them, ``per_feature=True``).
    fourth_diag : array, shape (..., dim)
        :math:`\sum_k z_k^{\circ 4}` (entrywise fourth powers; likewise).
    """

    count: int
    first: Any
    second: Any
    third: Any
    fourth: Any
    third_diag: Any
    fourth_diag: Any


class Moments:
    r"""Float64 streaming accumulator of the mean and centred power sums of row vectors.

    Parameters
    ----------
    dim : int
        Length ``d`` of each row vector (>= 1).
    batch_shape : tuple of int, optional
        Leading dimensions of independent streams, e.g. ``(heads,)`` for
        per-head statistics; every update is ``(*batch_shape, n, dim)``.
    device : optional
        Device of the accumulator (e.g. ``torch.device("cpu")`` to keep the
        statistics of a GPU model on the host). Default: the device of the
        first update. The array library is always that of the first update.
    per_feature : bool, optional
        Also keep the entrywise sums :math:`D_3, D_4`, which
        ``ledoit_wolf(..., target="diagonal")`` needs. Off by default: they
        cost 5-12 % of an update at d = 576 .. 1536 (float64, one thread; the
        O(n d^2) Gram product is the rest).
    order : {4, 2}, optional
        Highest power kept. 4 (default): the sums Ledoit-Wolf needs as well.
        2: only the count, the mean and :math:`M_2` (what a whitening, a PCA
        or OAS needs); the third and fourth sums are not computed, which saves
        about a quarter of an update of 4,096 float32 rows at d = 576 and a
        tenth at d = 1536 (one thread), and :func:`lrmath.ledoit_wolf` refuses
        the statistics. ``per_feature`` needs ``order=4``.

    Notes
    -----
    Kept per stream: ``count`` :math:`n`, the mean :math:`m`, and the sums
    about the current mean, :math:`M_2 = \sum y y^\top`,
    :math:`M_3 = \sum \|y\|^2 y`, :math:`M_4 = \sum \|y\|^4` with
    :math:`y = x - m` (the last two are what a real Ledoit-Wolf needs; not kept with
    ``order=2``), and,
    with ``per_feature``, the entrywise :math:`D_3 = \sum y^{\circ 3}`,
    :math:`D_4 = \sum y^{\circ 4}` (what its diagonal target needs).
    Each batch's sums are computed in float64 by two passes over the batch
    and merged with the pairwise update of Chan, Golub & LeVeque
    ("Updating formulae and a pairwise algorithm for computing sample
    variances", 1979), generalised to the third and fourth sums by
    :func:`_shift`. Nothing ever subtracts :math:`n m m^\top` from an
    uncentred sum, so the covariance keeps its accuracy when the mean is
    many times the spread. Statistics are float64 (float32 on devices
    without float64) on the accumulator's library and device.

    On a GPU, where a merge costs a hundred kernel launches, consecutive
    batches are instead summed about one anchor (the first one's mean) and
    folded back by the exact inverse shift when the statistics are first
    read (``lrmath._moments_window``). A batch whose mean lies further
    from the anchor than its own spread, per feature, is merged exactly
    instead, so the fold's subtraction loses at most one bit.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> X = 1000.0 + np.random.default_rng(0).standard_normal((300, 4))
    >>> acc = lrmath.Moments(4)
    >>> for part in np.array_split(X, 7):
    ...     _ = acc.update(part)
    >>> bool(np.allclose(acc.covariance(), np.cov(X.T, bias=True), rtol=1e-12, atol=0))
    True
    """

    def __init__(self, dim: int, *, batch_shape: tuple[int, ...] = (), device=None, per_feature: bool = False,
                 order: int = 4):
        self.dim = check_int("dim", dim, 1)
        try:
            shape = tuple(operator.index(s) for s in batch_shape)
        except TypeError:
            raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}") from None
        if any(s < 0 for s in shape):
            raise ValueError(f"batch_shape must hold non-negative sizes, got {shape}")
        self.batch_shape = shape
        self.device = device
        if isinstance(order, bool) or order not in (2, 4):
            raise ValueError(f"order must be 2 or 4, got {order!r}")
        if order == 2 and per_feature:
            raise ValueError("per_feature=True needs order=4: the per-feature sums are third and fourth powers")
        self.per_feature = bool(per_feature)
        self.order = int(order)
        self._count = 0  # rows seen, the window's included
        self._state = None  # (mean, m2, m3, m4, d3, d4) once the library is known

    # ------------------------------------------------------------ accumulation
    def update(self, x, *, gram_dtype=None) -> "Moments":
        """Add the rows of ``x`` (``(*batch_shape, n, dim)``, any real dtype); returns ``self``.

        ``x`` is not modified. An empty batch (``n = 0``) only fixes the library.
        ``gram_dtype`` (e.g. ``torch.float32``) runs only this batch's centred
        Gram product in that precision, about twice as fast on CPUs; the mean,
        the centring and every merge stay in float64, so the error is that of
        one float32 product of centred rows (relative ~ n * 2^-24), not of an
        uncentred running sum. When ``x`` already has that dtype (float32
        activations), the batch is centred about its rounded float64 mean and
        all its sums run in that dtype without a float64 copy; the third and
        fourth sums then carry the same relative rounding as the Gram, and the
        mean is still the float64 mean of the float32 values.

        Raises
        ------
        ValueError
            If ``x`` has the wrong shape or holds NaN/Inf.
        TypeError
            If ``x`` comes from another array library than earlier updates.
        """
        xp = check_array("x", x, min_ndim=2)
        expected = self.batch_shape + (self.dim,)
        if tuple(x.shape[:-2]) + tuple(x.shape[-1:]) != expected:
            raise ValueError(
                f"x must have shape (*batch_shape, n, dim) = {self.batch_shape + ('n', self.dim)}, "
                f"got {tuple(x.shape)}"
            )
        if self._central is not None:
            xp = namespace(self._central[0], x)  # TypeError on mixed libraries (no fold: _central, not _state)
        self._allocate(xp, x)
        n = int(x.shape[-2])
        if n == 0:
            return self
        if gram_dtype is None and not _on_host(x, xp) and str(device_of(x)) == str(self.device):
            if self._update_window(x, xp, n):
                return self
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: the error below says so
            part = _centred_sums(x, xp, gram_dtype, self.per_feature, self.order == 4)
        # a NaN or Inf in x makes the mean (and M4, or the diagonal of M2) non-finite: checking the
        # small sums instead of every entry of x saves a full pass over the batch (a tenth of the
        # statistics' cost)
        spread = part[3] if self.order == 4 else xp.linalg.diagonal(part[1])
        if not bool(xp.all(xp.isfinite(part[0])) & xp.all(xp.isfinite(spread))):
            self._raise_nonfinite(x, xp)
        part = tuple(self._to_home(a) for a in part)
        self._absorb(n, part, xp)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Add the statistics of ``other`` (exact pairwise merge, order-independent); returns ``self``.

        ``other`` is not modified; it must have the same ``dim`` and ``batch_shape``.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if (other.dim, other.batch_shape) != (self.dim, self.batch_shape):
            raise ValueError(
                f"other has dim {other.dim} and batch_shape {other.batch_shape}, "
                f"expected {self.dim} and {self.batch_shape}"
            )
        if other._state is None:
            return self
        # the merge has the per-feature (or fourth) sums only if every part with data has them
        self.per_feature = other.per_feature if self._count == 0 else (self.per_feature and other.per_feature)
        self.order = other.order if self._count == 0 else min(self.order, other.order)
        xp = namespace(other._state[0]) if self._state is None else namespace(self._state[0], other._state[0])
        self._allocate(xp, other._state[0])
        if other._count:
            self._absorb(other._count, tuple(self._to_home(a) for a in other._state), xp)
        return self

    def copy(self) -> "Moments":
        """An independent copy."""
        out = Moments(self.dim, batch_shape=self.batch_shape, device=self.device, per_feature=self.per_feature,
                      order=self.order)
        out._count = self._count
        if self._state is not None:
            xp = namespace(self._state[0])
            out._state = tuple(xp.asarray(a, copy=True) for a in self._state)
        return out

    # -------------------------------------------------------------- statistics
    @property
    def count(self) -> int:
        """Number of rows seen (the same for every stream of the batch)."""
        return self._count

    @property
    def mean(self):
        """Mean row, shape ``(*batch_shape, dim)``."""
        self._require_data("mean")
        return namespace(self._state[0]).asarray(self._state[0], copy=True)

    @property
    def gram(self):
        r"""Uncentred sum :math:`\sum_k x_k x_k^\top = M_2 + n m m^\top`, shape ``(*batch_shape, dim, dim)``."""
        if self._state is None:
            raise ValueError("Moments has seen no data yet, so its array library is unknown")
        mean, m2 = self._state[:2]
        xp = namespace(mean)
        return add_outer(xp.asarray(m2, copy=True), mean, self._count, xp)  # sums(about="origin").second

    def second_moment(self):
        r"""Uncentred second moment :math:`\frac1n \sum_k x_k x_k^\top`."""
        self._require_data("second_moment()")
        return self.gram / self._count

    def covariance(self):
        r"""Centred, biased covariance :math:`\frac1n \sum_k (x_k - m)(x_k - m)^\top`."""
        self._require_data("covariance()")
        return self._state[1] / self._count

    def sums(self, about="mean") -> PowerSums:
        """Power sums about the mean (``"mean"``), the origin (``"origin"``) or a point.

        Parameters
        ----------
        about : {"mean", "origin"} or array of shape ``(*batch_shape, dim)``
            The point ``c`` the rows are measured from: ``z_k = x_k - c``.
            ``"origin"`` gives the uncentred sums (``assume_centered``
            estimators use them).

        Returns
        -------
        PowerSums
            Obtained from the centred sums by the exact shift of :func:`_shift`.
        """
        if self._state is None:
            raise ValueError("Moments has seen no data yet, so its array library is unknown")
        mean, m2, m3, m4, d3, d4 = self._state
        xp = namespace(mean)
        if isinstance(about, str):
            if about not in ("mean", "origin"):
                raise ValueError(f"about must be 'mean', 'origin' or an array, got {about!r}")
            if about == "mean":
                copies = (xp.asarray(a, copy=True) for a in (m2, m3, m4, d3, d4))
                return PowerSums(self._count, xp.zeros_like(mean), *copies)
            d = mean
        else:
            check_array("about", about)
            xp = namespace(mean, about)
            if tuple(about.shape) != tuple(mean.shape):
                raise ValueError(f"about must have shape {tuple(mean.shape)}, got {tuple(about.shape)}")
            check_finite("about", about, xp)
            d = mean - self._to_home(as_work(about, xp))
        second = m2 + self._count * (d[..., :, None] * d[..., None, :])
        return PowerSums(self._count, self._count * d, second, *_shift(self._count, m2, m3, m4, d, xp),
                         *_shift_diag(self._count, m2, d3, d4, d, xp))

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """Statistics as host numpy arrays and ints (``np.savez``-ready; for safetensors map
        every value through ``np.asarray``).

        Keys: ``format_version``, ``dim``, ``batch_shape`` (int64 array), ``count``,
        ``mean``, ``m2``, ``m3`` and ``m4`` (unless ``order=2``), and ``d3``, ``d4`` when kept (``per_feature``),
        the sums about the mean, float64 (shapes: :func:`state_shapes`).
        """
        return write_state(self._count, self._state, self.batch_shape, self.dim, self.per_feature, self.order)

    @classmethod
    def from_dict(cls, state, *, like=None) -> "Moments":
        """Rebuild from :meth:`to_dict` output (values may be 0-d/1-d numpy arrays after loading).

        Parameters
        ----------
        state : mapping
            What :meth:`to_dict` returned, possibly after a save/load round trip.
        like : array, optional
            Put the statistics on this array's library and device (default numpy),
            e.g. to merge them into an accumulator fed by torch CUDA tensors.
        """
        settings, count, arrays = read_state(state)
        out = cls(**settings)
        out._count = count
        if like is None:
            out._state = tuple(arrays)
            out.device = device_of(arrays[0])
        else:
            xp = namespace(like)
            dt = work_dtype(xp, device_of(like))
            out.device = device_of(like)
            out._state = tuple(from_numpy(a, like, xp, dtype=dt) for a in arrays)
        return out

    def __repr__(self) -> str:
        lib = "unset" if self._central is None else type(self._central[0]).__module__.split(".")[0]
        kept = f"order={self.order}" + (", per_feature=True" if self.per_feature else "")
        return (f"Moments(dim={self.dim}, batch_shape={self.batch_shape}, {kept}, count={self._count}, "
                f"library={lib})")

    # ----------------------------------------------------------------- private
    def _allocate(self, xp, like):
        if self._central is not None:
            return
        if self.device is None:
            self.device = device_of(like)
        dt = work_dtype(xp, self.device)
        self._state = zero_state(xp, self.batch_shape, self.dim, dt, self.device)

    def _to_home(self, a):
        """Move an array onto the accumulator's device (a no-op where it already is)."""
        return a if str(device_of(a)) == str(self.device) else to_device(a, self.device)

    @property
    def _state(self):
        """The sums about the mean; a pending window of device batches is folded in first."""
        if self._window is not None:
            win, self._window = self._window, None
            xp = namespace(win.anchor)
            part = window.fold(win, xp, self.order == 4, self.per_feature)
            self._count -= part[0]
            self._absorb(part[0], part[1:], xp)
        return self._central

    @_state.setter
    def _state(self, value):
        self._window = None
        self._central = value

    def _absorb(self, n, part, xp):
        if self._count == 0:
            self._state = part
        else:
            merged = _merge((self._count,) + self._state, (n,) + part, xp, self.per_feature, self.order == 4)
            self._state = merged[1:]
        self._count += n

    def _update_window(self, x, xp, n) -> bool:
        """Add ``x`` to the window of device batches (see :mod:`lrmath._moments_window`); False if it
        is too far from the window's anchor, for the exact pairwise path to take."""
        fourth = self.order == 4
        with _no_grad(xp), np.errstate(invalid="ignore", over="ignore"):
            w = as_work(x, xp)
            win = self._window
            anchor = xp.mean(w, axis=-2) if win is None else win.anchor
            batch, pending = window.measure(w, anchor, xp, win, own=w is not x, fourth=fourth,
                                            per_feature=self.per_feature)
            verdict, figures = window.screen(pending, n, self.dim, win)
            if verdict == "nonfinite":
                self._raise_nonfinite(x, xp)
            if verdict == "drift":
                return False
            self._window = window.add(win, anchor, batch, figures, xp)
        self._count += n
        return True

    def _raise_nonfinite(self, x, xp):
        check_finite("x", x, xp)  # names NaN / Inf in x precisely
        raise ValueError(f"x overflows the float64 power sums (sum of |x - mean|^{self.order} is not finite)")

    def _require_data(self, what):
        if self._count == 0:
            raise ValueError(f"Moments.{what} needs at least one row; count is 0")
