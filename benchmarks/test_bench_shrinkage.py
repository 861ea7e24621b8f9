"""Ledoit-Wolf and streaming moments against what people use today.

* ``lrmath.ledoit_wolf`` (from samples, and from a ``Moments`` filled chunk by
  chunk) against scikit-learn's ``LedoitWolf().fit`` on the same samples;
  the answers must agree to 1e-9. Goal: >= 3x faster. A ``floor`` side times
  the bare float64 ``X.T @ X`` of the same samples: any method that forms the
  covariance pays at least that, so baseline / floor is the most any such
  method can gain here (scikit-learn forms three such products).
* ``Moments.update`` over a stream of chunks against the plain float64
  accumulation ``G += X_k.T @ X_k`` a user would write for an uncentred
  second moment. Goal: >= 0.8x its throughput while also keeping the mean
  and the third / fourth sums Ledoit-Wolf needs. Also with
  ``gram_dtype=float32`` (float32 product of centred rows, merged in float64).
"""

from __future__ import annotations

import numpy as np
import pytest

import lrmath

from ._harness import CPU, CUDA, host, rel_max_diff, size, to_backend

N_ROWS = size(2048, 65536)
FEATURES = size([32, 96], [576, 1536])
CHUNK = size(512, 4096)  # rows per update: e.g. 8 sequences x 512 tokens


def _samples(n: int, p: int, seed: int) -> np.ndarray:
    """Correlated float64 samples with a mean far from zero (calibration activations in miniature).

    Eight shared factors give the covariance structure, per-feature scales
    spread over two decades and an offset of 3 make the centring matter.
    """
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 10.0, p)
    rng.shuffle(scales)
    X = rng.standard_normal((n, p)) * scales
    X += rng.standard_normal((n, 8)) @ rng.standard_normal((8, p))
    X += 3.0
    return X


def _chunks(X, rows: int):
    return [X[i:i + rows] for i in range(0, X.shape[0], rows)]


# --------------------------------------------------------------- Ledoit-Wolf
@pytest.fixture(scope="module", params=FEATURES, ids=lambda p: f"p{p}")
def lw_case(request):
    from sklearn.covariance import LedoitWolf

    p = request.param
    X = _samples(N_ROWS, p, seed=p)
    ref = LedoitWolf(store_precision=False).fit(X)  # the answer every side is checked against
    return {"p": p, "X": X, "chunks": _chunks(X, CHUNK),
            "covariance": ref.covariance_, "shrinkage": float(ref.shrinkage_)}


LW_SIDES = {
    # store_precision=False: scikit-learn would otherwise also pseudo-invert the
    # p x p result, work that lrmath.ledoit_wolf does not do
    "sklearn": ("baseline", "scikit-learn LedoitWolf(store_precision=False).fit(X)"),
    "samples": ("candidate", "lrmath.ledoit_wolf(X)"),
    "moments": ("candidate", "Moments.update per chunk, then lrmath.ledoit_wolf(moments)"),
    "moments-f32gram": ("candidate",
                        "Moments.update(gram_dtype=float32) per chunk, then lrmath.ledoit_wolf"),
    "floor": ("floor", "floor: the bare float64 X.T @ X (any method forming S pays at least this)"),
}


def _ledoit_wolf_side(side, case):
    X, chunks, p = case["X"], case["chunks"], case["p"]
    if side == "floor":
        def run():
            return X.T @ X, None
    elif side == "sklearn":
        from sklearn.covariance import LedoitWolf

        def run():
            est = LedoitWolf(store_precision=False).fit(X)
            return est.covariance_, est.shrinkage_
    elif side == "samples":
        def run():
            res = lrmath.ledoit_wolf(X)
            return res.covariance, res.shrinkage
    else:
        gram_dtype = np.float32 if side == "moments-f32gram" else None

        def run():
            acc = lrmath.Moments(p)
            for part in chunks:
                acc.update(part, gram_dtype=gram_dtype)
            res = lrmath.ledoit_wolf(acc)
            return res.covariance, res.shrinkage
    return run


@pytest.mark.parametrize("side", list(LW_SIDES))
def test_ledoit_wolf(bench, lw_case, side):
    role, label = LW_SIDES[side]
    X, p = lw_case["X"], lw_case["p"]
    exact = side != "moments-f32gram"
    goal = None
    if role == "candidate" and exact:
        goal = {"metric": "speedup", "op": ">=", "target": 3.0,
                "text": ">= 3x faster than scikit-learn at equal result (1e-9)"}
    cov, shrinkage = bench(
        _ledoit_wolf_side(side, lw_case),
        group=f"ledoit_wolf n={X.shape[0]} p={p}", role=role, label=label,
        dtype="float64" if exact else "float64 (float32 Gram)", shape=X.shape, goal=goal,
        info={"chunk_rows": CHUNK if side.startswith("moments") else None})
    if side == "floor":  # not an estimate: nothing to compare with scikit-learn's answer
        assert cov.shape == (p, p) and shrinkage is None
        return
    cov_err = rel_max_diff(cov, lw_case["covariance"])
    s_err = abs(float(shrinkage) - lw_case["shrinkage"])
    bench.benchmark.extra_info.update(covariance_rel_err=cov_err, shrinkage_abs_err=s_err,
                                      shrinkage=float(shrinkage))
    # the same answer as scikit-learn: 1e-9, or float32 rounding of one chunk's Gram
    tol = 1e-9 if exact else 1e-4
    assert cov_err <= tol, cov_err
    assert s_err <= tol, s_err


# ------------------------------------------------------------ Moments.update
@pytest.fixture(scope="module", params=FEATURES, ids=lambda p: f"p{p}")
def stream_case(request):
    p = request.param
    X = _samples(N_ROWS, p, seed=1000 + p)
    return {"p": p, "X": X, "reference_gram": X.T @ X, "reference_cov": np.cov(X.T, bias=True)}


STREAM_SIDES = {
    "xtx-f64": ("baseline", "G += X_k.T @ X_k (float64)"),
    "moments-f64": ("candidate", "Moments.update(X_k) (float64: mean, M2, M3, M4)"),
    "moments-f64-pf": ("candidate", "Moments(per_feature=True).update(X_k) (also the per-feature D3, D4)"),
    "moments-f32gram": ("candidate", "Moments.update(X_k, gram_dtype=float32)"),
}


def _stream_side(side, chunks, p, backend):
    if side == "xtx-f64":
        if backend == "numpy":
            def run():
                G = np.zeros((p, p))
                for part in chunks:
                    G += part.T @ part
                return G
        else:
            import torch

            def run():
                G = torch.zeros((p, p), dtype=torch.float64, device=chunks[0].device)
                for part in chunks:
                    G += part.T @ part
                return G
        return run
    low = None
    if side == "moments-f32gram":
        if backend == "numpy":
            low = np.float32
        else:
            import torch

            low = torch.float32

    per_feature = side == "moments-f64-pf"

    def run():
        acc = lrmath.Moments(p, per_feature=per_feature)
        for part in chunks:
            acc.update(part, gram_dtype=low)
        _ = acc.mean  # a GPU accumulator folds its pending batches when first read: inside the timer
        return acc
    return run


@pytest.mark.parametrize("backend", [CPU, CUDA])
@pytest.mark.parametrize("side", list(STREAM_SIDES))
def test_moments_update(bench, stream_case, side, backend):
    role, label = STREAM_SIDES[side]
    X, p = stream_case["X"], stream_case["p"]
    chunks = [to_backend(part, backend) for part in _chunks(X, CHUNK)]
    goal = None
    if side == "moments-f64":
        goal = {"metric": "speedup", "op": ">=", "target": 0.8,
                "text": ">= 0.8x the throughput of a float64 X.T @ X accumulation"}
    out = bench(_stream_side(side, chunks, p, backend),
                group=f"Moments.update stream n={X.shape[0]} p={p} chunk={CHUNK} ({backend})",
                role=role, label=label, backend=backend,
                dtype="float64" if side != "moments-f32gram" else "float64 (float32 Gram)",
                shape=X.shape, goal=goal,
                info={"items": X.shape[0], "items_unit": "rows", "chunk_rows": CHUNK})
    extra = bench.benchmark.extra_info
    if side == "xtx-f64":
        err = rel_max_diff(out, stream_case["reference_gram"])
        extra["gram_rel_err"] = err
        assert err <= 1e-10, err
    else:
        # same data seen: the uncentred sum agrees with X.T @ X, and the covariance with numpy's
        extra["gram_rel_err"] = rel_max_diff(out.gram, stream_case["reference_gram"])
        extra["covariance_rel_err"] = rel_max_diff(out.covariance(), stream_case["reference_cov"])
        tol = 1e-4 if side == "moments-f32gram" else 1e-10
        assert out.count == X.shape[0]
        assert extra["gram_rel_err"] <= tol and extra["covariance_rel_err"] <= tol, extra
        assert host(out.sums().fourth).shape == ()
