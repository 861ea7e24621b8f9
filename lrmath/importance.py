"""FLAT-LLM's angular layer importance, accumulated over calibration batches."""

from __future__ import annotations

import math

import numpy as np

from ._backend import as_work, device_of, from_numpy, library_name, namespace, to_numpy, work_dtype
from ._moments_state import host_int
from ._validation import check_array, check_finite

__all__ = ["AngularImportance", "angular_importance", "MODES"]

MODES = ("paper", "reference")
FORMAT_VERSION = 1
_STATE_KEYS = ("format_version", "mode", "tokens", "cos_sum", "defined", "angle_sum")


def _check_pair(x_in, x_out):
    check_array("x_in", x_in, min_ndim=1)
    check_array("x_out", x_out, min_ndim=1)
    xp = namespace(x_in, x_out)  # a TypeError naming both libraries if they differ
    if tuple(x_in.shape) != tuple(x_out.shape):
        raise ValueError(f"x_in and x_out must have the same shape, got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
    if x_in.shape[-1] == 0:
        raise ValueError("x_in has an empty hidden dimension")
    return xp  # finiteness: from the per-token norms in update (no separate pass over the entries)


def _token_sums(x_in, x_out, xp):
    """Per-batch sums: cosines of defined tokens, their count, reference angles, token count, and
    whether every token norm is finite (a NaN or Inf entry makes its token's norm NaN or Inf)."""
    a = as_work(x_in, xp)
    b = as_work(x_out, xp)
    one = xp.ones((), dtype=a.dtype, device=device_of(a))
    if a.dtype == xp.float64 and x_in.dtype != xp.float64 and x_out.dtype != xp.float64:
        # float32 / 16 / bfloat16 entries squared and summed in float64 can neither overflow
        # (3.4e38^2 * d << 1.8e308) nor underflow (1.4e-45^2 >> 2.2e-308): no scaling pass
        na, nb = xp.linalg.vector_norm(a, axis=-1), xp.linalg.vector_norm(b, axis=-1)
        defined = (na > 0) & (nb > 0)
    else:
        # scale each token by its max-abs entry first: no overflow or underflow in the norms
        sa = xp.max(xp.abs(a), axis=-1, keepdims=True)
        sb = xp.max(xp.abs(b), axis=-1, keepdims=True)
        defined = (sa[..., 0] > 0) & (sb[..., 0] > 0)
        a = a / xp.where(sa > 0, sa, one)
        b = b / xp.where(sb > 0, sb, one)
        na, nb = xp.linalg.vector_norm(a, axis=-1), xp.linalg.vector_norm(b, axis=-1)
    finite = bool(xp.all(xp.isfinite(na))) and bool(xp.all(xp.isfinite(nb)))
    norms = na * nb
    cos = xp.vecdot(a, b, axis=-1) / xp.where(defined, norms, one)
    cos = xp.clip(cos, min=-1.0, max=1.0)  # rounding can leave |cos| a few ulps above 1
    zero = xp.zeros((), dtype=a.dtype, device=device_of(a))
    cos_sum = xp.sum(xp.where(defined, cos, zero))
    n_defined = xp.sum(xp.astype(defined, a.dtype))
    # the public reference code: NaN (zero norm) -> 0.5, clamp to [0, 1], then the angle per token
    ref_cos = xp.clip(xp.where(defined, cos, 0.5 * one), min=0.0, max=1.0)
    angle_sum = xp.sum(xp.acos(ref_cos)) / math.pi
    return cos_sum, n_defined, angle_sum, math.prod(cos.shape), finite


class AngularImportance:
    r"""Streaming accumulator of FLAT-LLM's layer importance for one decoder layer.

    Feed it the layer's input and output hidden states batch by batch with
    :meth:`update`, combine accumulators from different workers with
    :meth:`merge`, and read :meth:`value` (or :attr:`importance`).

    Parameters
    ----------
    mode : {"paper", "reference"}
        Which definition :attr:`importance` reports (both are accumulated):

        ``"paper"`` (default), FLAT-LLM Eq. 7: the mean cosine first, then the
        angle, :math:`t_l = \arccos(\bar c_l)/\pi` with
        :math:`\bar c_l = \operatorname{mean}_p \cos(x_{\mathrm{in},p}, x_{\mathrm{out},p})`
        over the tokens where both vectors are non-zero. Tokens with a zero
        vector have no angle and are left out of the mean (padding tokens of
        zeros then do not bias the score); when no token has one, the
        importance is undefined and :meth:`value` raises.

        ``"reference"``: what the authors' public code computes: per token
        cosine, a zero-norm token's NaN replaced by 0.5, clamped to
        :math:`[0, 1]`, the angle :math:`\arccos(c_p)/\pi` per token, then the
        mean of the angles over all tokens. Clamping maps opposite vectors to
        0.5 instead of 1, and since :math:`\arccos` is concave on
        :math:`[0, 1]`, the mean of angles is at most the angle of the mean.

    Attributes
    ----------
    tokens : int
        Tokens seen.

    Notes
    -----
    FLAT-LLM (Tian et al., 2025), Section 4.2, Eq. 7. Both modes lie in
    :math:`[0, 1]` and are invariant to positive scaling of either hidden state
    (per token, too). The running sums are 0-d float64 arrays on the device of
    the first batch, so :meth:`update` never synchronises with the device for
    the result (only the finiteness check reads a flag).

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> rng = np.random.default_rng(0)
    >>> acc = lrmath.AngularImportance()
    >>> for _ in range(3):
    ...     x = rng.standard_normal((2, 16, 8))
    ...     _ = acc.update(x, x + 0.1 * rng.standard_normal(x.shape))
    >>> 0.0 < float(acc.importance) < 0.1
    True
    """

    def __init__(self, mode: str = "paper"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.tokens = 0
        self._cos_sum = None
        self._defined = None
        self._angle_sum = None
        self._where = None  # (library, device name, namespace, device) of the first batch

    def update(self, x_in, x_out) -> "AngularImportance":
        """Add a batch of hidden states of shape (..., tokens, hidden); returns ``self``.

        Any leading dimensions are batch dimensions; the inputs are not modified.
        """
        xp = _check_pair(x_in, x_out)
        where = (library_name(x_in), str(device_of(x_in)), xp, device_of(x_in))
        self._check_where(where)
        if math.prod(x_in.shape[:-1]) == 0:
            return self
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: the error below says so
            cos_sum, n_defined, angle_sum, n, finite = _token_sums(x_in, x_out, xp)
        if not finite:
            check_finite("x_in", x_in, xp)  # names NaN / Inf precisely
            check_finite("x_out", x_out, xp)
            raise ValueError("x_in or x_out has a token whose norm is not finite")
        self._add(where, cos_sum, n_defined, angle_sum, n)
        return self

    def _check_where(self, where) -> None:
        if self._where is not None and where[:2] != self._where[:2]:
            raise TypeError(f"this accumulator holds {self._where[0]} sums on {self._where[1]}; "
                            f"got {where[0]} data on {where[1]}: use one library and device")

    def _add(self, where, cos_sum, n_defined, angle_sum, n: int) -> None:
        if self._cos_sum is None:
            self._where = where
            self._cos_sum, self._defined, self._angle_sum = cos_sum, n_defined, angle_sum
        else:
            self._cos_sum = self._cos_sum + cos_sum
            self._defined = self._defined + n_defined
            self._angle_sum = self._angle_sum + angle_sum
        self.tokens += n

    def merge(self, other: "AngularImportance") -> "AngularImportance":
        """Add another accumulator's tokens to this one (``other`` is unchanged); returns ``self``."""
        if not isinstance(other, AngularImportance):
            raise TypeError(f"other must be an AngularImportance, got {type(other).__name__}")
        if other._cos_sum is not None:
            self._check_where(other._where)
            self._add(other._where, other._cos_sum, other._defined, other._angle_sum, other.tokens)
        return self

    def value(self, mode: str | None = None):
        """The importance in ``mode`` (default: the accumulator's), a 0-d float64 array in [0, 1]."""
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self._cos_sum is None or self.tokens == 0:
            raise ValueError("no tokens accumulated: the importance is undefined")
        xp, device = self._where[2], self._where[3]
        if mode == "reference":
            out = self._angle_sum / self.tokens
        else:
            if not float(self._defined) > 0:
                raise ValueError("every token had a zero hidden state: the angle is undefined (mode='paper')")
            mean_cos = xp.clip(xp.asarray(self._cos_sum / self._defined), min=-1.0, max=1.0)
            out = xp.acos(mean_cos) / math.pi
        # numpy reductions give scalars: return a 0-d array of the input's library
        return xp.asarray(out, device=device)

    @property
    def importance(self):
        """:meth:`value` in the accumulator's mode."""
        return self.value()

    @property
    def skipped(self) -> int:
        """Tokens left out of the paper-mode mean because a hidden state was zero."""
        return 0 if self._defined is None else self.tokens - int(round(float(self._defined)))

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """The running sums as host numpy values (``np.savez``-ready).

        Keys: ``format_version``, ``mode`` (str), ``tokens`` (int), and three
        float64 0-d arrays: ``cos_sum`` (sum of the cosines of the tokens that
        have an angle), ``defined`` (how many tokens have one) and
        ``angle_sum`` (sum of the reference-mode angles over pi). An empty
        accumulator gives zeros. Adding the sums and ``tokens`` of two dicts is
        :meth:`merge`; :meth:`from_dict` rebuilds the accumulator.
        """
        sums = (self._cos_sum, self._defined, self._angle_sum)
        out = {"format_version": FORMAT_VERSION, "mode": self.mode, "tokens": int(self.tokens)}
        for key, value in zip(("cos_sum", "defined", "angle_sum"), sums):
            out[key] = np.zeros((), dtype=np.float64) if value is None else \
                np.asarray(to_numpy(value), dtype=np.float64).reshape(())
        return out

    @classmethod
    def from_dict(cls, state, *, like=None) -> "AngularImportance":
        """Rebuild from :meth:`to_dict` output (values may be numpy arrays after a save/load round trip).

        Parameters
        ----------
        state : mapping
            What :meth:`to_dict` returned.
        like : array, optional
            Hold the sums on this array's library and device (default numpy),
            e.g. to merge them into an accumulator fed by torch CUDA tensors.

        Raises
        ------
        ValueError
            A key is missing, the format version or mode is unknown, ``tokens``
            is not a non-negative integer, a sum is not a finite scalar, or
            ``defined`` is not in ``[0, tokens]``.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing}")
        version = host_int("state['format_version']", state["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"state['format_version'] = {version}: this lrmath reads version {FORMAT_VERSION}")
        out = cls(str(np.asarray(state["mode"])))
        tokens = host_int("state['tokens']", state["tokens"])
        if tokens < 0:
            raise ValueError(f"state['tokens'] must be >= 0, got {tokens}")
        sums = []
        for key in ("cos_sum", "defined", "angle_sum"):
            a = np.asarray(to_numpy(state[key]), dtype=np.float64)
            if a.size != 1:
                raise ValueError(f"state[{key!r}] must be a scalar, got shape {a.shape}")
            check_finite(f"state[{key!r}]", a)
            sums.append(a.reshape(()).copy())
        if not 0.0 <= float(sums[1]) <= tokens:
            raise ValueError(f"state['defined'] must lie in [0, tokens = {tokens}], got {float(sums[1])}")
        if tokens == 0:
            return out
        if like is None:
            like = sums[0]
        else:
            check_array("like", like)
            dtype = work_dtype(namespace(like), device_of(like))
            sums = [from_numpy(a, like, dtype=dtype) for a in sums]
        where = (library_name(like), str(device_of(like)), namespace(like), device_of(like))
        out._add(where, *sums, tokens)
        return out


def angular_importance(x_in, x_out, *, mode: str = "paper"):
    r"""FLAT-LLM layer importance :math:`t_l = \arccos(\operatorname{mean}_p \cos(x_{\mathrm{in},p}, x_{\mathrm{out},p}))/\pi`.

    Parameters
    ----------
    x_in, x_out : array, shape (..., tokens, hidden)
        Input and output hidden states of one decoder layer (same shape; any
        leading batch dimensions; numpy, torch or cupy).
    mode : {"paper", "reference"}
        ``"paper"``: arccos of the mean cosine (Eq. 7), zero-norm tokens left
        out. ``"reference"``: mean of per-token clamped angles, as the public
        code. See :class:`AngularImportance`.

    Returns
    -------
    array, shape ()
        The importance in [0, 1], float64 on the library and device of ``x_in``.

    Raises
    ------
    ValueError
        Shapes differ, NaN/Inf in the inputs, no token given, or (paper mode)
        every token has a zero hidden state.

    Notes
    -----
    FLAT-LLM (Tian et al., 2025), Section 4.2. One-shot form of
    :class:`AngularImportance`; use the accumulator for calibration sets that
    do not fit in memory: the result is the same.

    Examples
    --------
    >>> import numpy as np, lrmath
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> float(lrmath.angular_importance(x, x)), float(lrmath.angular_importance(x, x[:, ::-1]))
    (0.0, 0.5)
    """
    return AngularImportance(mode).update(x_in, x_out).importance
