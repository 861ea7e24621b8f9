"""Where a CUDA ``Moments.update`` spends its time: the stream the benchmark times, profiled.

Times a float64 stream of 4,096-row chunks (as ``benchmarks/test_bench_shrinkage.py``) for
``G += X_k^T X_k`` and ``Moments.update`` (median of rounds, synchronised), then prints
``torch.profiler``'s table for one ``Moments`` stream: host time per operator and device time.

Usage::

    python scripts/moments_gpu_profile.py [--dims 576 1536]
"""

from __future__ import annotations

import argparse

import torch
from eigh_paths import median_time  # scripts/ is on the path when this file runs

import lrmath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    for p in args.dims:
        X = torch.randn(args.rows, p, dtype=torch.float64, device=dev) + 3.0
        chunks = list(torch.split(X, args.chunk))

        def gram():
            G = torch.zeros(p, p, dtype=torch.float64, device=dev)
            for part in chunks:
                G += part.T @ part
            return G

        def moments():
            acc = lrmath.Moments(p)
            for part in chunks:
                acc.update(part)
            return acc.mean

        times = {name: median_time(fn, torch.cuda.synchronize, rounds=args.rounds)
                 for name, fn in (("gram", gram), ("moments", moments))}
        print(f"p={p}: G += X^T X {times['gram'] * 1e3:.2f} ms, Moments.update {times['moments'] * 1e3:.2f} ms "
              f"({times['gram'] / times['moments']:.2f}x the throughput), per update "
              f"{times['moments'] / len(chunks) * 1e6:.0f} us", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            moments()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
