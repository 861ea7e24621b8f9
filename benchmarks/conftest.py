"""Fixtures and pytest-benchmark hooks for the benchmark suites (see ``_harness`` for the modes)."""

from __future__ import annotations

import pytest

import os

from ._harness import THREADS, Bench, machine_facts, source_state

# facts taken when the first benchmark starts (pytest-benchmark asks for the
# machine info only when it writes the JSON, at the end of the session)
_AT_START: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    """Pin every BLAS / OpenMP / torch pool to ``LRMATH_BENCH_THREADS`` for the benchmarks only.

    scipy's and scikit-learn's libraries are loaded first so that the limit
    reaches them (threadpoolctl only sees loaded libraries); the previous
    settings are restored afterwards.
    """
    from threadpoolctl import threadpool_limits

    import scipy.linalg  # noqa: F401
    import sklearn.covariance  # noqa: F401

    try:
        import torch
    except ImportError:
        torch = None
    before = torch.get_num_threads() if torch is not None else None
    _AT_START.update(machine_facts(), source_at_start=source_state())
    with threadpool_limits(limits=THREADS):
        if torch is not None:
            torch.set_num_threads(THREADS)
        yield
    if torch is not None:
        torch.set_num_threads(before)


@pytest.fixture
def bench(benchmark):
    """A :class:`~benchmarks._harness.Bench` around pytest-benchmark's fixture."""
    return Bench(benchmark)


def pytest_benchmark_update_machine_info(config, machine_info):
    # the report prints these: CPU model, cores, threads, library versions, load, source state
    facts = dict(_AT_START) if _AT_START else machine_facts()
    facts["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    facts["source_at_end"] = source_state()
    machine_info["lrmath_bench"] = facts
