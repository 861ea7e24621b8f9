#!/usr/bin/env python
"""Where greedy decoding spends its time, dense vs compressed: matrix products vs everything else.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_decode.py [--ratio 0.5] [--recipe auto]

Loads the zoo's SmolLM2-135M, compresses a copy (calibration on ``--windows`` protocol windows),
then profiles ``generate`` of ``--tokens`` tokens from a 32-token prompt on both models with
``torch.profiler`` (one thread, after a warm-up). It prints, per model, the self CPU time of the
matrix products (``aten::mm`` / ``aten::addmm``: every linear, the LM head included) and of all
other operators, and the ratios dense / compressed. A decode speedup below the parameter ratio
is explained by the part that does not shrink: the LM head's products and the per-token
operator overhead.

``--prompt-tokens`` sets the prompt (context) length; ``--speed-rounds N`` then also times
decoding without the profiler, the two models in ``N`` interleaved rounds
(``lrmath_hf.evaluate.throughput_interleaved``: decode tokens/s from ``generate`` of
``--tokens`` tokens minus that of one token), and prints the ratio of the medians.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch.profiler import ProfilerActivity, profile

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_generate(model, ids, tokens: int) -> dict:
    """Self CPU seconds of the matrix products and of everything else over one ``generate``."""
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                  pad_token_id=0)
    with torch.inference_mode():
        model.generate(max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    return {"total_s": total, "matmul_s": matmul, "other_s": total - matmul}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="auto")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens profiled")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt (context) length")
    parser.add_argument("--speed-rounds", type=int, default=0, help="interleaved timed rounds (0: none)")
    args = parser.parse_args(argv)

    import lrmath_hf
    from lrmath_hf.data import protocol_windows
    from lrmath_hf.evaluate import throughput_interleaved
    from lrmath_hf.modules import count_parameters
    from lrmath_hf.zoo import load_model

    torch.set_num_threads(1)
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    windows = protocol_windows(tokenizer, "calibration", seq_len=512, n_windows=args.windows)
    compressed = copy.deepcopy(dense)
    lrmath_hf.compress(compressed, list(torch.split(windows, 1)), recipe=args.recipe, ratio=args.ratio,
                       progress=False)
    ids = protocol_windows(tokenizer, "evaluation", seq_len=args.prompt_tokens, n_windows=1)
    head = dense.get_output_embeddings().weight.numel()

    rows = {name: profile_generate(model, ids, args.tokens) for name, model in
            (("dense", dense), ("compressed", compressed))}
    params = {"dense": count_parameters(dense), "compressed": count_parameters(compressed)}
    print(f"{args.model}, recipe {args.recipe}, ratio {args.ratio}; generate {args.tokens} tokens "
          f"after a {args.prompt_tokens}-token prompt, one thread")
    print(f"LM head: {head:,} parameters (not compressed)")
    print(f"{'':12} {'params':>13} {'total s':>9} {'matmul s':>9} {'other s':>9}")
    for name, r in rows.items():
        print(f"{name:12} {params[name]:>13,} {r['total_s']:>9.3f} {r['matmul_s']:>9.3f} {r['other_s']:>9.3f}")
    d, c = rows["dense"], rows["compressed"]
    print(f"{'dense/comp.':12} {params['dense'] / params['compressed']:>13.3f} {d['total_s'] / c['total_s']:>9.3f} "
          f"{d['matmul_s'] / c['matmul_s']:>9.3f} {d['other_s'] / c['other_s']:>9.3f}")
    if args.speed_rounds:
        speeds = throughput_interleaved({"dense": dense, "compressed": compressed}, ids,
                                        prefill_tokens=args.prompt_tokens, decode_tokens=args.tokens,
                                        repeats=args.speed_rounds)
        for name, r in speeds.items():
            low, high = r.decode_range
            print(f"{name:12} decode {r.decode_tokens_per_s:7.2f} tokens/s (range {low:.2f}-{high:.2f}, "
                  f"{r.repeats} interleaved rounds)")
        ratio = speeds["compressed"].decode_tokens_per_s / speeds["dense"].decode_tokens_per_s
        print(f"{'comp./dense':12} decode speedup {ratio:.3f}x (ratio of the medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
