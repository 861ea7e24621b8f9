"""How ``joint_subspaces``, ``capped_simplex_projection`` and ``allocate_ranks`` grow with size.

Each is a parametrised sweep (one group per function); the report prints the
time at each size and the empirical exponent of the growth (slope of log time
against log size). Every answer is checked against an independent reference
computed outside the timer.
"""

from __future__ import annotations

import numpy as np
import pytest

import lrmath

from ._harness import FULL, size

# ----------------------------------------------------------- joint subspaces
HEAD_DIM = size(16, 64)
HIDDEN = size([64, 128], [256, 512, 768, 1024, 1536])
SWEEPS = 2  # HOOI sweeps after HOSVD, tol=0: the same work at every size


@pytest.mark.parametrize("d", HIDDEN, ids=lambda d: f"d{d}")
def test_joint_subspaces_scaling(bench, d):
    heads = d // HEAD_DIM  # heads x head_dim = hidden, as in a transformer layer
    rng = np.random.default_rng(d)
    Wq = rng.standard_normal((heads, HEAD_DIM, d)) / np.sqrt(d)
    Wk = rng.standard_normal((heads, HEAD_DIM, d)) / np.sqrt(d)
    r = d // 4
    res = bench(lambda: lrmath.joint_subspaces((Wq, Wk), r, max_iter=SWEEPS, tol=0.0),
                group=f"joint_subspaces (Wq, Wk) scaling: heads x {HEAD_DIM} x d, r=d/4, "
                      f"HOSVD + {SWEEPS} HOOI sweeps",
                role="sweep", label=f"d={d}, heads={heads}", dtype="float64",
                shape=(heads, HEAD_DIM, d), sweep={"param": "d", "size": d})
    A, B, H = res.A, res.B, res.H
    eye = np.eye(r)
    orth = max(float(np.max(np.abs(A @ A.T - eye))), float(np.max(np.abs(B @ B.T - eye))))
    extra = bench.benchmark.extra_info
    extra["orthonormality_err"] = orth
    assert orth <= 1e-10
    assert np.all(np.diff(res.objective) <= 1e-9 * res.objective[0])
    if d <= 768:  # form the d x d products only where that is cheap
        G = np.swapaxes(Wq, 1, 2) @ Wk
        direct = float(np.sum((G - A.T @ H @ B) ** 2))
        extra["objective_rel_err"] = abs(direct - float(res.objective[-1])) / float(np.sum(G**2))
        assert extra["objective_rel_err"] <= 1e-10, extra


# ------------------------------------------------------ capped simplex projection
LENGTHS = size([100, 1000], [100, 1_000, 10_000, 100_000, 1_000_000])


def _bisection(v, total, lo, up, steps=200):
    """Reference threshold by bisection (independent of lrmath's sorted-breakpoint method)."""
    a, b = float(np.min(v - up)), float(np.max(v - lo))
    for _ in range(steps):
        mid = 0.5 * (a + b)
        if np.clip(v - mid, lo, up).sum() > total:
            a = mid
        else:
            b = mid
    return np.clip(v - 0.5 * (a + b), lo, up)


@pytest.mark.parametrize("L", LENGTHS, ids=lambda n: f"L{n}")
def test_capped_simplex_scaling(bench, L):
    rng = np.random.default_rng(L)
    v = rng.normal(0.5, 0.3, L)
    total = 0.4 * L
    w = bench(lambda: lrmath.capped_simplex_projection(v, total, 0.0, 1.0),
              group="capped_simplex_projection scaling: L entries, bounds [0, 1], sum 0.4 L",
              role="sweep", label=f"L={L}", dtype="float64", shape=(L,), sweep={"param": "L", "size": L})
    ref = _bisection(v, total, 0.0, 1.0)
    extra = bench.benchmark.extra_info
    extra["max_abs_err_vs_bisection"] = float(np.max(np.abs(w - ref)))
    extra["sum_err"] = abs(float(np.sum(w)) - total)
    assert extra["max_abs_err_vs_bisection"] <= 1e-9, extra
    assert extra["sum_err"] <= 1e-9 * L and np.all((w >= 0.0) & (w <= 1.0))


# ---------------------------------------------------------------- rank allocation
GROUPS = size([16, 64], [16, 64, 256, 1024, 4096])
SPECTRUM = 128  # one head's spectrum
MULTIPLE = 8


def _spectra(G: int, rng):
    decay = rng.uniform(0.01, 0.2, (G, 1))
    s = rng.uniform(0.5, 2.0, (G, 1)) * np.exp(-decay * np.arange(SPECTRUM))
    return s  # each row descending


@pytest.mark.parametrize("costs", ["equal", "unequal"])
@pytest.mark.parametrize("G", GROUPS, ids=lambda g: f"G{g}")
def test_allocate_ranks_scaling(bench, G, costs):
    rng = np.random.default_rng(G)
    spectra = _spectra(G, rng)
    cost = None if costs == "equal" else rng.integers(1, 8, G).astype(np.float64) * 64.0
    c = np.ones(G) if cost is None else cost
    budget = 0.5 * float(np.sum(c * SPECTRUM))
    res = bench(lambda: lrmath.allocate_ranks(spectra, budget, cost=cost, multiple=MULTIPLE),
                group=f"allocate_ranks scaling ({costs} costs): G groups x {SPECTRUM}, "
                      f"multiple {MULTIPLE}, half the budget",
                role="sweep", label=f"G={G}", dtype="float64", shape=(G, SPECTRUM),
                sweep={"param": "G", "size": G})
    ranks = np.asarray(res.ranks)
    extra = bench.benchmark.extra_info
    assert np.all(ranks % MULTIPLE == 0) and float(np.sum(c * ranks)) <= budget
    dropped = sum(float(np.sum(s[r:])) for s, r in zip(spectra, ranks))
    assert abs(dropped - float(res.dropped)) <= 1e-12 * float(np.sum(spectra))
    if costs == "equal":
        # equal costs: the optimum keeps the largest blocks overall (independent reference)
        blocks = np.sort(spectra.reshape(G, -1, MULTIPLE).sum(axis=2).ravel())[::-1]
        best = float(np.sum(spectra)) - float(np.sum(blocks[: int(budget // MULTIPLE)]))
        extra["dropped_rel_err_vs_optimum"] = abs(float(res.dropped) - best) / float(np.sum(spectra))
        assert extra["dropped_rel_err_vs_optimum"] <= 1e-12, extra
    else:
        extra["certified_gap"] = float(res.gap)


def test_sizes_grow():
    """Each sweep has at least two sizes, so a growth can be read off (also in smoke mode)."""
    assert min(len(HIDDEN), len(LENGTHS), len(GROUPS)) >= 2
    assert FULL or max(LENGTHS) <= 1000
