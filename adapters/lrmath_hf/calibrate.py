"""Layer-by-layer calibration: forward hooks feeding lrmath accumulators.

The model runs one transformer layer at a time over all calibration batches, so
peak memory is the model, one layer's activations for the calibration set, and
the statistics. For a 7B Llama (32 layers, hidden 4096, MLP 11008) on one
24 GB GPU in fp16 that is ~13.5 GB of weights, 128 x 4096 tokens x 4096 x 2 B
= 4.3 GB of hidden states (kept on the CPU when they do not fit), and float64
statistics of ~0.13 GB ({q,k,v} and {gate,up} inputs, 4096^2 each) plus
~0.97 GB (down-projection input, 11008^2) per layer, freed once the layer is
compressed; accumulating all layers before deciding (global rank allocation)
keeps 32 x 1.2 GB = 37 GB on the host.

Data flow: model -> :func:`calibrate` (hooks -> :class:`lrmath.Moments`,
:class:`lrmath.AngularImportance`) -> decisions (pure lrmath) -> surgery.

Under :mod:`torch.distributed` each process calibrates its own shard of the
batches and every layer's statistics are merged exactly across processes
before ``on_layer`` sees them (:mod:`lrmath_hf.distributed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

import lrmath

from . import distributed

__all__ = ["CalibrationPlan", "LayerStats", "CalibrationResult", "calibrate", "capture_layer_inputs"]


@dataclass(frozen=True)
class CalibrationPlan:
    """What to accumulate in every layer.

    Attributes
    ----------
    inputs : mapping
        Statistic name -> module path inside a layer whose *input* second
        moments are accumulated (one per group of linears sharing an input,
        e.g. ``{"attn_in": "self_attn.q_proj", "mlp_in": "mlp.gate_proj"}``).
    head_outputs : mapping
        Statistic name -> ``(module path, n_heads, head_dim)``: per-head second
        moments of the module's *output* (e.g. value outputs per KV head, or
        query / key outputs before RoPE).
    importance : bool
        Accumulate FLAT-LLM's angular importance of each layer.
    gram_dtype : torch.dtype
        Precision of each batch's partial Gram product; partial sums are
        merged in float64 (float32 halves the cost on CPUs and is what the
        design guide allows: float32 batches, float64 merges).
    rows_per_update : int
        Rows gathered before each accumulator update.
    per_feature : bool
        Input statistics also keep the per-feature sums that
        ``lrmath.ledoit_wolf(..., target="diagonal")`` needs (FLAR's default
        shrinkage); off by default, as they cost some of each update.
    order : {4, 2}
        Highest power sum the input and head-output statistics keep
        (:class:`lrmath.Moments`): 4 (default) also keeps what
        ``lrmath.ledoit_wolf`` needs; 2 keeps only the mean and second moment,
        enough for whitening, PCA and OAS, and skips the rest of the work.
    """

    inputs: Mapping[str, str] = field(default_factory=dict)
    head_outputs: Mapping[str, tuple[str, int, int]] = field(default_factory=dict)
    importance: bool = True
    gram_dtype: torch.dtype = torch.float32
    rows_per_update: int = 4096
    per_feature: bool = False
    order: int = 4


@dataclass
class LayerStats:
    """Statistics of one layer: input moments, per-head output moments, importance."""

    inputs: dict[str, Any] = field(default_factory=dict)
    head_outputs: dict[str, Any] = field(default_factory=dict)
    importance: Any = None


@dataclass
class CalibrationResult:
    """Per-layer statistics; ``tokens`` counts every process's tokens when sharded over ``world_size`` processes."""

    layers: list[LayerStats]
    tokens: int
    seconds: float
    sequential: bool
    world_size: int = 1


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


def input_device(model: nn.Module) -> torch.device:
    """Where the model reads its inputs: its input embedding's device (the first parameter's otherwise)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def to_input_device(batch, model: nn.Module):
    """A batch (tensor, or mapping of tensors) on the model's input device; calibration text and
    images usually come from the host while the model may sit on a GPU."""
    device = input_device(model)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def pixel_values(batch) -> torch.Tensor:
    """The images of a ViT batch: the tensor itself, or its ``pixel_values`` entry (a dict or a
    ``BatchFeature``, which is a mapping but not a dict)."""
    return batch["pixel_values"] if isinstance(batch, Mapping) else batch


def _model_call(model: nn.Module, batch) -> None:
    batch = to_input_device(batch, model)
    if isinstance(batch, Mapping):
        model(**batch)
    elif not torch.is_floating_point(batch):
        model(input_ids=batch, use_cache=False)  # token ids: a causal LM
    else:
        model(pixel_values=batch)  # images: a ViT


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: Iterable) -> list[tuple[tuple, dict]]:
    """Inputs (args, kwargs) of ``first_layer`` for every batch, by running the model up to it.

    Everything before the first layer (embeddings, rotary tables, masks) runs
    exactly as in the model's own forward, so nothing of it is re-implemented.
    """
    captured = _capture(model, first_layer, batches)
    if not captured:
        raise ValueError("calibration is empty: the batches iterable yielded nothing")
    return captured


def _capture(model: nn.Module, first_layer: nn.Module, batches: Iterable) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _model_call(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _Buffered:
    """Rows gathered until ``rows`` of them are ready, then one accumulator update.

    One update per few thousand rows keeps the O(d^2) merge and the per-call
    checks of :class:`lrmath.Moments` small against the O(n d^2) Gram product.
    """

    def __init__(self, make, gram_dtype, rows: int):
        self.make, self.gram_dtype, self.rows = make, gram_dtype, rows
        self.moments, self.pending, self.count = None, [], 0

    def add(self, x: torch.Tensor) -> None:
        self.pending.append(x)
        self.count += x.shape[-2]
        if self.count >= self.rows:
            self.flush()

    def flush(self):
        if self.pending:
            x = torch.cat(self.pending, dim=-2)
            if self.moments is None:
                self.moments = self.make(x)
            self.moments.update(x, gram_dtype=self.gram_dtype)
            self.pending, self.count = [], 0
        return self.moments


def _install_hooks(layer: nn.Module, plan: CalibrationPlan) -> tuple[list, dict, dict]:
    handles, inputs, heads = [], {}, {}
    for name, path in plan.inputs.items():
        module = layer.get_submodule(path)
        inputs[name] = buffer = _Buffered(
            lambda x: lrmath.Moments(x.shape[-1], device=x.device, per_feature=plan.per_feature, order=plan.order),
            plan.gram_dtype, plan.rows_per_update)
        handles.append(module.register_forward_pre_hook(lambda mod, args, buffer=buffer: buffer.add(_rows(args[0]))))
    for name, (path, n_heads, head_dim) in plan.head_outputs.items():
        module = layer.get_submodule(path)
        heads[name] = buffer = _Buffered(
            lambda y, n_heads=n_heads, head_dim=head_dim: lrmath.Moments(head_dim, batch_shape=(n_heads,),
                                                                         device=y.device, order=plan.order),
            plan.gram_dtype, plan.rows_per_update)

        def out_hook(mod, args, out, buffer=buffer, n_heads=n_heads, head_dim=head_dim):
            buffer.add(_rows(out).reshape(-1, n_heads, head_dim).transpose(0, 1))

        handles.append(module.register_forward_hook(out_hook))
    return handles, inputs, heads


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers,
    batches: Iterable,
    plan: CalibrationPlan,
    *,
    sequential: bool = False,
    on_layer: Callable[[int, LayerStats], None] | None = None,
    progress: bool = True,
    offload: bool = False,
    process_group=None,
) -> CalibrationResult:
    """Accumulate ``plan``'s statistics layer by layer over the calibration batches.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model; it runs only up to its first layer.
    layers : sequence of torch.nn.Module
        The transformer layers, in order (from the architecture spec).
    batches : iterable
        Token-id tensors ``(batch, seq)``, ``pixel_values`` tensors, or dicts of
        model inputs.
    plan : CalibrationPlan
        Which statistics to accumulate.
    sequential : bool
        If True, ``on_layer`` is called after each layer's statistics and the
        next layer's inputs come from the layer as ``on_layer`` left it (the
        already-compressed model); this costs a second pass over each layer.
        If False, inputs propagate through the dense layers in the same pass
        that accumulates the statistics, and ``on_layer`` (if given) is called
        after that pass.
    on_layer : callable, optional
        ``on_layer(index, stats)``, e.g. to compress the layer right away.
    progress : bool
        Show a tqdm progress bar over layers.
    offload : bool
        Keep the propagated hidden states on the CPU between layers.
    process_group : torch.distributed.ProcessGroup, None or False
        Shard the calibration over processes. ``None`` (default): over the
        default group when :mod:`torch.distributed` is initialised with more
        than one process, else not at all (no cost). A group: over that group.
        ``False``: never. Sharded, each rank passes its own ``batches``
        (:func:`lrmath_hf.distributed.shard_batches`) and the same ``plan``,
        and every layer's statistics are merged exactly (float64 pairwise
        merges, in rank order) before ``on_layer`` sees them, identically on
        every rank; in sequential mode each rank then propagates its own shard
        through the layer as ``on_layer`` left it.

    Returns
    -------
    CalibrationResult
        Per-layer :class:`LayerStats`, the number of calibration tokens (of
        all ranks), and the wall time.

    Raises
    ------
    ValueError
        No batches (sharded: on every rank, if any rank has none), or ranks
        whose statistics do not match (different plans).
    """
    start = time.perf_counter()
    comm = distributed.resolve_group(process_group)
    captured = _capture(model, layers[0], batches)
    hidden = [args[0] for args, _ in captured]
    extra_args = [args[1:] for args, _ in captured]
    kwargs = [kw for _, kw in captured]
    tokens = sum(h.shape[0] * h.shape[1] if h.ndim == 3 else h.shape[0] for h in hidden)
    if comm is not None:
        # before any rank can raise alone: an empty shard is an error on every rank, not a hang
        tokens = distributed.check_shards(comm, len(captured), tokens)
    elif not captured:
        raise ValueError("calibration is empty: the batches iterable yielded nothing")
    device = hidden[0].device

    iterator = range(len(layers))
    if progress and (comm is None or comm.rank == 0):
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="calibrating layers", unit="layer")
    results: list[LayerStats] = []
    for index in iterator:
        layer = layers[index]
        stats = LayerStats()
        handles, inputs, heads = _install_hooks(layer, plan)
        outputs = []
        try:
            for h, a, kw in zip(hidden, extra_args, kwargs):
                h = h.to(device)
                out = _layer_output(layer(h, *a, **kw))
                if plan.importance:
                    if stats.importance is None:
                        stats.importance = lrmath.AngularImportance()
                    stats.importance.update(h, out)
                if not sequential:
                    outputs.append(out.cpu() if offload else out)
        finally:
            for handle in handles:
                handle.remove()
        stats.inputs = {name: buffer.flush() for name, buffer in inputs.items()}
        stats.head_outputs = {name: buffer.flush() for name, buffer in heads.items()}
        if comm is not None:
            distributed.merge_layer_stats(stats, comm, like=torch.empty(0, dtype=torch.float64, device=device))
        if on_layer is not None:
            on_layer(index, stats)
        if sequential:
            outputs = [
                _layer_output(layer(h.to(device), *a, **kw)).to("cpu" if offload else device)
                for h, a, kw in zip(hidden, extra_args, kwargs)
            ]
        hidden = outputs
        results.append(stats)
    return CalibrationResult(results, int(tokens), time.perf_counter() - start, sequential,
                             1 if comm is None else comm.size)
