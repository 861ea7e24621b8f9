"""Shared measurement harness for the benchmark suites.

Modes
-----
``LRMATH_BENCH_FULL=1`` selects the sizes the issue asks for; without it every
suite uses small sizes so that CI's ``--benchmark-disable`` smoke run (each
benchmarked function called once, untimed) finishes in seconds.

``LRMATH_BENCH_THREADS`` (default 1) is the number of BLAS / OpenMP / torch
threads both sides of every comparison get. One thread is the default because
the reference machine is a 2-core box shared with other jobs: a second BLAS
thread there mostly waits for a core and turns timings into noise. Set it to
the core count on a quiet machine.

``LRMATH_BENCH_BUDGET`` (seconds, default 12) is the timing budget per
benchmark in enabled mode: rounds are chosen so that rounds x (one call) is
about this long, within ``[MIN_ROUNDS, MAX_ROUNDS]``.

``LRMATH_BENCH_HUGE=1`` also runs the 4,096 x 11,008 whitened SVD on the CPU
(minutes per call on two cores; it always runs on CUDA in full mode).
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

FULL = os.environ.get("LRMATH_BENCH_FULL", "0") == "1"
HUGE = os.environ.get("LRMATH_BENCH_HUGE", "0") == "1"
THREADS = int(os.environ.get("LRMATH_BENCH_THREADS", "1"))
BUDGET_S = float(os.environ.get("LRMATH_BENCH_BUDGET", "12"))

MIN_ROUNDS = 5
MAX_ROUNDS = 200
# calls shorter than this are batched into iterations so that one round is
# well above the timer's resolution and the per-round overhead
MIN_ROUND_S = 2e-3


def size(small, full):
    """``full`` under ``LRMATH_BENCH_FULL=1``, else ``small``."""
    return full if FULL else small


# ----------------------------------------------------------------- backends
def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


CPU = pytest.param("numpy", id="numpy-cpu")
CUDA = pytest.param("torch-cuda", id="torch-cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device")])


def device_name(backend: str) -> str:
    if backend == "torch-cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({cpu_model()})"


def to_backend(a: np.ndarray, backend: str):
    """The same numbers on ``backend``: a numpy copy, or a torch CUDA tensor."""
    if backend == "numpy":
        return np.array(a, copy=True)
    if backend == "torch-cuda":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to("cuda")
    raise ValueError(f"unknown backend {backend!r}")


def host(a) -> np.ndarray:
    """float64 host copy of a numpy / torch array (for answer checks, outside the timers)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def synchronize(backend: str) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if backend == "torch-cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------- machine facts
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu() -> dict:
    """``lscpu`` fields (empty where it is missing)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """CPU 0's caches as the kernel lists them: ``{"L1d": bytes, "L1i": ..., "L2": ..., "L3": ...}``.

    Each entry is one cache (an L3 shared by all cores is counted once); empty
    where sysfs has no cache description.
    """
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    caches = {}
    for index in sorted(Path(root).glob("index[0-9]*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        scale = units.get(size[-1:], 1)
        digits = size[:-1] if size[-1:] in units else size
        if digits.isdigit():
            caches[f"L{level}{suffix}"] = int(digits) * scale
    return caches


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def thread_settings() -> dict:
    """Threads each numerical library will actually use now (recorded with every benchmark)."""
    from threadpoolctl import threadpool_info

    libs = sorted({f"{i['internal_api']}:{i['prefix']}={i['num_threads']}" for i in threadpool_info()})
    out = {"requested": THREADS, "pools": libs}
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def source_state() -> dict:
    """Fingerprint of the lrmath sources and the git HEAD, to detect a change during a run.

    The tree is shared with other engineers: if lrmath changes between the
    start and the end of a run, the numbers may mix two versions, and the
    report says so.
    """
    import hashlib
    import subprocess
    from pathlib import Path

    import lrmath

    root = Path(lrmath.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    dirty = git("status", "--porcelain", "--", "lrmath")
    return {"lrmath_sha256": digest.hexdigest()[:16], "git_head": git("rev-parse", "HEAD"),
            "lrmath_uncommitted": bool(dirty) if dirty is not None else None}


def machine_facts() -> dict:
    """What the generated page prints about the machine and the software."""
    import sys

    import scipy
    lscpu = _lscpu()
    facts = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cores_per_socket": lscpu.get("Core(s) per socket"),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "sockets": lscpu.get("Socket(s)"),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "memory_gib": _memory_gib(),
        "caches": cpu_caches(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "bench_threads": THREADS,
        "full_mode": FULL,
        "huge_cpu": HUGE,
        "budget_s": BUDGET_S,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "argv": sys.argv,
    }
    for mod in ("sklearn", "torch", "lrmath"):
        try:
            facts[mod] = __import__(mod).__version__
        except ImportError:
            facts[mod] = None
    facts["cuda_device"] = device_name("torch-cuda") if cuda_available() else None
    return facts


# ---------------------------------------------------------------- measuring
class Bench:
    """Times one side of a comparison with pytest-benchmark and records what was timed.

    Parameters
    ----------
    benchmark : pytest-benchmark fixture

    Notes
    -----
    In enabled mode: one warm-up call (first-call costs: page faults, lazy
    imports, library plans), then ``rounds`` timed rounds chosen from the
    warm-up time and the budget. GPU work is synchronised inside the timed
    call. In disabled (smoke) mode the function runs exactly once, untimed.
    """

    def __init__(self, benchmark):
        self.benchmark = benchmark

    @property
    def enabled(self) -> bool:
        return not self.benchmark.disabled

    def __call__(self, fn, *, group: str, role: str, label: str, backend: str = "numpy",
                 dtype: str, shape, goal: dict | None = None, sweep: dict | None = None,
                 budget_s: float | None = None, info: dict | None = None):
        """Time ``fn()`` and return its result (from the last call).

        Parameters
        ----------
        group : str
            Comparison group; the report computes ratios within it.
        role : {"baseline", "candidate", "floor", "sweep"}
            The baseline is what a user would otherwise pick; a floor is a bare
            operation every candidate must contain (its ratio bounds theirs).
        label : str
            Short description of this side (shown in the report).
        backend, dtype, shape
            Recorded in ``extra_info`` (``shape`` of the main input).
        goal : dict, optional
            ``{"metric": "speedup" | key in extra_info, "op": ">=" | "<=",
            "target": float, "text": str}``; evaluated by the report.
        sweep : dict, optional
            ``{"param": name, "size": number}`` for scaling sweeps.
        """
        bm = self.benchmark
        bm.group = group
        extra = bm.extra_info
        extra.update(role=role, label=label, backend=backend, device=device_name(backend),
                     dtype=dtype, shape=list(shape), threads=thread_settings(), full_mode=FULL)
        if goal is not None:
            extra["goal"] = goal
        if sweep is not None:
            extra["sweep"] = sweep
        if info:
            extra.update(info)

        def call():
            out = fn()
            synchronize(backend)
            return out

        if not self.enabled:
            return bm.pedantic(call)
        synchronize(backend)
        start = time.perf_counter()
        call()  # warm-up
        first = time.perf_counter() - start
        iterations = 1 if first >= MIN_ROUND_S else min(1000, math.ceil(MIN_ROUND_S / max(first, 1e-7)))
        per_round = max(first, 1e-7) * iterations
        budget = BUDGET_S if budget_s is None else budget_s
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget // per_round)))
        extra.update(warmup_s=first, rounds=rounds, iterations=iterations,
                     loadavg_before=os.getloadavg()[0])
        result = bm.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
        extra["loadavg_after"] = os.getloadavg()[0]
        return result


def paired_rounds(baseline, candidate, *, rounds: int, backend: str = "numpy") -> dict:
    """Time ``baseline()`` and ``candidate()`` round by round in alternating order.

    pytest-benchmark times one side's rounds after the other's, so a change in
    the machine's load between the two passes for a speedup (two idle runs of
    the end-to-end suite on the 2-core reference machine gave decode ratios
    0.3x apart). Here each round times both sides back to back, the order is
    reversed every other round (B C, C B, ...), and the speedup of a round is
    its own ``t_baseline / t_candidate``, so a slow drift cancels within the pair.

    Returns
    -------
    dict
        Per-round seconds of both sides, the per-round ratios, their median and
        quartiles (``speedup``, ``q1``, ``q3``), the ratio of the two medians,
        and the load average before and after; JSON-ready for ``extra_info``.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")

    def timed(fn) -> float:
        synchronize(backend)
        start = time.perf_counter()
        fn()
        synchronize(backend)
        return time.perf_counter() - start

    timed(baseline), timed(candidate)  # warm-up pair, not recorded
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    base_s, cand_s = [], []
    for i in range(rounds):
        if i % 2 == 0:
            base_s.append(timed(baseline))
            cand_s.append(timed(candidate))
        else:
            cand_s.append(timed(candidate))
            base_s.append(timed(baseline))
    ratios = [b / max(c, 1e-12) for b, c in zip(base_s, cand_s)]
    q1, median, q3 = np.percentile(ratios, [25, 50, 75]).tolist()
    return {"rounds": rounds, "order": "alternating: baseline first in even rounds, candidate first in odd",
            "baseline_s": base_s, "candidate_s": cand_s, "ratios": ratios,
            "speedup": median, "q1": q1, "q3": q3,
            "speedup_of_medians": float(np.median(base_s) / np.median(cand_s)),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def rel_max_diff(a, b) -> float:
    """``max|a - b| / max|b|`` on float64 host copies (0 where ``b`` is all zero and ``a == b``)."""
    a, b = host(a), host(b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    return diff / scale if scale > 0 else diff
