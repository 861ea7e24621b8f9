"""Measure every recipe at several ratios on the real SmolLM2-135M, in one run, and write docs/results.md.

Protocol (the one the official FLAT-LLM and SVD-LLM code were run on): calibration = the first 64
windows of 512 tokens of the wiki calibration split; evaluation = perplexity over the first 80
non-overlapping 512-token windows of the evaluation split, fp32.

One calibration pass collects the union of every recipe's statistics; each (recipe, ratio) then
compresses a fresh copy of the dense model from those statistics (non-sequential recipes do not
depend on the order). Separately, one full ``lrmath_hf.compress`` of the default recipe is timed
against the dense forward pass over the same calibration tokens, side by side.

Usage::

    .venv/bin/python scripts/quality_table.py --ratios 0.1 0.2 0.3 0.4 0.5 --out docs/results.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lrmath_hf import zoo
from lrmath_hf.data import protocol_windows
from lrmath_hf.evaluate import perplexity
from lrmath_hf.pipeline import compress
from lrmath_hf.recipes import get_recipe
from lrmath_hf.recipes.common import linear_parameters, run_calibration, union_plan
from lrmath_hf.specs import get_spec

DEFAULT_RECIPES = ["auto", "svd", "flat", "flat-paper", "svd-llm"]


def parse_recipe(text: str) -> tuple[str, str, dict]:
    """``name`` or ``label=name:{json options}``."""
    label, _, rest = text.partition("=") if "=" in text else (text, "", text)
    name, _, opts = rest.partition(":")
    return label, name, json.loads(opts) if opts else {}


@torch.no_grad()
def dense_forward_seconds(model, windows) -> float:
    start = time.perf_counter()
    for w in windows:
        model(input_ids=w[None], use_cache=False)
    return time.perf_counter() - start


def side_by_side(model, calib, recipe: str, rounds: int) -> dict:
    """Dense forward and ``compress(recipe, ratio=0.2)`` alternated, ``rounds`` compressions bracketed by
    ``rounds + 1`` dense passes; the ratio is median compression / median dense pass."""
    dense, runs = [dense_forward_seconds(model, calib)], []
    for _ in range(rounds):
        trial = copy.deepcopy(model)
        rep = compress(trial, calib, recipe=recipe, ratio=0.2, progress=False)
        runs.append(rep.timings)
        del trial
        dense.append(dense_forward_seconds(model, calib))  # bracket each compression: drift shows
    totals = [r["total"] for r in runs]
    return {"recipe": recipe, "dense_forward_s": dense, "compress_s": statistics.median(totals),
            "compress_runs_s": totals, "phases": runs[int(np.argsort(totals)[len(totals) // 2])],
            "ratio_to_dense": statistics.median(totals) / statistics.median(dense)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--eval-windows", type=int, default=80)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--timing-recipe", default="auto", help="'' to skip the side-by-side timing")
    ap.add_argument("--timing-rounds", type=int, default=1,
                    help="compressions timed, alternated with rounds + 1 dense passes (medians compared)")
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    ap.add_argument("--json", default=None, help="results file, rewritten after every row")
    ap.add_argument("--timing-only", action="store_true",
                    help="measure only the side-by-side timing of --timing-recipe (no perplexities)")
    ap.add_argument("--render", nargs="+", metavar="JSON", default=None,
                    help="merge these runs' JSON files (same protocol) into one table in --out; measures nothing")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --json and measure only the missing ones")
    args = ap.parse_args(argv)
    if args.render:
        return render_files(args.render, args.out)
    if args.resume and not args.json:
        ap.error("--resume needs --json")
    previous, old = [], None
    if args.resume and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        if (old["eval_windows"], old["calib_windows"]) != (args.eval_windows, args.calib_windows):
            ap.error(f"{args.json} was measured on a different protocol "
                     f"({old['calib_windows']} calibration / {old['eval_windows']} evaluation windows)")
        previous = old["rows"]

    model, tok = zoo.load_model("smollm2-135m")
    spec = get_spec(model)
    calib = protocol_windows(tok, "calibration", n_windows=args.calib_windows)
    evals = protocol_windows(tok, "evaluation", n_windows=args.eval_windows)
    rows = list(previous)
    done = {(r["recipe"], r["ratio"]) for r in rows}
    # the protocol is deterministic, so a resumed run keeps the dense number it already measured
    if old is not None or args.timing_only:
        dense_ppl = old["dense_perplexity"] if old is not None else float("nan")
    else:
        dense_ppl = perplexity(model, evals, progress=False)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)

    timing = old.get("timing") if old is not None else None
    if args.timing_recipe:
        timing = side_by_side(model, calib, args.timing_recipe, args.timing_rounds)
        print(f"timing {json.dumps(timing)}", flush=True)
    if args.timing_only:
        return 0

    start = time.perf_counter()
    batches = [w[None] for w in calib]
    stats = run_calibration(model, spec, batches, union_plan(spec), progress=False)
    print(f"union calibration {time.perf_counter() - start:.1f} s", flush=True)
    before = linear_parameters(model, spec)
    commands = list(dict.fromkeys([*(old.get("commands", [old["command"]]) if old is not None else []),
                                   " ".join(sys.argv)]))

    def write() -> None:
        payload = {"dense_perplexity": dense_ppl, "eval_windows": args.eval_windows,
                   "calib_windows": args.calib_windows, "timing": timing, "rows": rows,
                   "command": commands[-1], "commands": commands}
        if args.json:  # after every row: a killed run keeps what it measured
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, indent=2))
            tmp.replace(args.json)
        if args.out:
            Path(args.out).write_text(render(payload))

    for text in args.recipes:
        label, name, opts = parse_recipe(text)
        for ratio in args.ratios:
            if (label, ratio) in done:
                continue
            trial = copy.deepcopy(model)
            t0 = time.perf_counter()
            if opts.get("sequential"):  # calibrates on the compressed earlier layers: no shared statistics
                get_recipe(name)(trial, spec, batches, ratio=ratio, progress=False, **opts)
            else:
                get_recipe(name)(trial, spec, None, ratio=ratio, progress=False, stats=stats, **opts)
            decide = time.perf_counter() - t0
            achieved = 1 - linear_parameters(trial, spec) / before
            ppl = perplexity(trial, evals, progress=False)
            rows.append({"recipe": label, "ratio": ratio, "achieved": achieved, "perplexity": ppl,
                         "decision_s": decide, "options": opts})
            print(f"RESULT {label} ratio={ratio} achieved={achieved:.3f} ppl={ppl:.2f} ({decide:.0f} s)", flush=True)
            del trial
            write()
    write()
    return 0


def render_files(files: list[str], out: str | None) -> int:
    """One table from several runs of the same protocol (e.g. recipes measured in parallel processes)."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    protocol = {(r["calib_windows"], r["eval_windows"], round(r["dense_perplexity"], 6)) for r in runs}
    if len(protocol) != 1:
        raise SystemExit(f"runs differ in protocol (calibration, evaluation windows, dense): {sorted(protocol)}")
    merged = dict(runs[0])
    merged["rows"] = [row for r in runs for row in r["rows"]]
    merged["commands"] = [c for r in runs for c in r.get("commands", [r["command"]])]
    merged["timing"] = next((r["timing"] for r in runs if r.get("timing")), None)
    text = render(merged)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


def render(payload: dict) -> str:
    ratios = sorted({r["ratio"] for r in payload["rows"]})
    recipes = list(dict.fromkeys(r["recipe"] for r in payload["rows"]))
    cell = {(r["recipe"], r["ratio"]): r for r in payload["rows"]}
    lines = ["# Measured results: SmolLM2-135M", "",
             "Generated by " + " then ".join(f"`{c}`" for c in payload.get("commands", [payload["command"]]))
             + " (do not edit by hand).", "",
             "Protocol: calibration = first 64 windows x 512 tokens of the wiki calibration split; "
             f"evaluation = perplexity over the first {payload['eval_windows']} non-overlapping 512-token "
             "windows of the evaluation split; fp32, CPU.", "",
             f"Dense perplexity: **{payload['dense_perplexity']:.2f}**.", "",
             "| recipe | " + " | ".join(f"{int(100 * r)} %" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for name in recipes:
        vals = []
        for ratio in ratios:
            r = cell.get((name, ratio))
            vals.append("" if r is None else f"{r['perplexity']:.2f} ({100 * r['achieved']:.1f} %)")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    lines += ["", "Cells: perplexity (decoder-linear parameters actually removed).", ""]
    t = payload.get("timing")
    if t:
        dense = ", ".join(f"{x:.1f}" for x in t["dense_forward_s"])
        lines += [f"Calibration + compression time of `{t['recipe']}` at 20 %: {t['compress_s']:.1f} s "
                  f"(median of {len(t.get('compress_runs_s', [t['compress_s']]))}), {t['ratio_to_dense']:.2f}x "
                  f"the dense forward pass over the same calibration tokens (passes of {dense} s, alternated "
                  "with the compressions in the same run).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
