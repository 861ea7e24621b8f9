#!/usr/bin/env python
"""Decode speedup of a saved compressed model over the dense SmolLM2-135M, re-measured between steps in one process.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/decode_ratio_steps.py runs/sweep/ratio-0.50 m,prefill,m

``m`` times greedy decoding (64 tokens after a 32-token prompt) of the dense and the
compressed model in 7 interleaved pairs (``benchmarks._harness.paired_rounds``, the
end-to-end benchmark's pairing) and prints the median per-pair ratio; ``prefill`` runs 7
pairs of 1 x 512-token prefills, as the benchmark's prefill nodes do. The compressed
folder is any ``lrmath compress smollm2-135m --ratio R --out FOLDER`` output.

Written for stop 24's question: why the 50 % decode ratio is lower in the full
benchmark suite than in a process that runs only decode nodes. Run it under glibc's
defaults and with ``MALLOC_MMAP_THRESHOLD_`` (and ``MALLOC_TRIM_THRESHOLD_``) fixed, which
turns off glibc's dynamic mmap threshold (README, "The decode ratio and the allocator").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import paired_rounds  # noqa: E402


def _decode(model, prompt):
    @torch.inference_mode()
    def run():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                              min_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0)
    return run


def _prefill(model, prompt):
    @torch.inference_mode()
    def run():
        return model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True).logits
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", help="folder written by lrmath compress / save_compressed")
    parser.add_argument("steps", help="comma-separated: m (measure decode) or prefill")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    from lrmath_hf.io import load_compressed
    from lrmath_hf.zoo import load_model

    torch.set_num_threads(1)
    dense, _ = load_model("smollm2-135m", dtype=torch.float32)
    compressed = load_compressed(args.compressed)
    gen = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(100, 40000, (1, 32), generator=gen)
    prefill_prompt = torch.randint(100, 40000, (1, 512), generator=gen)
    for step in args.steps.split(","):
        if step == "m":
            r = paired_rounds(_decode(dense, decode_prompt), _decode(compressed, decode_prompt), rounds=args.rounds)
            print(f"decode {r['speedup']:.3f}x (IQR {r['q1']:.3f}-{r['q3']:.3f}); median s per 64 tokens: "
                  f"dense {statistics.median(r['baseline_s']):.3f}, "
                  f"compressed {statistics.median(r['candidate_s']):.3f}", flush=True)
        elif step == "prefill":
            r = paired_rounds(_prefill(dense, prefill_prompt), _prefill(compressed, prefill_prompt),
                              rounds=args.rounds)
            print(f"prefill {r['speedup']:.3f}x", flush=True)
        else:
            parser.error(f"unknown step {step!r}: use m or prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
