"""Render the outputs of ``scripts/device_check.sh`` into ``docs/results-gpu.md`` (never edit that page by hand).

Reads, from one folder: ``proofs.xml`` (pytest's JUnit XML of the GPU proofs),
``shapes.json`` (:mod:`gpu_shapes_e2e`), ``caps.json`` (:mod:`latency_caps`),
``eigh_paths.json`` (:mod:`eigh_paths`) and ``decode_attention_<dtype>.json``
(:mod:`decode_attention_paths`); any that is missing is said to be missing. Optional:
``proofs-*.xml`` (a later call's subset of the proofs), ``compress.json`` (a rerun of the
compression timing) and ``provenance.json`` (which lent-GPU call, at which commit, wrote each file).

Usage::

    python scripts/gpu_report.py docs/data/h200-2026-11-27 -o docs/results-gpu.md
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

SPEEDUP_FACTOR = 0.8  # the goal: speedup >= 0.8 x dense params / compressed params


def _proofs(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = Counter()
    per_file: dict[str, Counter] = {}
    failed = []
    for suite in suites:
        for case in suite.iter("testcase"):
            module = case.get("classname", "").rsplit(".", 1)[-1] or "?"
            outcome = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
                failed.append(f"{case.get('classname')}::{case.get('name')}")
            elif case.find("skipped") is not None:
                outcome = "skipped"
            totals[outcome] += 1
            per_file.setdefault(module, Counter())[outcome] += 1
    out = [f"**{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped** "
           "(`pytest -m gpu`: every proof's torch-CUDA and CuPy variant).", "",
           "| module | passed | failed | skipped |", "|---|---|---|---|"]
    for module, c in sorted(per_file.items()):
        out.append(f"| `{module}` | {c['passed']} | {c['failed']} | {c['skipped']} |")
    if failed:
        out += ["", "Failed:", *[f"* `{name}`" for name in failed]]
    return out + [""]


def _shapes(data: dict) -> list[str]:
    out = [f"Device: {data['device']}, torch {data['torch']}. Weights: {data['weights']}. Prefill: "
           f"B x {data['prefill_tokens']} tokens, one forward filling a fresh KV cache; decode: greedy "
           f"`generate` of {data['decode_tokens']} tokens after a {data['prompt_tokens']}-token prompt. "
           "Medians of interleaved rounds; speedup = dense median / this median, same run.", "",
           "The compressed structures are the ones `lrmath compress smollm2-135m --recipe auto` saved (their "
           "real ranks and kept channels, rebuilt by `lrmath_hf.io.build_skeleton` and reloaded by "
           "`load_compressed`); the weights are random because the model's weights cannot travel to the lent "
           "machine, and speed depends on the shapes alone. A goal cell says whether the speedup reaches "
           f"{SPEEDUP_FACTOR} x (dense / compressed parameters), the end-to-end goal of the CPU benchmark.", ""]
    for dtype, rows in data["runs"].items():
        phases = list(next(iter(rows.values()))["phases"])
        head = "| model | parameters | dense / this | goal (0.8 x) | " + " | ".join(
            f"{p} tokens/s (speedup)" for p in phases) + " | peak extra memory, prefill B=1 |"
        out += [f"### {dtype}", "", head, "|" + "---|" * (5 + len(phases))]
        for name, row in rows.items():
            goal = SPEEDUP_FACTOR * row["params_ratio"]
            cells = []
            for p in phases:
                t = row["phases"][p]
                mark = "" if name == "dense" else (" met" if t["speedup"] >= goal else " missed")
                cells.append(f"{t['tokens_per_s']:,.0f} ({t['speedup']:.2f}x{mark})")
            peak = row.get("peak_prefill_bytes")
            peak_text = "-" if peak is None else f"{peak / 2**20:,.0f} MiB"
            label = name if name == "dense" else f"{name} (achieved {row.get('ratio_achieved', 0):.3f})"
            out.append(f"| {label} | {row['params']:,} | {row['params_ratio']:.3f}x | "
                       f"{'-' if name == 'dense' else f'{goal:.2f}x'} | " + " | ".join(cells) + f" | {peak_text} |")
        out.append("")
    if "compress" in data:
        out += _compress(data["compress"])
    else:
        out += ["Calibration + compression time on the GPU: not in this run.", ""]
    return out


def _caps(data: dict) -> list[str]:
    out = [f"Device: {data.get('device_name', data['device'])}, torch {data['torch']}; rank grid multiple "
           f"{data['multiple']}. *cap*: the largest grid rank whose factorised pair is measurably faster "
           "(5 % margin) than the dense linear (`LatencyTable.max_fast_rank`); 0: no rank is. "
           "*k_equiv - 1*: the largest rank that still saves parameters. A cap of 0 is what the latency-aware "
           "FLAR recipe then does on this device: it keeps that linear dense.", "",
           "| dtype | case | linear (out x in) | rows | cap | k_equiv - 1 | pair / dense at max(cap, 8) | dense time |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['dtype']} | {r['case']} | {r['linear']} ({r['out']} x {r['in']}) | {r['rows']} | "
                   f"{r['fast_cap']} | {r['k_equiv_minus_1']} | {r['pair_over_dense_at_cap']:.2f} | "
                   f"{r['dense_s'] * 1e6:,.1f} us |")
    return out + [""]


def _eigh(data: dict) -> list[str]:
    checked = all("projector_max_err" in r for r in data["rows"])
    ratios = all("residual_ratio" in r for r in data["rows"])
    out = [f"Device: {data['device']}, torch {data['torch']}, CuPy {data['cupy']}; float64 SPD batches "
           "(heads, d, d); medians of 15 calls after 3 warm-ups, host round trips included; "
           f"the threaded host side uses {data['host_workers']} workers, one BLAS thread each. " + (
               "Accuracy against a host float64 `numpy.linalg.eigh`: the largest entry error of the "
               "top-d/2 projector and the largest eigenvalue error relative to the largest eigenvalue."
               if checked else
               "Timings only: these paths' accuracy is not checked here (the `pca_truncate` benchmark checks "
               "lrmath's own path).") + (
               " *LAPACK ratios*: the largest backward error and loss of orthogonality over the batch, "
               "`||CV - VW||_F / ||C||_F` and `||V^T V - I||_F`, in units of d x machine epsilon (LAPACK's "
               "tests accept its symmetric eigensolvers below 60, `TESTING/sep.in`; lrmath's Jacobi route "
               "is kept only below that)." if ratios else ""), "",
           "| heads x d | path | median | vs the per-head torch loop |" + (
               " projector error | eigenvalue error |" if checked else "") + (
               " LAPACK ratios (residual / orthogonality) |" if ratios else ""),
           "|---|---|---|---|" + ("---|---|" if checked else "") + ("---|" if ratios else "")]
    for r in data["rows"]:
        row = (f"| {r['heads']} x {r['d']} | {r['path']} | {r['median_s'] * 1e3:.3f} ms | "
               f"{r['speedup_vs_loop']:.2f}x |")
        if checked:
            row += f" {r['projector_max_err']:.1e} | {r['eigenvalues_rel_err']:.1e} |"
        if ratios:
            row += f" {r['residual_ratio']:.1f} / {r['orthogonality_ratio']:.1f} |"
        out.append(row)
    return out + [""]


def _attention(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        m = data["meta"]
        out += [f"### {m['dtype']}", "",
                f"Device: {m['device']}, torch {m['torch']}; {m['heads']} query / {m['kv_heads']} KV heads, "
                f"d_h {m['head_dim']}, value rank r = {m['rank']}, batch 1; medians of synchronised rounds. "
                "*rel. diff*: the largest difference between the two reduced paths' outputs, relative to "
                "the output's largest entry.", "",
                "| cached tokens | dense SDPA (d_h values) | padded fused SDPA | grouped, unpadded | "
                "padded / grouped | rel. diff |",
                "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            out.append(f"| {r['cached_tokens']} | {r['dense_sdpa_us']:.1f} us | {r['padded_us']:.1f} us | "
                       f"{r['grouped_us']:.1f} us | {r['padded_us'] / r['grouped_us']:.2f} | "
                       f"{r['relative_difference']:.1e} |")
        out.append("")
    return out


def _compress(data: dict) -> list[str]:
    t = data.get("timings", {})
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k != "total")
    return [f"`lrmath_hf.compress` (`{data['recipe']}`, ratio {data['ratio']}, {data['windows']} x {data['seq_len']} "
            f"tokens, random weights, float32): {data['compress_s']:.2f} s against {data['dense_forward_s']:.3f} s "
            f"for the dense forward over the same tokens ({data['compress_over_forward']:.1f}x)"
            + (f"; of which {parts}." if parts else "."), ""]


def _provenance(data: dict) -> list[str]:
    out = [data.get("note", ""), "", "| file | lent-GPU call | commit | what |", "|---|---|---|---|"]
    for name, row in data["files"].items():
        out.append(f"| `{name}` | {row['call']} | `{row['commit']}` | {row['what']} |")
    return out + [""]


def render(folder: Path, command: str) -> str:
    lines = ["# Results on a lent GPU", "",
             f"<!-- generated by scripts/gpu_report.py from {folder}; do not edit by hand -->", "",
             "Every number below comes from the files in "
             f"`{folder}`, written by one lent-GPU session running", "", "```bash", command, "```", "",
             "The core benchmarks of the same session (pytest-benchmark) are on "
             "[benchmarks-cuda.md](benchmarks-cuda.md).", ""]
    if (folder / "provenance.json").is_file():
        lines += ["## Which call wrote which file", ""] + _provenance(json.loads((folder / "provenance.json").read_text()))
    proofs = sorted(folder.glob("proofs?*.xml"))
    sections = [("Proofs on CUDA and CuPy", "proofs.xml", lambda p: _proofs(p)),
                ("End to end: the saved SmolLM2-135M structures against dense",
                 "shapes.json", lambda p: _shapes(json.loads(p.read_text()))),
                ("FLAR's latency caps per linear shape", "caps.json", lambda p: _caps(json.loads(p.read_text()))),
                ("Eigensolver paths for a layer's heads", "eigh_paths.json",
                 lambda p: _eigh(json.loads(p.read_text())))]
    for title, name, fn in sections:
        lines += [f"## {title}", ""]
        path = folder / name
        lines += fn(path) if path.is_file() else [f"Not in this run (`{name}` missing).", ""]
        if name == "proofs.xml":
            for extra in proofs:  # a later call's subset, named by its file
                lines += [f"### `{extra.name}`", ""] + _proofs(extra)
        if name == "shapes.json" and (folder / "compress.json").is_file():
            lines += ["### Calibration + compression, `compress.json`", ""]
            lines += _compress(json.loads((folder / "compress.json").read_text()))
    attention = sorted(folder.glob("decode_attention_*.json"))
    lines += ["## One decode step's attention on reduced value heads", ""]
    lines += _attention(attention) if attention else ["Not in this run (`decode_attention_*.json` missing).", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/results-gpu.md"))
    ap.add_argument("--command", default="bash scripts/device_check.sh OUT .gpu/shapes")
    args = ap.parse_args(argv)
    args.output.write_text(render(args.folder, args.command), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
