"""The serialised form of :class:`lrmath.Moments`: keys, shapes, and the checks on reading one back."""

from __future__ import annotations

import math

import numpy as np

from ._backend import to_numpy
from ._validation import check_finite

FORMAT_VERSION = 2  # 2 added d3 / d4, the per-feature sums
ARRAY_KEYS = ("mean", "m2", "m3", "m4", "d3", "d4")  # the order of Moments._state
HEADER_KEYS = ("format_version", "dim", "batch_shape", "count")


def kept_keys(per_feature: bool, order: int) -> tuple[str, ...]:
    """Array keys a state keeps: ``m3``, ``m4`` only at order 4, ``d3``, ``d4`` only with ``per_feature`` too."""
    higher = ("m3", "m4") if order == 4 else ()
    diagonal = ("d3", "d4") if order == 4 and per_feature else ()
    return ("mean", "m2") + higher + diagonal


def state_shapes(batch_shape: tuple[int, ...], dim: int, per_feature: bool = True,
                 order: int = 4) -> dict[str, tuple[int, ...]]:
    """Shape of each array of a :meth:`Moments.to_dict` state, in the order the state keeps them."""
    vec, mat = batch_shape + (dim,), batch_shape + (dim, dim)
    shapes = dict(zip(ARRAY_KEYS, (vec, mat, vec, batch_shape, vec, vec)))
    return {k: shapes[k] for k in kept_keys(per_feature, order)}


def zero_state(xp, batch_shape, dim, dtype, device) -> tuple:
    """All six sums, zero (the ones a state does not keep are carried and never read)."""
    return tuple(xp.zeros(shape, dtype=dtype, device=device) for shape in state_shapes(batch_shape, dim).values())


def host_int(name, value) -> int:
    """``value`` (an int, or a 0-d / 1-element array after a save and load) as a Python int."""
    a = np.asarray(value)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.integer) or
                           (np.issubdtype(a.dtype, np.floating) and float(a) == math.floor(float(a)))):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(a.reshape(()))


def write_state(count: int, sums, batch_shape, dim: int, per_feature: bool, order: int) -> dict:
    """The :meth:`Moments.to_dict` mapping of ``sums`` (the six arrays in :data:`ARRAY_KEYS` order, or None)."""
    if sums is None:
        arrays = zero_state(np, batch_shape, dim, np.float64, "cpu")
    else:
        arrays = tuple(np.asarray(to_numpy(a), dtype=np.float64) for a in sums)
    out = {"format_version": FORMAT_VERSION, "dim": dim,
           "batch_shape": np.asarray(batch_shape, dtype=np.int64), "count": count}
    kept = kept_keys(per_feature, order)
    out.update((k, a.copy()) for k, a in zip(ARRAY_KEYS, arrays) if k in kept)
    return out


def read_state(state) -> tuple[dict, int, tuple]:
    """Check a :meth:`Moments.to_dict` mapping and take it apart.

    Returns ``(settings, count, sums)``: the ``Moments`` constructor's
    arguments (``dim``, ``batch_shape``, ``per_feature``, ``order``), the row
    count, and the six float64 host arrays in :data:`ARRAY_KEYS` order, NaN
    where the state does not keep them (so that what needs them refuses).
    """
    if "format_version" not in state:
        raise ValueError("state is missing the keys ['format_version']")
    version = host_int("state['format_version']", state["format_version"])
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"state['format_version'] = {version}: this lrmath reads versions 1 and {FORMAT_VERSION}")
    # version 1 had no per-feature sums; a version-2 state has them unless saved without (per_feature),
    # and the third and fourth sums unless saved with order=2
    per_feature = version == FORMAT_VERSION and ("d3" in state or "d4" in state)
    order = 2 if version == FORMAT_VERSION and not per_feature and "m3" not in state and "m4" not in state else 4
    keys = HEADER_KEYS + kept_keys(per_feature, order)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state is missing the keys {missing}")
    shape = tuple(int(s) for s in np.asarray(state["batch_shape"]).reshape(-1))
    dim = host_int("state['dim']", state["dim"])
    count = host_int("state['count']", state["count"])
    if count < 0:
        raise ValueError(f"state['count'] must be >= 0, got {count}")
    arrays = []
    for key, want in state_shapes(shape, dim).items():
        if key not in keys:
            arrays.append(np.full(want, np.nan))
            continue
        a = np.asarray(to_numpy(state[key]), dtype=np.float64)
        if a.shape != want:
            raise ValueError(f"state[{key!r}] must have shape {want}, got {a.shape}")
        check_finite(f"state[{key!r}]", a)
        arrays.append(a.copy())
    settings = {"dim": dim, "batch_shape": shape, "per_feature": per_feature, "order": order}
    return settings, count, tuple(arrays)
