"""Memory layout of linear weights for decoding, chosen by timing both layouts on the device at hand.

``F.linear(x, W)`` with ``W`` (out, in) multiplies ``x`` by ``W^T``.  With one
row in ``x`` (a decode step) the product is a matrix-vector product, bound by
reading ``W`` from memory, and how fast the BLAS reads it depends on ``W``'s
layout: row-major (out, in), torch's default ("standard"), gives one dot
product per output; ``W^T`` stored row-major and viewed as (out, in)
("transposed", strides ``(1, out)``) gives a sum of scaled rows of length
``out``.  Neither wins everywhere.  On the 2-core reference CPU (float32, one
thread) the transposed layout took 187 us instead of 306 us for a 1536 x 576
weight and 5.1 ms instead of 9.7 ms for SmolLM2's 49152 x 576 LM head, while
weights with few outputs (576 x 1536, 416 x 576) were faster standard.  So the
choice is measured, per shape and dtype, on the weight's own device, as
FLAR-SVD's latency-aware ranks are (:mod:`lrmath_hf.latency`).

The layout changes strides only: values, parameter objects (tied weights stay
tied), state-dict keys and saved files are unchanged
(:func:`lrmath_hf.save_compressed` writes contiguous tensors; transformers'
``save_pretrained`` refuses a transposed tied weight, so wrap it in
:func:`standard_layout`).  Products with
many rows (prefill, calibration) were within a few percent in either layout on
the reference CPU.  It is a property of a model in memory, not of a file:
re-tune after loading.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .latency import _sync, device_name
from .modules import FactorizedLinear, HeadwiseProjection

__all__ = ["LAYOUTS", "LayoutTiming", "LayoutChoice", "LayoutReport", "layout_of", "time_layouts",
           "tune_decode_layout", "set_layout", "standard_layout"]

LAYOUTS = ("standard", "transposed")
_MIB = 1 << 20


def layout_of(weight: torch.Tensor) -> str | None:
    """``"standard"`` (row-major (out, in)), ``"transposed"`` (strides ``(1, out)``), or ``None`` (neither)."""
    if weight.dim() != 2:
        return None
    if weight.is_contiguous():
        return "standard"
    return "transposed" if weight.t().is_contiguous() else None


def _relaid(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in ``layout`` (a new tensor; the input itself when it is already laid out so)."""
    if layout_of(weight) == layout:
        return weight
    return weight.contiguous() if layout == "standard" else weight.t().contiguous().t()


def _give(weight: nn.Parameter, layout: str) -> bool:
    """Lay ``weight`` out as ``layout`` in place; False where nothing changed (a vector's two layouts are one)."""
    if min(weight.shape) <= 1 or layout_of(weight) == layout:
        return False
    weight.data = _relaid(weight.data, layout)
    return True


def _timing_key(weight: torch.Tensor, tokens: int) -> tuple:
    """Key of a weight's :class:`LayoutTiming` in a ``timings`` cache."""
    return tuple(weight.shape), str(weight.dtype), str(weight.device), tokens


def _weight_names(module: nn.Module) -> tuple[str, ...]:
    # The matrices each module passes to F.linear as its weight.
    if isinstance(module, nn.Linear):
        return ("weight",)
    if isinstance(module, FactorizedLinear):
        return ("left", "right", "right_rest")
    if isinstance(module, HeadwiseProjection):
        return ("right",)
    return ()


def _linear_weights(model: nn.Module) -> Iterator[tuple[nn.Parameter, list[str]]]:
    """Each distinct 2-D floating weight that ``F.linear`` multiplies, with every qualified name using it."""
    found: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for prefix, module in model.named_modules():
        for attr in _weight_names(module):
            weight = getattr(module, attr, None)
            if (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()
                    and weight.numel() > 0 and weight.device.type != "meta"):
                found.setdefault(id(weight), (weight, []))[1].append(f"{prefix}.{attr}" if prefix else attr)
    # Name the other users of a tied weight too (an embedding shares its LM head's layout).
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in found and name not in found[id(param)][1]:
            found[id(param)][1].append(name)
    yield from found.values()


@dataclass(frozen=True)
class LayoutTiming:
    """Median seconds of ``F.linear(x, W)`` with ``W`` in each layout, for one shape, dtype and device."""

    standard_s: float
    transposed_s: float
    rounds: int
    copies: int

    def choice(self, margin: float) -> str:
        """``"transposed"`` only when its median is below ``(1 - margin)`` times the standard one."""
        return "transposed" if self.transposed_s < (1.0 - margin) * self.standard_s else "standard"


@torch.inference_mode()
def time_layouts(weight: torch.Tensor, *, tokens: int = 1, rounds: int = 9, warmup: int = 2,
                 stream_mib: float = 64.0) -> LayoutTiming:
    """Time ``F.linear(x, W)`` with ``W`` standard and transposed, on ``W``'s device and dtype.

    Parameters
    ----------
    weight : torch.Tensor
        (out, in); its values are used (copied), so the timing sees the model's numbers.
    tokens : int
        Rows of ``x``: 1 for a decode step.
    rounds, warmup : int
        Timed and untimed rounds.  Each round times both layouts back to back,
        in an order that alternates between rounds, so a slow drift of a shared
        machine hits both.
    stream_mib : float
        A weight smaller than this is cloned until the clones fill it and each
        sample cycles through the clones: in a model the next weight is not in
        cache either, and a matrix-vector product is bound by memory.

    Returns
    -------
    LayoutTiming
        Medians over the timed rounds, in seconds per call.

    Notes
    -----
    Memory held while timing: ``2 * max(stream_mib, size of W)``, about (both layouts).
    """
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D floating weight, got shape {tuple(weight.shape)} and {weight.dtype}")
    if tokens < 1 or rounds < 1 or warmup < 0 or not stream_mib > 0:
        raise ValueError("tokens and rounds must be >= 1, warmup >= 0 and stream_mib > 0")
    base = weight.detach().contiguous()
    copies = max(1, math.ceil(stream_mib * _MIB / (base.numel() * base.element_size())))
    standard = [base] + [base.clone() for _ in range(copies - 1)]
    transposed = [_relaid(w, "transposed") for w in standard]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, base.shape[1], generator=gen).to(device=base.device, dtype=base.dtype)

    def sample(weights) -> float:
        _sync(base.device)
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        _sync(base.device)
        return (time.perf_counter() - start) / len(weights)

    times: dict[str, list[float]] = {"standard": [], "transposed": []}
    for round_ in range(warmup + rounds):
        order = ("standard", "transposed") if round_ % 2 == 0 else ("transposed", "standard")
        for layout in order:
            seconds = sample(standard if layout == "standard" else transposed)
            if round_ >= warmup:
                times[layout].append(seconds)
    return LayoutTiming(statistics.median(times["standard"]), statistics.median(times["transposed"]), rounds, copies)


@dataclass(frozen=True)
class LayoutChoice:
    """The layout given to one weight (tied names together) and the timing it was chosen on."""

    names: tuple[str, ...]
    shape: tuple[int, int]
    dtype: str
    layout: str
    timing: LayoutTiming

    @property
    def seconds(self) -> float:
        """Measured seconds per call in the chosen layout."""
        return self.timing.transposed_s if self.layout == "transposed" else self.timing.standard_s


@dataclass
class LayoutReport:
    """What :func:`tune_decode_layout` measured and did.

    ``standard_s`` and ``chosen_s`` add the per-call times of every weight once:
    the matrix products of one decode step (``tokens`` rows) before and after,
    predicted from the isolated timings (framework overhead not included).
    """

    device: str
    tokens: int
    margin: float
    choices: list[LayoutChoice] = field(default_factory=list)

    @property
    def transposed(self) -> int:
        """Number of weights now in the transposed layout."""
        return sum(c.layout == "transposed" for c in self.choices)

    @property
    def standard_s(self) -> float:
        """Predicted seconds of every weight's product in the standard layout."""
        return sum(c.timing.standard_s for c in self.choices)

    @property
    def chosen_s(self) -> float:
        """Predicted seconds of every weight's product in its chosen layout."""
        return sum(c.seconds for c in self.choices)

    def summary(self) -> str:
        """One line: weights, how many were transposed, predicted product time before and after."""
        speedup = self.standard_s / self.chosen_s if self.chosen_s else 1.0
        return (f"{len(self.choices)} weights on {self.device}, {self.transposed} transposed; matrix products of a "
                f"{self.tokens}-token step {self.standard_s * 1e3:.2f} -> {self.chosen_s * 1e3:.2f} ms "
                f"({speedup:.2f}x, isolated timings)")


@torch.no_grad()
def set_layout(model: nn.Module, layout: str = "standard") -> int:
    """Give every linear weight of ``model`` one layout (``"standard"`` undoes :func:`tune_decode_layout`).

    Returns
    -------
    int
        The number of weights whose layout changed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return sum(_give(weight, layout) for weight, _ in _linear_weights(model))


@contextmanager
def standard_layout(model: nn.Module):
    """Within the block every linear weight of ``model`` is standard; the tuned layouts come back after.

    For code that assumes contiguous weights, e.g. transformers' ``save_pretrained``, which
    views a tied weight flat to find its extent and fails on the transposed layout::

        with standard_layout(model):
            model.save_pretrained(folder)
    """
    with torch.no_grad():
        moved = [w for w, _ in _linear_weights(model) if layout_of(w) == "transposed" and _give(w, "standard")]
    try:
        yield model
    finally:
        with torch.no_grad():
            for weight in moved:
                _give(weight, "transposed")


@torch.no_grad()
def tune_decode_layout(model: nn.Module, *, tokens: int = 1, margin: float = 0.05, rounds: int = 9,
                       stream_mib: float = 64.0, timings: dict | None = None,
                       progress: bool = False) -> LayoutReport:
    """Lay out each linear weight the way its one-token product runs faster on its device.

    Parameters
    ----------
    model : torch.nn.Module
        Any model: the weights of ``nn.Linear``, :class:`~lrmath_hf.modules.FactorizedLinear`
        and :class:`~lrmath_hf.modules.HeadwiseProjection` modules are considered, each
        tensor once (a tied LM head and embedding share one choice).
    tokens : int
        Rows of the timed products (1: greedy decoding, one sequence).
    margin : float
        The transposed layout is taken only when it is more than this fraction
        faster; otherwise the weight is (made) standard.
    rounds, stream_mib
        Passed to :func:`time_layouts`.
    timings : dict, optional
        A cache of :class:`LayoutTiming` keyed by ``(shape, dtype, device, tokens)``,
        read and filled in place: pass the same dict when tuning several models on one
        device (a dense model and its compressed copies) to time each shape once.
    progress : bool
        Show a tqdm bar over the distinct shapes.

    Returns
    -------
    LayoutReport

    Notes
    -----
    Strides change, values do not: outputs agree with the standard layout up to
    the summation order of the BLAS kernel.  The choice holds for the thread
    count and device it was timed with (``LayoutReport.device``).
    """
    if tokens < 1 or rounds < 1:
        raise ValueError("tokens and rounds must be >= 1")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    timings = {} if timings is None else timings
    weights = list(_linear_weights(model))
    first = weights[0][0].device if weights else torch.device("cpu")
    report = LayoutReport(device=device_name(first), tokens=tokens, margin=margin)
    keys = [_timing_key(w, tokens) for w, _ in weights]
    pending = {key: w for key, (w, _) in zip(keys, weights) if key not in timings}
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(pending.items(), desc="timing layouts", unit="shape")
    else:
        items = pending.items()
    for key, weight in items:
        timings[key] = time_layouts(weight, tokens=tokens, rounds=rounds, stream_mib=stream_mib)
    for key, (weight, names) in zip(keys, weights):
        timing = timings[key]
        # A vector's two layouts are the same memory.
        layout = timing.choice(margin) if min(weight.shape) > 1 else "standard"
        _give(weight, layout)
        report.choices.append(LayoutChoice(tuple(names), key[0], key[1], layout, timing))
    return report
