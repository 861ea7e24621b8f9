"""Which eigensolver path is fastest for a layer's heads on a CUDA device? (float64, transfers included)

Compares, for (heads, d, d) SPD batches: torch's batched ``eigh`` on the GPU, a per-head
torch loop on the GPU, CuPy's batched ``eigh`` on the same memory, and a round trip to the
host (numpy batched ``eigh`` on one thread, and one head per thread on every core).
This is the evidence behind the CUDA row of the ``pca_truncate`` benchmark in docs/benchmarks.md.

Usage::

    python scripts/eigh_paths.py --json eigh_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

SHAPES = [(32, 32), (3, 64), (9, 64), (32, 128), (8, 256)]  # the last: is the Jacobi route worth it beyond 128?


def median_time(fn, sync, rounds=15, warmup=3):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def _host_pair(out, heads):
    """``(eigenvalues, eigenvectors)`` as host float64 (heads, d) / (heads, d, d) from any path's result."""
    if isinstance(out, list) and isinstance(out[0], tuple):  # the per-head loop: one (w, v) per head
        out = (torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]))
    w, v = out[0], out[1]

    def host(a):
        if hasattr(a, "get"):  # cupy
            return a.get()
        return a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)

    return host(w).astype(np.float64), host(v).astype(np.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # one BLAS thread per eigh: the threaded side's parallelism is its pool alone
    sync = torch.cuda.synchronize
    try:
        import cupy
    except ImportError:
        cupy = None
    workers = os.cpu_count() or 1
    pool = ThreadPoolExecutor(workers)
    rows = []
    for heads, d in SHAPES:
        rng = np.random.default_rng(heads * d)
        Y = rng.standard_normal((heads, 4 * d, d)) * np.geomspace(1.0, 0.01, d)
        C = torch.from_numpy(np.swapaxes(Y, 1, 2) @ Y).cuda()
        sides = {
            "torch batched": lambda: torch.linalg.eigh(C),
            "torch per-head loop": lambda: [torch.linalg.eigh(c) for c in C],
            "host numpy batched (1 thread)": lambda: [torch.from_numpy(a).cuda()
                                                      for a in np.linalg.eigh(C.cpu().numpy())],
            f"host, one head per thread ({workers})": lambda: [
                torch.from_numpy(np.stack(part)).cuda() for part in zip(*pool.map(np.linalg.eigh, C.cpu().numpy()))],
        }
        if cupy is not None:
            Cc = cupy.from_dlpack(C)
            sides["cupy batched"] = lambda: cupy.linalg.eigh(Cc)
        from lrmath._eigh import eigh as lrmath_eigh

        sides["lrmath route (checked)"] = lambda: lrmath_eigh(C)
        times = {name: median_time(fn, sync) for name, fn in sides.items()}
        base = times["torch per-head loop"]
        # accuracy against a host float64 reference, outside the timers: the top-d/2 projector
        # (eigenvectors are defined up to sign and within clusters) and the eigenvalues
        ref_w, ref_v = np.linalg.eigh(C.cpu().numpy())
        r = d // 2
        ref_p = ref_v[..., -r:] @ np.swapaxes(ref_v[..., -r:], 1, 2)
        for name, t in times.items():
            w, v = _host_pair(sides[name](), heads)
            proj_err = float(np.max(np.abs(v[..., -r:] @ np.swapaxes(v[..., -r:], 1, 2) - ref_p)))
            eig_err = float(np.max(np.abs(w - ref_w)) / np.max(np.abs(ref_w)))
            # LAPACK's test ratios (TESTING/sep.in accepts < 60): backward error and orthogonality in units of d eps
            unit = d * np.finfo(np.float64).eps
            Ch = C.cpu().numpy()
            resid = np.linalg.norm(Ch @ v - v * w[:, None, :], axis=(1, 2)) / np.linalg.norm(Ch, axis=(1, 2))
            ortho = np.linalg.norm(np.swapaxes(v, 1, 2) @ v - np.eye(d), axis=(1, 2))
            rows.append({"heads": heads, "d": d, "path": name, "median_s": t, "speedup_vs_loop": base / t,
                         "projector_max_err": proj_err, "eigenvalues_rel_err": eig_err,
                         "residual_ratio": float(resid.max() / unit), "orthogonality_ratio": float(ortho.max() / unit)})
            print(f"{heads:3d}x{d:<4d} {name:38s} {t * 1e3:8.3f} ms  {base / t:5.2f}x vs the per-head loop  "
                  f"projector err {proj_err:.1e}  eigenvalue err {eig_err:.1e}  "
                  f"LAPACK ratios {resid.max() / unit:.1f} / {ortho.max() / unit:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "cupy": getattr(cupy, "__version__", None), "host_workers": workers, "rows": rows}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
