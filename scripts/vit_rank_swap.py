"""Diagnostic: does FLAR's shrinkage change accuracy through the factors or through the ranks?

For each calibration draw of ``scripts/vit_calibration_draws.py`` (same digits, same dense
probe), each of two methods is compressed again with the *other* method's ranks (read from the
draws JSON) and its own whitened factors. If accuracy follows the ranks, the shrinkage acts
through the rank allocation; if it follows the method, through the factorisation.

Usage (from the repository root, after the draws are measured)::

    python scripts/vit_rank_swap.py --calibration 25 --ratio 0.5 --draws 0 1 2 3

The ranks are imposed with the recipe's ``ranks=`` option (no search); the factorisation,
bias correction and surgery are the recipe's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lrmath_hf.specs_vision  # noqa: F401  registers vit / deit / dinov2
from lrmath_hf import data, evaluate, zoo
from lrmath_hf.latency import default_cache_dir
from lrmath_hf.recipes import flar
from lrmath_hf.specs import get_spec
from lrmath_hf.specs_vision import sync_mlp_width
from vit_calibration_draws import draw_indices, key  # the script's folder is on sys.path
from vit_report import METHODS
from vit_results import compress_method, log, probe_score, probe_setting

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=25)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs=2, default=["flar-lwdiag-shrunk-slope-lat", "flar-ref-slope-lat"],
                        choices=list(METHODS))
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "vit-calibration-draws-2026-11-27.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stored = json.loads(args.json.read_text())["results"]
    model, _ = zoo.load_model("dinov2-s14")
    sync_mlp_width(model)
    _, test, test_y, probe, _ = probe_setting(model, default_cache_dir().parent / "vit_probe_dense_112.npz")
    train = data.preprocess_images(zoo.load_digits_mnist("train")[0], 112, center_crop=False)
    n, ratio = args.calibration, args.ratio
    for draw in args.draws:
        batches = list(torch.split(train[draw_indices(draw, n)], 50))
        stats = flar.merge_statistics(flar.flar_statistics(model, get_spec(model), batches, folds=2))
        for method, other in (args.methods, args.methods[::-1]):
            ranks = stored[key(n, draw, other, ratio)]["ranks"]
            compressed, _ = compress_method(model, method, batches, ratio, stats=stats, ranks=ranks)
            swapped = probe_score(probe, evaluate.vit_features(compressed, test), test_y)["accuracy"]
            own = stored[key(n, draw, method, ratio)]["accuracy"]
            theirs = stored[key(n, draw, other, ratio)]["accuracy"]
            log(f"{n} digits, draw {draw}, {100 * ratio:g} %: {method}'s factors with {other}'s ranks "
                f"{100 * swapped:.2f} % (with its own ranks {100 * own:.2f} %; {other} {100 * theirs:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
