"""Measured dense-vs-pair latency: timing, the JSON cache keyed by device and torch version, the fast-rank bisection."""

from __future__ import annotations

import json

import pytest
import torch

from lrmath_hf import latency
from lrmath_hf.latency import LatencyTable, Timing, time_linear_pair, time_models


class FakeTimer:
    """Pair time proportional to the rank, dense time fixed: the pair is faster below ``crossover``."""

    def __init__(self, crossover: int = 44):
        self.crossover, self.calls = crossover, []

    def __call__(self, tokens, in_features, out_features, rank):
        self.calls.append((tokens, in_features, out_features, rank))
        return Timing(dense_s=1e-3, pair_s=1e-3 * rank / self.crossover, repeats=5)


def test_time_linear_pair_measures_both_forms():
    t = time_linear_pair(32, 48, 40, 4, warmup=1, repeats=3, min_seconds=1e-4)
    assert t.dense_s > 0 and t.pair_s > 0 and t.repeats == 3
    assert t.ratio == pytest.approx(t.pair_s / t.dense_s)
    with pytest.raises(ValueError):
        time_linear_pair(0, 4, 4, 1)


def test_device_name_names_the_cpu_and_its_threads():
    assert f"({torch.get_num_threads()} threads)" in latency.device_name("cpu")


def test_table_is_cached_as_json_keyed_by_device_and_torch(tmp_path):
    timer = FakeTimer()
    table = LatencyTable(cache_dir=tmp_path, timer=timer)
    assert table.path.parent == tmp_path and torch.__version__.split("+")[0] in table.path.name
    assert table.timing(257, 384, 1536, 64) == Timing(1e-3, 1e-3 * 64 / 44, 5)
    table.timing(257, 384, 1536, 64)
    assert (table.measured, table.reused, len(timer.calls)) == (1, 1, 1)
    payload = json.loads(table.path.read_text())
    assert payload["device"] == latency.device_name("cpu") and payload["torch"] == torch.__version__
    assert payload["dtype"] == "float32" and set(payload["entries"]) == {"257,384,1536,64"}

    # A second table on the same device reads the cache and times nothing.
    again_timer = FakeTimer()
    again = LatencyTable(cache_dir=tmp_path, timer=again_timer)
    assert again.timing(257, 384, 1536, 64).pair_s == pytest.approx(1e-3 * 64 / 44)
    assert again_timer.calls == []
    # A table written by another torch version is not trusted.
    table.path.write_text(json.dumps({**payload, "torch": "0.0.1"}))
    assert LatencyTable(cache_dir=tmp_path, timer=FakeTimer()).entries == {}
    # Another dtype is another file.
    assert LatencyTable(torch.device("cpu"), torch.float64, cache_dir=tmp_path, timer=timer).path != table.path


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path))
    assert latency.default_cache_dir() == tmp_path / "latency"
    assert LatencyTable(timer=FakeTimer()).path.parent == tmp_path / "latency"
    assert LatencyTable(cache_dir=False, timer=FakeTimer()).save() is None


@pytest.mark.parametrize("crossover,expected", [(44, 40), (45, 40), (8, 0), (10_000, 184)])
def test_max_fast_rank_bisects_the_crossover(crossover, expected):
    timer = FakeTimer(crossover)
    # margin 0: faster means pair < dense, i.e. rank < crossover
    table = LatencyTable(cache_dir=False, margin=0.0, timer=timer)
    rank, visits = table.max_fast_rank(100, 384, 384, hi=191, multiple=8)
    assert rank == expected
    assert visits == len(timer.calls) <= 5  # 23 grid ranks: ceil(log2(24)) evaluations at most


def test_margin_demands_a_measurable_gain():
    timer = lambda *shape: Timing(1.0, 0.97, 3)  # noqa: E731  3 % faster
    assert not LatencyTable(cache_dir=False, margin=0.05, timer=timer).faster(1, 2, 3, 1)
    assert LatencyTable(cache_dir=False, margin=0.01, timer=timer).faster(1, 2, 3, 1)


def test_dense_seconds_is_the_median_over_ranks():
    times = iter([Timing(1.0, 0.1, 1), Timing(3.0, 0.1, 1), Timing(2.0, 0.1, 1)])
    table = LatencyTable(cache_dir=False, timer=lambda *shape: next(times))
    for rank in (8, 16, 24):
        table.timing(10, 20, 30, rank)
    assert table.dense_seconds(10, 20, 30) == 2.0


def test_time_models_interleaves_and_reports_medians():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    times = time_models({"a": Wrap(a), "b": Wrap(b)}, torch.randn(2, 4), warmup=1, repeats=3)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
