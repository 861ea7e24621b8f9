"""What scripts/vit_results.py compares and the page it writes: the methods, the tables, the checks.

Separate from the runner so that the page can be re-rendered (and read) without the
measurement code; every number comes from the rows the runner stored.
"""

from __future__ import annotations

import numpy as np

from lrmath_hf import evaluate
from lrmath_hf.recipes.flar import HELDOUT_GRID

# name -> (label, recipe, options); "full" is the library's default FLAR. The other FLAR rows pin
# error_covariance="shrunk", the only pricing before stop 16, so that their stored rows keep their meaning.
METHODS = {
    "plain-svd": ("plain SVD (no data), uniform rank", "flar",
                  dict(shrinkage=1.0, center=False, criterion="uniform", latency_aware=False,
                       error_covariance="shrunk")),
    "svd-llm": ("SVD-LLM (Cholesky whitening, uniform rank)", "svd-llm", {}),
    "flar-ref-weight": ("FLAR paper: reference shrinkage, weight cosine, bisection", "flar",
                        dict(shrinkage="reference", criterion="weight", allocation="threshold", latency_aware=False,
                             error_covariance="shrunk")),
    "flar-lw-weight": ("FLAR paper: Ledoit-Wolf (mu I), weight cosine, bisection", "flar",
                       dict(shrinkage="ledoit_wolf", shrinkage_target="identity", criterion="weight", allocation="threshold", latency_aware=False,
                            error_covariance="shrunk")),
    "flar-ref-feature": ("FLAR paper: reference shrinkage, feature MSE, bisection", "flar",
                         dict(shrinkage="reference", criterion="feature", allocation="threshold", latency_aware=False,
                              error_covariance="shrunk")),
    "flar-lw-feature": ("FLAR paper: Ledoit-Wolf (mu I), feature MSE, bisection", "flar",
                        dict(shrinkage="ledoit_wolf", shrinkage_target="identity", criterion="feature", allocation="threshold", latency_aware=False,
                             error_covariance="shrunk")),
    "flar-lw-feature-lat": ("FLAR paper: Ledoit-Wolf (mu I), feature MSE, bisection, latency-aware", "flar",
                            dict(shrinkage="ledoit_wolf", shrinkage_target="identity", criterion="feature", allocation="threshold",
                                 latency_aware=True, error_covariance="shrunk")),
    "flar-lw-slope": ("FLAR: Ledoit-Wolf (mu I), feature gain, equal slope", "flar",
                      dict(shrinkage="ledoit_wolf", shrinkage_target="identity", criterion="feature", allocation="slope", latency_aware=False,
                           error_covariance="shrunk")),
    "flar-ref-slope-lat": ("FLAR: reference shrinkage, feature gain, equal slope, latency-aware", "flar",
                           dict(shrinkage="reference", criterion="feature", allocation="slope", latency_aware=True,
                                error_covariance="shrunk")),
    "flar-heldout-slope-lat": ("FLAR: held-out shrinkage (mu I, grid 0 .. 4 x LW), feature gain, equal slope, "
                               "latency-aware", "flar",
                               dict(shrinkage="heldout", shrinkage_target="identity",
                                    heldout_grid=(0.0, 1 / 64, 1 / 16, 1 / 4, 1 / 2, 1.0, 2.0, 4.0),
                                    criterion="feature", allocation="slope", latency_aware=True,
                                    error_covariance="shrunk")),
    "flar-heldout64-slope-lat": ("FLAR: held-out shrinkage (mu I, grid 0 .. 64 x LW), feature gain, equal slope, "
                                 "latency-aware", "flar",
                                 dict(shrinkage="heldout", shrinkage_target="identity", heldout_grid=HELDOUT_GRID,
                                      criterion="feature", allocation="slope", latency_aware=True,
                                      error_covariance="shrunk")),
    "flar-lwid-slope-lat": ("FLAR: Ledoit-Wolf toward mu I (the default until stop 13), feature gain, equal slope, "
                            "latency-aware", "flar",
                            dict(shrinkage="ledoit_wolf", shrinkage_target="identity", criterion="feature",
                                 allocation="slope", latency_aware=True, error_covariance="shrunk")),
    "flar-lwdiag-shrunk-slope-lat": ("FLAR: Ledoit-Wolf toward Diag(S), ranks by the error under the shrunk "
                                     "covariance (the default until stop 16), feature gain, equal slope, "
                                     "latency-aware", "flar",
                                     dict(shrinkage="ledoit_wolf", criterion="feature", allocation="slope",
                                          latency_aware=True, error_covariance="shrunk")),
    "full": ("**full FLAR (default)**: Ledoit-Wolf toward Diag(S), ranks by the error under the sample covariance, "
             "feature gain, equal slope, latency-aware", "flar",
             dict(shrinkage="ledoit_wolf", criterion="feature", allocation="slope", latency_aware=True,
                  error_covariance="sample")),
}


PROBE_SETTINGS = ("probe", "probe-small")


def _paired(row_a, row_b):
    """McNemar's test of two probe rows from their stored per-digit correctness."""
    return evaluate.paired_accuracy_test(*(np.array([c == "1" for c in r["correct"]]) for r in (row_a, row_b)))


def _significance(results) -> list[str]:
    """Full FLAR against every other probe row of its ratio, paired on the same test digits (McNemar)."""
    out = []
    for setting, ratio in sorted({(r["setting"], r["ratio"]) for r in results.values()
                                  if r["setting"] in PROBE_SETTINGS}):
        full = results.get(f"{setting}|full|{ratio}")
        if not full or "correct" not in full:
            continue
        for method in METHODS:
            other = results.get(f"{setting}|{method}|{ratio}")
            if method == "full" or not other or "correct" not in other:
                continue
            t = _paired(full, other)
            out.append(f"| {setting} | {ratio:g} | {METHODS[method][0]} | {100 * t.difference:+.2f} | {t.only_a} | "
                       f"{t.only_b} | {t.p_value:.3g} |")
    if not out:
        return []
    return ["## Paired significance of the probe differences (full FLAR vs each method)", "",
            "McNemar's exact test on the same test digits (`lrmath_hf.evaluate.paired_accuracy_test`): only the "
            "digits exactly one model gets right count. Rows measured before per-digit results were stored are "
            "absent.", "",
            "| setting | ratio | method | full minus method (pts) | only full right | only method right | p |",
            "|---|---|---|---|---|---|---|", *out, ""]


def _fidelity_significance(results, meta) -> list[str]:
    """Full FLAR against each other fidelity row of its ratio: Wilcoxon on the photos' mean CLS cosine."""
    groups = meta.get("fidelity_groups")
    out = []
    for ratio in sorted({r["ratio"] for r in results.values() if r["setting"] == "fidelity"}):
        full = results.get(f"fidelity|full|{ratio}")
        if not groups or not full or not full.get("cls_cosine_per_image"):
            continue
        for method in METHODS:
            other = results.get(f"fidelity|{method}|{ratio}")
            if method == "full" or not other or not other.get("cls_cosine_per_image"):
                continue
            t = evaluate.paired_score_test(full["cls_cosine_per_image"], other["cls_cosine_per_image"], groups)
            out.append(f"| {ratio:g} | {METHODS[method][0]} | {t.mean_difference:+.4f} | {t.wins_a} | {t.wins_b} | "
                       f"{t.p_value:.3g} |")
    if not out:
        return []
    return ["## Paired significance of the fidelity differences (full FLAR vs each method)", "",
            "Wilcoxon's exact signed-rank test (`lrmath_hf.evaluate.paired_score_test`) on the CLS cosine, "
            f"averaged over the views of each of the {len(set(groups))} evaluation photos first (its centre crop "
            "and two random crops are not independent), so the photos are the units: the smallest possible "
            f"two-sided p is {2 / 2 ** len(set(groups)):.3g}. Rows measured before per-image values were stored "
            "are absent.", "",
            "| ratio | method | full minus method (CLS cos, photo means) | photos full higher | photos method higher "
            "| p |", "|---|---|---|---|---|---|", *out, ""]


def render(results: dict, meta: dict) -> str:
    lines = ["# ViT results: FLAR-SVD and baselines on DINOv2-S/14", "",
             "Generated by `scripts/vit_results.py`; do not edit by hand.", "",
             "- commands (runs merged by key; each row measured once): "
             + "; ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command", "")])),
             *(["- `--move-rows A B` in the commands: the rows measured as method A, with the options A had at "
                 "the time (which are B's options now), are shown as B (`--copy-rows`, its first form, kept them "
                 "under A too)"]
               if any("--move-rows" in c for c in meta.get("commands", [])) else []),
             f"- machine: {meta.get('device', '')}, torch {meta.get('torch', '')}, "
             f"transformers {meta.get('transformers', '')}; run {meta.get('date', '')}",
             f"- ratios in this table: {', '.join(str(r) for r in sorted({r['ratio'] for r in results.values()}))}",
             f"- latency table: `{meta.get('latency_cache', '')}`",
             "- CPU latency / dense: medians of interleaved one-image forwards; † = 3 warm-up + 15 timed rounds "
             "under `torch.inference_mode` (since stop 13), otherwise 2 + 7 rounds with autograd bookkeeping", ""]
    for setting, title in (("probe", "MNIST linear probe (112 px, probe fitted on dense features)"),
                           ("probe-small", "MNIST linear probe, small calibration (25 digits, 1,625 tokens)"),
                           ("fidelity", "Feature fidelity on the evaluation photos (224 px)")):
        rows = [r for r in results.values() if r["setting"] == setting]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        if setting in PROBE_SETTINGS:
            lines += [f"Dense top-1: {100 * meta.get('dense_probe_accuracy', float('nan')):.2f} %.", "",
                      "| method | removed | top-1 % | loss (pts) | loss / SVD-LLM's | CPU latency / dense | "
                      "search forwards | decide s |", "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| method | removed | CLS cos | patch cos | rel. error | CPU latency / dense | "
                      "search forwards | decide s |", "|---|---|---|---|---|---|---|---|"]
        for ratio in sorted({r["ratio"] for r in rows}):
            base = results.get(f"{setting}|svd-llm|{ratio}")
            for method in METHODS:
                r = results.get(f"{setting}|{method}|{ratio}")
                if r is None:
                    continue
                fwd = (r.get("forward_passes") or {}).get("full_forward_equivalent", 0)
                imgs = (r.get("forward_passes") or {}).get("search_images", 0)
                decide = sum(v for k, v in r["timings"].items() if k not in ("calibration", "total"))
                common = [f"{METHODS[method][0]}", f"{100 * r['achieved']:.1f} %"]
                predicted = (r.get("latency") or {}).get("predicted_saving_s")
                lat = f"{r['latency_s'] / r['latency_dense_s']:.2f}" + ("†" if r.get("latency_protocol") else "")
                if predicted is not None:  # latency-aware: the table's prediction beside the measurement
                    lat += f" (pred. {1 - predicted / r['latency_dense_s']:.2f})"
                tail = [lat, f"{fwd:.0f} x {imgs} img" if imgs else "0",
                        f"{decide:.0f}"]
                if setting in PROBE_SETTINGS:
                    loss = 100 * (r["accuracy"] - meta["dense_probe_accuracy"])
                    base_loss = 100 * (base["accuracy"] - meta["dense_probe_accuracy"]) if base else float("nan")
                    share = f"{loss / base_loss:.2f}" if base and base_loss < 0 else "-"
                    lines.append("| " + " | ".join(common + [f"{100 * r['accuracy']:.2f}", f"{loss:+.2f}", share]
                                                   + tail) + " |")
                else:
                    lines.append("| " + " | ".join(common + [f"{r['cls_cosine']:.4f}", f"{r['patch_cosine']:.4f}",
                                                            f"{r['relative_error']:.4f}"] + tail) + " |")
        lines += [""]
    lines += _heldout_section(results)
    lines += _significance(results)
    lines += _fidelity_significance(results, meta)
    lines += ["## Target checks (computed from the rows above)", ""] + _checks(results, meta) + [""]
    return "\n".join(lines)


def _heldout_section(results) -> list[str]:
    """The multiples of the Ledoit-Wolf intensity that ``shrinkage="heldout"`` chose, per row."""
    rows = [r for r in results.values() if r.get("heldout_multiple")]
    if not rows:
        return []
    out = ["## Held-out shrinkage: the chosen multiples of the Ledoit-Wolf intensity", "",
           "Per input group: the multiple `c` with the least 2-fold held-out error of the whitened truncation at "
           "the uniform ranks (`flar.heldout_intensity`); the group's intensity is `c` times its Ledoit-Wolf "
           "intensity. Layer 0 lists its groups (q+k+v, o, fc1, fc2).", "",
           "| setting | method | ratio | multiples chosen (multiple: groups) | layer 0 | mean intensity |",
           "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["setting"], r["method"], r["ratio"])):
        chosen = r["heldout_multiple"]
        counts = {}
        for c in chosen.values():
            counts[c] = counts.get(c, 0) + 1
        first = [f"{chosen[k]:g}" for k in chosen if k.startswith("0.")]
        out.append(f"| {r['setting']} | {r['method']} | {r['ratio']:g} | "
                   + ", ".join(f"{c:g}: {n}" for c, n in sorted(counts.items())) + f" | {' / '.join(first)} | "
                   f"{r.get('intensity_mean', float('nan')):.2e} |")
    return out + [""]


def _checks(results, meta) -> list[str]:
    out = []
    keys = {"probe": "accuracy", "probe-small": "accuracy", "fidelity": "cls_cosine"}
    for setting, key in keys.items():
        for ratio in sorted({r["ratio"] for r in results.values() if r["setting"] == setting}):
            rows = {r["method"]: r for r in results.values()
                    if r["setting"] == setting and r["ratio"] == ratio and r["method"] in METHODS}
            if "full" not in rows:
                continue
            best = max(rows, key=lambda m: rows[m][key])
            is_best = rows["full"][key] >= rows[best][key]
            verdict = "full FLAR is best" if is_best else "full FLAR is NOT best"
            if not is_best and all("correct" in rows[m] for m in (best, "full")):
                verdict += f"; paired p = {_paired(rows['full'], rows[best]).p_value:.3g}"
            groups = meta.get("fidelity_groups")
            if not is_best and groups and all(rows[m].get("cls_cosine_per_image") for m in (best, "full")):
                t = evaluate.paired_score_test(rows["full"]["cls_cosine_per_image"],
                                               rows[best]["cls_cosine_per_image"], groups)
                verdict += f"; paired p = {t.p_value:.3g} over the {t.n} photos"
            out.append(f"- {setting} {ratio:.0%}: best {key} = {METHODS[best][0]} ({verdict})")
            if setting in PROBE_SETTINGS and ratio in (0.3, 0.5) and "svd-llm" in rows:
                dense = meta["dense_probe_accuracy"]
                ours, theirs = dense - rows["full"]["accuracy"], dense - rows["svd-llm"]["accuracy"]
                out.append(f"  - probe loss full FLAR {100 * ours:.2f} pts vs SVD-LLM {100 * theirs:.2f} pts: "
                           f"{'at most half' if ours <= theirs / 2 else 'MORE than half'}")
    slower = [f"{r['setting']} {r['method']} {r['ratio']}" for r in results.values()
              if r["method"] == "full" and r["latency_s"] > r["latency_dense_s"]]
    out.append("- full FLAR measured latency above dense: " + (", ".join(slower) if slower else "never"))
    return out
