"""Sharded calibration: each process feeds its own batches, statistics are merged exactly.

Every rank of a :mod:`torch.distributed` process group runs
:func:`lrmath_hf.calibrate.calibrate` on its shard of the calibration batches
(:func:`shard_batches`). After each layer, before ``on_layer`` sees the
statistics, :func:`merge_layer_stats` gathers every rank's float64 statistics
on the group's first rank, which combines them in rank order with the exact
pairwise merges of :meth:`lrmath.Moments.merge` (Chan et al.) and
:meth:`lrmath.AngularImportance.merge`, and broadcasts the result. Every rank
then holds bit-identical statistics (even on hosts whose BLAS round
differently), so deterministic decisions and surgery agree on all ranks.

Transport: the statistics travel as one flat float64 tensor per layer, in
chunks of at most :data:`CHUNK` elements, through the CPU whenever the group
has a CPU backend (gloo, MPI, or ``init_process_group()`` without a backend,
which pairs gloo with NCCL), else through the current accelerator (NCCL alone:
``torch.cuda.set_device(local_rank)`` first). Counts travel as int64, so they
stay exact at any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

import lrmath
from lrmath.importance import FORMAT_VERSION as _IMPORTANCE_VERSION
from lrmath.moments import FORMAT_VERSION as _MOMENTS_VERSION
from lrmath.moments import state_shapes

__all__ = ["CHUNK", "Communicator", "resolve_group", "shard_batches", "check_shards", "merge_layer_stats"]

CHUNK = 1 << 24
"""Largest number of float64 elements moved by one collective (128 MiB): bounds the
extra device memory of a merge to ``world_size * CHUNK * 8`` bytes on the root."""

_MOMENTS, _IMPORTANCE = 1, 2
_IMPORTANCE_KEYS = ("cos_sum", "defined", "angle_sum")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Communicator:
    """A process group with what a merge needs: this rank, the size, the root and the transport device.

    Build it with :func:`resolve_group`.
    """

    group: Any
    rank: int
    size: int
    root: int  # global rank of the group's rank 0, which merges
    device: torch.device

    def all_gather_int(self, values: Sequence[int]) -> np.ndarray:
        """Every rank's ``values`` (the same length on all ranks), shape ``(size, len(values))``."""
        mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.stack(parts).cpu().numpy()

    def gather_to_root(self, flat: np.ndarray) -> list[np.ndarray] | None:
        """Every rank's ``flat`` (float64, the same length on all ranks) on the root; ``None`` elsewhere."""
        gathered = [np.empty_like(flat) for _ in range(self.size)] if self.rank == 0 else None
        for start in range(0, flat.size, CHUNK):
            stop = min(start + CHUNK, flat.size)
            part = torch.from_numpy(flat[start:stop]).to(self.device)
            parts = [torch.empty_like(part) for _ in range(self.size)] if self.rank == 0 else None
            dist.gather(part, parts, dst=self.root, group=self.group)
            if gathered is not None:
                for out, got in zip(gathered, parts):
                    out[start:stop] = got.cpu().numpy()
        return gathered

    def broadcast_from_root(self, flat: np.ndarray) -> np.ndarray:
        """The root's ``flat`` on every rank (other ranks pass an array of the same length)."""
        out = np.array(flat, dtype=np.float64, copy=True)
        for start in range(0, out.size, CHUNK):
            stop = min(start + CHUNK, out.size)
            part = torch.from_numpy(out[start:stop]).to(self.device)
            dist.broadcast(part, src=self.root, group=self.group)
            out[start:stop] = part.cpu().numpy()
        return out


def _transport_device(group) -> torch.device:
    """CPU when the group has a CPU backend (gloo, MPI), else the current accelerator (NCCL...)."""
    config = str(dist.get_backend_config(group)).lower()  # e.g. "cpu:gloo,cuda:nccl" or "cuda:nccl"
    devices = {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if "cpu" in devices or not devices:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type not in devices:
        raise RuntimeError(f"the process group's backends ({config}) take only {sorted(devices)} tensors, "
                           f"and this process has no such device")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def resolve_group(process_group=None) -> Communicator | None:
    """The communicator a calibration merges over, or ``None`` to calibrate locally.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, None or False
        ``None``: the default group when :mod:`torch.distributed` is
        initialised with more than one process, else local. A group: that
        group. ``False``: local even when :mod:`torch.distributed` is
        initialised. A group of one process is local (nothing to merge).

    Raises
    ------
    RuntimeError
        A group is passed but :mod:`torch.distributed` is not initialised.
    ValueError
        This process is not a member of the group.
    """
    if process_group is False:
        return None
    if process_group is None:
        if not _initialised() or dist.get_world_size() <= 1:
            return None
        process_group = dist.group.WORLD
    elif not _initialised():
        raise RuntimeError("process_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of process_group")
    size = dist.get_world_size(process_group)
    if size <= 1:
        return None
    return Communicator(process_group, rank, size, dist.get_global_rank(process_group, 0),
                        _transport_device(process_group))


def shard_batches(batches, rank: int | None = None, world_size: int | None = None, *, process_group=None) -> list:
    """This rank's shard of the calibration batches: every ``world_size``-th batch from ``rank`` on.

    Shards differ in size by at most one batch and depend only on the order of
    ``batches``, so every launch splits the data the same way.

    Parameters
    ----------
    batches : iterable
        All calibration batches, in the same order on every rank.
    rank, world_size : int, optional
        Default: this process's rank and the size of ``process_group`` (the
        default group). Given while :mod:`torch.distributed` is initialised,
        they must agree with it.
    process_group : torch.distributed.ProcessGroup, optional
        The group that will merge the statistics.

    Returns
    -------
    list
        ``batches[rank::world_size]``.

    Raises
    ------
    ValueError
        ``rank`` or ``world_size`` out of range, disagreeing with
        :mod:`torch.distributed`, or fewer batches than ranks (every rank
        needs at least one batch).
    """
    batches = list(batches)
    if _initialised():
        actual = (dist.get_rank(process_group), dist.get_world_size(process_group))
        for name, given, have in zip(("rank", "world_size"), (rank, world_size), actual):
            if given is not None and int(given) != have:
                raise ValueError(f"{name}={given} but torch.distributed says {have} for this process")
        rank, world_size = actual
    elif rank is None or world_size is None:
        raise ValueError("pass rank and world_size, or initialise torch.distributed first")
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if len(batches) < world_size:
        raise ValueError(f"{len(batches)} calibration batches cannot be shared by {world_size} ranks: "
                         "every rank needs at least one")
    return batches[rank::world_size]


def check_shards(comm: Communicator, batches: int, tokens: int) -> int:
    """Total calibration tokens over the group; raises on every rank if some rank has no batch."""
    table = comm.all_gather_int([batches, tokens])
    empty = [r for r in range(comm.size) if table[r, 0] == 0]
    if empty:
        raise ValueError(f"ranks {empty} of {comm.size} have no calibration batches: every rank needs "
                         "at least one (see lrmath_hf.distributed.shard_batches)")
    return int(table[:, 1].sum())


def _entries(stats) -> list[tuple[str, Any, Any]]:
    """(field, name, accumulator or None) in an order fixed by the plan."""
    out = [("inputs", name, acc) for name, acc in stats.inputs.items()]
    out += [("head_outputs", name, acc) for name, acc in stats.head_outputs.items()]
    out.append(("importance", None, stats.importance))
    return out


def _pack(acc) -> tuple[list[int], np.ndarray]:
    """Header ``[kind, present, count, length]`` and float64 payload of one accumulator."""
    if isinstance(acc, lrmath.Moments):
        state = acc.to_dict()
        kept = state_shapes(acc.batch_shape, acc.dim, acc.per_feature, acc.order)
        flat = np.concatenate([state[k].ravel() for k in kept])
        return [_MOMENTS, 1, acc.count, flat.size], flat
    if isinstance(acc, lrmath.AngularImportance):
        state = acc.to_dict()
        return [_IMPORTANCE, 1, acc.tokens, 3], np.array([state[k] for k in _IMPORTANCE_KEYS], dtype=np.float64)
    if acc is None:
        return [0, 0, 0, 0], np.empty(0)
    raise TypeError(f"cannot merge statistics of type {type(acc).__name__}")


def _unpack(template, count: int, flat: np.ndarray):
    """The state dict of ``template``'s kind with ``count`` and the arrays in ``flat``."""
    if isinstance(template, lrmath.Moments):
        shape = template.batch_shape
        state = {"format_version": _MOMENTS_VERSION, "dim": template.dim,
                 "batch_shape": np.asarray(shape, dtype=np.int64), "count": count}
        offset = 0
        for key, want in state_shapes(shape, template.dim, template.per_feature, template.order).items():
            size = math.prod(want)
            state[key] = flat[offset:offset + size].reshape(want)
            offset += size
        return state
    state = {"format_version": _IMPORTANCE_VERSION, "mode": template.mode, "tokens": count}
    state.update(zip(_IMPORTANCE_KEYS, (flat[i].reshape(()) for i in range(3))))
    return state


def _merged(template, counts, payloads) -> np.ndarray:
    """Pairwise merge of every rank's state, in rank order, as a payload."""
    kind = type(template)
    total = kind.from_dict(_unpack(template, int(counts[0]), payloads[0]))
    for count, flat in zip(counts[1:], payloads[1:]):
        total.merge(kind.from_dict(_unpack(template, int(count), flat)))
    return _pack(total)[1]


def merge_layer_stats(stats, comm: Communicator, like: torch.Tensor):
    """Replace one layer's statistics, in place, by their exact merge over ``comm``'s ranks.

    Parameters
    ----------
    stats : lrmath_hf.calibrate.LayerStats
        This rank's statistics of the layer (the same plan on every rank).
    comm : Communicator
        From :func:`resolve_group`.
    like : torch.Tensor
        A tensor on the device the merged angular importance should live on
        (moments return to each accumulator's own device).

    Returns
    -------
    LayerStats
        ``stats``, now holding the merged accumulators (identical on every rank).

    Raises
    ------
    ValueError
        The ranks hold different statistics (different plans or layers).
    """
    entries = _entries(stats)
    sizes = comm.all_gather_int([len(entries)])[:, 0]
    if len(set(sizes.tolist())) > 1:
        raise ValueError(f"ranks hold different numbers of statistics {sizes.tolist()}: "
                         "every rank must calibrate the same layers with the same plan")
    packed = [_pack(acc) for _, _, acc in entries]
    table = comm.all_gather_int([v for header, _ in packed for v in header]).reshape(comm.size, len(entries), 4)
    layout = table[:, :, [0, 1, 3]]  # kind, present, length: must agree, counts may not
    if not (layout == layout[:1]).all():
        names = [f"{f}[{n}]" if n else f for f, n, _ in entries]
        bad = sorted({names[i] for i in np.nonzero((layout != layout[:1]).any(axis=(0, 2)))[0]})
        raise ValueError(f"ranks disagree on the layout of the statistics {bad}: every rank must "
                         "calibrate the same layers with the same plan, and every rank needs batches")
    lengths = table[0, :, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([payload for _, payload in packed]) if packed else np.empty(0)
    gathered = comm.gather_to_root(flat)
    if gathered is not None:
        parts = []
        for i, (_, _, acc) in enumerate(entries):
            if acc is None:
                continue
            s = slice(offsets[i], offsets[i + 1])
            parts.append(_merged(acc, table[:, i, 2], [g[s] for g in gathered]))
        flat = np.concatenate(parts) if parts else np.empty(0)
    flat = comm.broadcast_from_root(flat)
    for i, (field_name, name, acc) in enumerate(entries):
        if acc is None:
            continue
        state = _unpack(acc, int(table[:, i, 2].sum()), flat[offsets[i]:offsets[i + 1]])
        if isinstance(acc, lrmath.Moments):
            merged = lrmath.Moments.from_dict(state, like=torch.empty(0, dtype=torch.float64, device=acc.device))
            getattr(stats, field_name)[name] = merged
        else:
            stats.importance = lrmath.AngularImportance.from_dict(state, like=like)
    return stats
