"""Latency of a dense linear vs its factorised pair, measured on the device at hand and cached as JSON.

FLAR-SVD (Thoma et al., CVPR 2025 Workshops) keeps a layer factorised only
where a regressor trained on TensorRT timings predicts that the pair
``x -> (x R^T) L^T`` beats the dense ``x -> x W^T``; the reference ships no
trained predictor.  Here the times are measured, not predicted: for each
``(tokens, in, out, rank)`` a search visits, the dense linear and the pair run
on the actual device (CPU, CUDA, ...) with the model's dtype, interleaved, after
a warm-up; the medians are kept in a :class:`LatencyTable`, which is cached as
a JSON file keyed by device name, torch version, dtype and (on CPUs) thread
count, in a user cache folder (``$LRMATH_CACHE_DIR`` or the platform's).

Timings on a shared machine are noisy: a pair counts as faster only when its
median is below ``(1 - margin)`` times the dense median (``margin`` 5 % by
default), and end-to-end comparisons interleave the models they compare.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

import lrmath

__all__ = [
    "CACHE_ENV",
    "default_cache_dir",
    "device_name",
    "Timing",
    "time_linear_pair",
    "LatencyTable",
    "time_models",
]

#: Environment variable naming the cache folder (overrides the platform default).
CACHE_ENV = "LRMATH_CACHE_DIR"
TABLE_VERSION = 1


def default_cache_dir() -> Path:
    """``$LRMATH_CACHE_DIR/latency`` if set, else the user cache folder of ``lrmath`` (``~/.cache/lrmath/latency``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "latency"
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("lrmath")) / "latency"
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrmath" / "latency"


def device_name(device: Any = "cpu") -> str:
    """Human-readable name of a device: the GPU model, or the CPU model and its thread count in torch.

    Parameters
    ----------
    device : str or torch.device

    Returns
    -------
    str
        e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"AMD EPYC 7B13 (2 threads)"``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # Thread count changes every timing on a CPU, so it is part of the name.
    return f"{model} ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class Timing:
    """Median seconds of one dense linear call and of the factorised pair, for one shape."""

    dense_s: float
    pair_s: float
    repeats: int

    @property
    def ratio(self) -> float:
        """``pair / dense``: below 1 means the pair is faster."""
        return self.pair_s / self.dense_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_linear_pair(tokens: int, in_features: int, out_features: int, rank: int, *, device: Any = "cpu",
                     dtype: torch.dtype = torch.float32, bias: bool = True, warmup: int = 3,
                     repeats: int = 15, min_seconds: float = 2e-3) -> Timing:
    """Time ``y = x W^T + b`` against ``y = (x R^T) L^T + b`` on ``device``.

    Parameters
    ----------
    tokens : int
        Rows of ``x`` (batch times sequence length).
    in_features, out_features, rank : int
        ``W`` is (out, in); ``R`` (rank, in); ``L`` (out, rank).
    device, dtype
        Where and in which precision to run (the model's).
    bias : bool
        Add a bias in both forms, as :class:`~lrmath_hf.modules.FactorizedLinear` does.
    warmup, repeats : int
        Untimed rounds, then timed rounds; each round times the dense form and
        the pair back to back, so slow drifts of a shared machine hit both.
    min_seconds : float
        Each timed sample loops the call until it lasts about this long,
        which keeps small shapes above the clock's and the scheduler's noise.

    Returns
    -------
    Timing
        Medians over the timed rounds, in seconds per call.
    """
    if min(tokens, in_features, out_features, rank) < 1 or repeats < 1 or warmup < 0:
        raise ValueError("tokens, in_features, out_features, rank and repeats must be >= 1")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, W, R, L = rand(tokens, in_features), rand(out_features, in_features), rand(rank, in_features), rand(out_features, rank)
    b = rand(out_features) if bias else None
    dense = lambda: F.linear(x, W, b)  # noqa: E731
    pair = lambda: F.linear(F.linear(x, R), L, b)  # noqa: E731

    def once(fn, loops):
        _sync(device)
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / loops

    # Loop count from a first call of the slower-looking form, so both use the same count.
    once(dense, 1)
    loops = max(1, math.ceil(min_seconds / max(once(dense, 1), 1e-7)))
    dense_s, pair_s = [], []
    for round_ in range(warmup + repeats):
        d, p = once(dense, loops), once(pair, loops)
        if round_ >= warmup:
            dense_s.append(d)
            pair_s.append(p)
    return Timing(statistics.median(dense_s), statistics.median(pair_s), repeats)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


class LatencyTable:
    """Measured dense-vs-pair times per ``(tokens, in, out, rank)`` on one device, cached on disk.

    Parameters
    ----------
    device : str or torch.device
        Where to measure.
    dtype : torch.dtype
        Precision of the timed matrices (the model's).
    cache_dir : path-like, optional
        Folder of the JSON cache (:func:`default_cache_dir` by default); ``False``
        keeps the table in memory only.
    margin : float
        A pair is *measurably faster* when ``pair < (1 - margin) dense``.
    timer : callable, optional
        ``timer(tokens, in, out, rank) -> Timing``; default
        :func:`time_linear_pair` on ``device`` / ``dtype`` with ``timer_options``.
    timer_options : mapping, optional
        Keyword arguments for :func:`time_linear_pair` (``warmup``, ``repeats``, ...).

    Attributes
    ----------
    path : pathlib.Path or None
        The JSON file: ``<cache_dir>/<device name>-torch<version>-<dtype>.json``.
    measured, reused : int
        Shapes timed by this object, and lookups served from the table.
    """

    def __init__(self, device: Any = "cpu", dtype: torch.dtype = torch.float32, *, cache_dir: Any = None,
                 margin: float = 0.05, timer: Callable[..., Timing] | None = None,
                 timer_options: Mapping[str, Any] | None = None):
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.margin = float(margin)
        self.device_name = device_name(self.device)
        self.torch_version = torch.__version__
        options = dict(timer_options or {})
        self._timer = timer or (lambda t, i, o, r: time_linear_pair(t, i, o, r, device=self.device,
                                                                     dtype=dtype, **options))
        self.path = None
        if cache_dir is not False:
            folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            dtype_name = str(dtype).removeprefix("torch.")
            self.path = folder / f"{_slug(self.device_name)}-torch{_slug(self.torch_version)}-{dtype_name}.json"
        self.entries: dict[str, dict[str, float]] = {}
        self.measured = self.reused = 0
        self._load()

    @staticmethod
    def key(tokens: int, in_features: int, out_features: int, rank: int) -> str:
        return f"{int(tokens)},{int(in_features)},{int(out_features)},{int(rank)}"

    def _header(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "device": self.device_name, "torch": self.torch_version,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a broken cache is re-measured, never trusted
        if {k: payload.get(k) for k in self._header()} == self._header():
            self.entries = {k: dict(v) for k, v in payload.get("entries", {}).items()}

    def save(self) -> Path | None:
        """Write the table atomically (temporary file then rename); returns the path."""
        if self.path is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self._header(), "entries": dict(sorted(self.entries.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".json", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, self.path)
        return self.path

    def timing(self, tokens: int, in_features: int, out_features: int, rank: int) -> Timing:
        """The measured :class:`Timing` of this shape (timed now if it is not in the table)."""
        key = self.key(tokens, in_features, out_features, rank)
        entry = self.entries.get(key)
        if entry is None:
            result = self._timer(tokens, in_features, out_features, rank)
            entry = {"dense_s": float(result.dense_s), "pair_s": float(result.pair_s), "repeats": int(result.repeats)}
            self.entries[key] = entry
            self.measured += 1
            self.save()
        else:
            self.reused += 1
        return Timing(entry["dense_s"], entry["pair_s"], int(entry["repeats"]))

    def faster(self, tokens: int, in_features: int, out_features: int, rank: int) -> bool:
        """Whether the rank-``rank`` pair is measurably faster than the dense linear."""
        t = self.timing(tokens, in_features, out_features, rank)
        return t.pair_s < (1.0 - self.margin) * t.dense_s

    def max_fast_rank(self, tokens: int, in_features: int, out_features: int, *, hi: int,
                      multiple: int = 8) -> tuple[int, int]:
        """Largest grid rank ``<= hi`` whose pair is measurably faster, by bisection.

        Returns
        -------
        rank : int
            0 when even rank ``multiple`` is not faster.
        visits : int
            Shapes looked up by the bisection.

        Notes
        -----
        The pair costs ``tokens * rank * (in + out)`` multiply-adds against
        ``tokens * in * out``, so its time grows with the rank and "not faster"
        is monotone; :func:`lrmath.bisect_rank` finds the first rank where it holds.
        """
        if hi < multiple:
            return 0, 0
        res = lrmath.bisect_rank(lambda r: not self.faster(tokens, in_features, out_features, r),
                                 multiple, hi, multiple=multiple)
        top = (hi // multiple) * multiple
        return (top if res.rank is None else res.rank - multiple), res.calls

    def dense_seconds(self, tokens: int, in_features: int, out_features: int) -> float:
        """Median dense time of this shape over every rank measured with it."""
        prefix = f"{int(tokens)},{int(in_features)},{int(out_features)},"
        times = [e["dense_s"] for k, e in self.entries.items() if k.startswith(prefix)]
        if not times:
            return self.timing(tokens, in_features, out_features, 1).dense_s
        return statistics.median(times)


@torch.inference_mode()
def time_models(models: Mapping[str, torch.nn.Module], pixel_values: torch.Tensor, *, warmup: int = 2,
                repeats: int = 7) -> dict[str, float]:
    """Median forward time of each model on the same input, rounds interleaved.

    Parameters
    ----------
    models : mapping of str to torch.nn.Module
        e.g. ``{"dense": dense, "flar": compressed}``; each is called as
        ``model(pixel_values=...)`` on its own device.
    pixel_values : torch.Tensor
    warmup, repeats : int
        Untimed rounds, then timed rounds; every round runs each model once in
        turn, so load changes of a shared machine affect all of them alike.

    Returns
    -------
    dict of str to float
        Median seconds per forward pass.

    Notes
    -----
    Runs under ``torch.inference_mode()``: inference is what is timed, not the
    autograd bookkeeping a bare call does for parameters that require grad.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                device = next(model.parameters()).device
                x = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
                _sync(device)
                start = time.perf_counter()
                model(pixel_values=x)
                _sync(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
