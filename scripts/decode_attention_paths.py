"""One decode step's attention on reduced value heads: padded fused SDPA vs the unpadded grouped path.

A layer whose value heads FLAT reduced to ``r < d_h`` caches ``r``-dim values. For one query
token, :mod:`lrmath_hf._value_attention` can either zero-pad the whole value cache to ``d_h`` and call
the model's SDPA (the fused kernel), or attend on the ``r``-dim values directly, the query
heads grouped by KV head (``_single_query_attention``). This script times both, and the dense
layer's SDPA on ``d_h``-dim values, at several cache lengths, on the CPU (one thread) or a CUDA
device (synchronised), and checks that the two reduced paths agree. It is the evidence behind
the choice of path per device in ``_padded_value_attention`` (docs/adapters.md).

Usage::

    OMP_NUM_THREADS=1 python scripts/decode_attention_paths.py [--device cuda] [--json out.json]

Defaults: SmolLM2-135M's heads (9 query, 3 KV, ``d_h`` = 64) at ``r`` = 33, float32, batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def median_us(fn, sync, rounds: int, inner: int) -> float:
    """Median over ``rounds`` of the mean time of ``inner`` back-to-back calls, in microseconds."""
    for _ in range(max(inner // 4, 3)):  # warm-up: kernels, allocator
        fn()
    out = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        out.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=33)
    ap.add_argument("--lengths", type=int, nargs="+", default=[96, 512, 2048, 8192])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lrmath_hf._value_attention import _single_query_attention

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    module = SimpleNamespace(num_key_value_groups=args.heads // args.kv_heads, is_causal=True)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    kwargs = {"dropout": 0.0, "scaling": args.head_dim ** -0.5}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, {args.dtype}; {args.heads} query / {args.kv_heads} KV heads, d_h {args.head_dim}, "
          f"r {args.rank}; median of {args.rounds} rounds")
    print(f"{'cached':>7} {'dense SDPA us':>14} {'padded us':>10} {'grouped us':>11} {'padded/grouped':>15} "
          f"{'rel. diff':>10}")

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    for length in args.lengths:
        query = rand(1, args.heads, 1, args.head_dim)
        key = rand(1, args.kv_heads, length, args.head_dim)
        value = rand(1, args.kv_heads, length, args.rank)
        full_value = rand(1, args.kv_heads, length, args.head_dim)
        inner = max(10, min(2000, 400_000 // length))

        def run_padded():
            padded_value = torch.nn.functional.pad(value, (0, args.head_dim - args.rank))
            return sdpa(module, query, key, padded_value, None, **kwargs)[0][..., : args.rank]

        with torch.inference_mode():
            padded = run_padded()
            grouped = _single_query_attention(query, key, value, None, kwargs["scaling"])[0]
            diff = ((padded.float() - grouped.float()).norm() / padded.float().norm()).item()
            t_dense = median_us(lambda: sdpa(module, query, key, full_value, None, **kwargs), sync, args.rounds, inner)
            t_padded = median_us(run_padded, sync, args.rounds, inner)
            t_grouped = median_us(lambda: _single_query_attention(query, key, value, None, kwargs["scaling"]),
                                  sync, args.rounds, inner)
        rows.append({"cached_tokens": length, "dense_sdpa_us": t_dense, "padded_us": t_padded,
                     "grouped_us": t_grouped, "relative_difference": diff})
        print(f"{length:>7} {t_dense:>14.1f} {t_padded:>10.1f} {t_grouped:>11.1f} {t_padded / t_grouped:>15.2f} "
              f"{diff:>10.1e}")
    if args.json:
        meta = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "heads": args.heads,
                "kv_heads": args.kv_heads, "head_dim": args.head_dim, "rank": args.rank,
                "threads": torch.get_num_threads() if device.type == "cpu" else None}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
