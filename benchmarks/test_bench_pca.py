"""Batched ``lrmath.pca_truncate`` over all heads of a layer against a per-head loop.

Shapes are (heads, d, d): SmolLM2-135M's 3 key/value heads and 9 query heads
of 64 dims, and a 7B model's 32 heads of 128 dims. The baseline is what a
user writes without lrmath: ``scipy.linalg.eigh`` head by head on the CPU
(goal: never slower), ``torch.linalg.eigh`` head by head on CUDA (goal: >= 3x).
Both sides return the same things: top-``r`` basis, all eigenvalues
(descending) and the dropped energy per head.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import lrmath

from ._harness import CPU, CUDA, host, rel_max_diff, to_backend

SHAPES = [(3, 64), (9, 64), (32, 128)]  # small enough for smoke mode as they are


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[1]}")
def pca_case(request):
    heads, d = request.param
    rng = np.random.default_rng(heads * 1000 + d)
    # per-head value outputs with spectra decaying over two decades
    Y = rng.standard_normal((heads, 4 * d, d)) * np.geomspace(1.0, 0.01, d)
    C = np.swapaxes(Y, 1, 2) @ Y
    C = (C + np.swapaxes(C, 1, 2)) / 2
    r = d // 2
    evals, evecs = np.linalg.eigh(C)  # reference, outside every timer
    basis = evecs[..., ::-1][..., :r]
    return {"C": C, "r": r, "projector": basis @ np.swapaxes(basis, 1, 2),
            "eigenvalues": evals[..., ::-1],
            "dropped": np.clip(evals[..., ::-1][..., r:], 0.0, None).sum(axis=-1)}


def _scipy_loop(C, r):
    def run():
        bases, evals, dropped = [], [], []
        for Ch in C:
            w, V = scipy.linalg.eigh(Ch)
            w, V = w[::-1], V[:, ::-1]
            bases.append(V[:, :r])
            evals.append(w)
            dropped.append(np.clip(w[r:], 0.0, None).sum())
        return np.stack(bases), np.stack(evals), np.array(dropped)
    return run


def _torch_loop(C, r):
    import torch

    def run():
        bases, evals, dropped = [], [], []
        for Ch in C:
            w, V = torch.linalg.eigh(Ch)
            w, V = torch.flip(w, dims=(-1,)), torch.flip(V, dims=(-1,))
            bases.append(V[:, :r])
            evals.append(w)
            dropped.append(torch.clamp(w[r:], min=0.0).sum())
        return torch.stack(bases), torch.stack(evals), torch.stack(dropped)
    return run


def _lrmath(C, r):
    def run():
        res = lrmath.pca_truncate(C, r)
        return res.basis, res.eigenvalues, res.dropped
    return run


@pytest.mark.parametrize("backend", [CPU, CUDA])
@pytest.mark.parametrize("side", ["per-head-loop", "lrmath-batched"])
def test_pca_truncate(bench, pca_case, side, backend):
    C = to_backend(pca_case["C"], backend)
    r = pca_case["r"]
    heads, d = pca_case["C"].shape[:2]
    if side == "per-head-loop":
        fn = _scipy_loop(C, r) if backend == "numpy" else _torch_loop(C, r)
        label = ("scipy.linalg.eigh per head" if backend == "numpy" else "torch.linalg.eigh per head")
        role, goal = "baseline", None
    else:
        fn, label, role = _lrmath(C, r), "lrmath.pca_truncate(C, r), all heads at once", "candidate"
        goal = ({"metric": "speedup", "op": ">=", "target": 1.0, "text": "never slower than the per-head loop"}
                if backend == "numpy" else
                {"metric": "speedup", "op": ">=", "target": 3.0, "text": ">= 3x the per-head torch loop"})
    basis, evals, dropped = bench(fn, group=f"pca_truncate {heads}x{d}x{d} r={r} ({backend})",
                                  role=role, label=label, backend=backend, dtype="float64",
                                  shape=pca_case["C"].shape, goal=goal)
    B = host(basis)
    extra = bench.benchmark.extra_info
    # eigenvectors are defined up to sign: compare projectors
    extra["projector_max_err"] = float(np.max(np.abs(B @ np.swapaxes(B, 1, 2) - pca_case["projector"])))
    extra["eigenvalues_rel_err"] = rel_max_diff(evals, pca_case["eigenvalues"])
    extra["dropped_rel_err"] = rel_max_diff(dropped, pca_case["dropped"])
    assert extra["projector_max_err"] <= 1e-8, extra
    assert extra["eigenvalues_rel_err"] <= 1e-10 and extra["dropped_rel_err"] <= 1e-10, extra
