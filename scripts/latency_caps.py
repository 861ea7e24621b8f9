"""Largest rank at which a factorised linear pair is measurably faster than the dense linear, per device.

FLAR's latency-aware step (``lrmath_hf.recipes.flar``) asks this of a
:class:`lrmath_hf.latency.LatencyTable` for every linear shape it compresses.
This script asks it for the encoder linears of DINOv2-S/14 (one 224 px image
= 257 tokens, and a batch of 32) and the decoder linears of SmolLM2-135M
(a 512-token prefill and one decode token), and prints the caps next to
``k_equiv - 1`` (the largest rank that saves parameters).

Usage::

    python scripts/latency_caps.py --device cuda --dtypes float32 bfloat16 --json caps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "adapters")]

import lrmath  # noqa: E402
from lrmath_hf.latency import LatencyTable  # noqa: E402

# (model, rows, [(name, out, in), ...])
DINO = [("qkv/o", 384, 384), ("fc1", 1536, 384), ("fc2", 384, 1536)]
SMOL = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]
CASES = [("dinov2-s14, 1 image", 257, DINO), ("dinov2-s14, 32 images", 32 * 257, DINO),
         ("smollm2-135m, prefill 512", 512, SMOL), ("smollm2-135m, decode", 1, SMOL)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--cache-dir", default=False, help="LatencyTable cache folder (default: memory only)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {"device": args.device, "torch": torch.__version__, "multiple": args.multiple, "rows": []}
    for dtype_name in args.dtypes:
        table = LatencyTable(args.device, getattr(torch, dtype_name), cache_dir=args.cache_dir)
        out["device_name"] = table.device_name
        for case, rows, shapes in CASES:
            for name, m, n in shapes:
                hi = lrmath.k_equiv(m, n) - 1
                start = time.perf_counter()
                cap, visits = table.max_fast_rank(rows, n, m, hi=hi, multiple=args.multiple)
                t_top = table.timing(rows, n, m, max(cap, args.multiple))
                row = {"dtype": dtype_name, "case": case, "linear": name, "out": m, "in": n, "rows": rows,
                       "k_equiv_minus_1": hi, "fast_cap": cap, "cap_fraction": cap / hi, "visits": visits,
                       "pair_over_dense_at_cap": t_top.ratio, "dense_s": t_top.dense_s,
                       "seconds": time.perf_counter() - start}
                out["rows"].append(row)
                print(f"{dtype_name:9s} {case:26s} {name:8s} {m:5d}x{n:<5d} cap {cap:5d} of {hi:5d} "
                      f"({row['cap_fraction']:.2f})  pair/dense there {t_top.ratio:.2f}  "
                      f"dense {t_top.dense_s * 1e6:8.1f} us", flush=True)
        table.save()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
