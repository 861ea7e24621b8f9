#!/usr/bin/env python
"""Turn pytest-benchmark's JSON into ``docs/benchmarks.md`` (never edit that page by hand).

Usage::

    python scripts/bench_report.py runs/bench.json [-o docs/benchmarks.md]

Every number on the page comes from the JSON: medians and interquartile
ranges per benchmark, ratios against the baseline of each comparison group
(medians of the same run), the goals each candidate declared in its
``extra_info`` with met / MISSED, the answer checks recorded by the benchmark
modules, growth exponents of the scaling sweeps, the end-to-end tables
(compression time vs the dense forward; compressed vs dense model: parameters,
file size, peak memory, prefill / decode tokens/s) and the machine description.

This module holds the page itself (machine section, comparison and scaling tables,
goals, CLI); the formatting and statistics helpers are in ``bench_format.py`` and
the end-to-end tables in ``bench_report_e2e.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_format import (baseline_first, checks_text, evaluate_goal, fmt_bytes, fmt_time, group_benchmarks,
                          growth_exponents, md_escape, ratio_cell, stats_of)
from bench_report_e2e import e2e_section, is_e2e

FULL_COMMAND = ("LRMATH_BENCH_FULL=1 nice -n 10 .venv/bin/python -m pytest benchmarks "
                "--benchmark-enable --benchmark-json=runs/bench.json && "
                ".venv/bin/python scripts/bench_report.py runs/bench.json")


# ---------------------------------------------------------------------- output
def source_text(facts: dict) -> str:
    """The lrmath source fingerprint, and a warning if it changed while the run was going on."""
    start, end = facts.get("source_at_start"), facts.get("source_at_end")
    if not start or not end:
        return "not recorded"
    text = (f"sha256 {start['lrmath_sha256']} at HEAD {str(start['git_head'])[:12]}"
            f"{' + uncommitted changes' if start.get('lrmath_uncommitted') else ''}")
    if start["lrmath_sha256"] != end["lrmath_sha256"]:
        text += (f"; **changed during the run** (sha256 {end['lrmath_sha256']} at the end): "
                 "numbers may mix two versions")
    return text


def _cache_size(nbytes) -> str:
    return fmt_bytes(nbytes) if isinstance(nbytes, int) else "?"


def caches_text(facts: dict, cpu: dict) -> str:
    """One core's caches: from sysfs where the run recorded it, else py-cpuinfo's figures, marked."""
    caches = facts.get("caches")
    if caches:
        return " / ".join(_cache_size(caches.get(k)) for k in ("L1d", "L2", "L3")) + " (sysfs, CPU 0)"
    # runs before the sysfs record: py-cpuinfo's sizes, which can sum or misread caches on a VM
    sizes = " / ".join(_cache_size(cpu.get(k)) for k in ("l1_data_cache_size", "l2_cache_size", "l3_cache_size"))
    return f"{sizes} (py-cpuinfo's figures, not checked)"


def machine_section(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    facts = mi.get("lrmath_bench", {})
    cpu = mi.get("cpu", {})
    commit = data.get("commit_info", {})
    load = facts.get("loadavg_at_start")
    rows = [
        ("CPU model", facts.get("cpu_model") or cpu.get("brand_raw")),
        ("Sockets x cores per socket x threads per core",
         f"{facts.get('sockets')} x {facts.get('cores_per_socket')} x {facts.get('threads_per_core')}"),
        ("Logical CPUs (usable by this process)", f"{facts.get('logical_cpus')} ({facts.get('usable_cpus')})"),
        ("Clock (advertised)", cpu.get("hz_advertised_friendly")),
        ("Caches L1d / L2 / L3", caches_text(facts, cpu)),
        ("Hypervisor", facts.get("hypervisor")),
        ("Memory", f"{facts.get('memory_gib')} GiB"),
        ("Threads per side (BLAS, OpenMP, torch)", facts.get("bench_threads")),
        ("Load average at start (1, 5, 15 min)",
         ", ".join(f"{x:.2f}" for x in load) if load else None),
        ("Load average at end (1, 5, 15 min)",
         ", ".join(f"{x:.2f}" for x in facts["loadavg_at_end"]) if facts.get("loadavg_at_end") else None),
        ("lrmath sources", source_text(facts)),
        ("CUDA device", facts.get("cuda_device") or "none (CUDA parameters skipped)"),
        ("Python / numpy / scipy / scikit-learn / torch",
         " / ".join(str(facts.get(k)) for k in ("python", "numpy", "scipy", "sklearn", "torch"))),
        ("OS", f"{mi.get('system')} {mi.get('release')}"),
        ("Commit", f"{commit.get('id', '?')[:12]}{' (dirty tree)' if commit.get('dirty') else ''}"
                   f" on {commit.get('branch', '?')}"),
        ("JSON written (end of the run)", data.get("datetime")),
        ("Sizes", "full (LRMATH_BENCH_FULL=1)" if facts.get("full_mode") else
         "SMALL (smoke sizes: not the issue's sizes)"),
    ]
    out = ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {md_escape(v)} |" for k, v in rows]
    return out + [""]


def comparison_table(name: str, items: list[dict]) -> tuple[list[str], list[tuple]]:
    baseline = next((b for b in items if b["extra_info"].get("role") == "baseline"), None)
    floor = next((b for b in items if b["extra_info"].get("role") == "floor"), None)
    first = items[0]["extra_info"]
    out = [f"### {md_escape(name)}", "",
           f"device {md_escape(first.get('device'))}, input shape {first.get('shape')}, "
           f"threads per side {first.get('threads', {}).get('requested')}", "",
           "| side | role | backend | dtype | median | IQR | rounds x iter "
           "| speedup vs baseline (IQR range) | throughput | checks |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    goals = []
    for b in baseline_first(items, baseline):
        e, s = b["extra_info"], stats_of(b)
        ratio = ratio_cell(b, baseline)
        thr = "-"
        if e.get("items"):
            thr = f"{e['items'] / s['median']:.3g} {e.get('items_unit', 'items')}/s"
        out.append(f"| {md_escape(e.get('label', b['name']))} | {e.get('role')} | {e.get('backend')} "
                   f"| {md_escape(e.get('dtype'))} "
                   f"| {fmt_time(s['median'])} | {fmt_time(s['iqr'])} | {s['rounds']} x {s['iterations']} "
                   f"| {ratio} | {thr} | {md_escape(checks_text(e))} |")
        if e.get("goal"):
            shown, status = evaluate_goal(e["goal"], b, baseline, floor)
            goals.append((name, e.get("label", b["name"]), e["goal"]["text"], shown, status))
    return out + [""], goals


def sweep_table(name: str, items: list[dict]) -> list[str]:
    items = sorted(items, key=lambda b: b["extra_info"]["sweep"]["size"])
    param = items[0]["extra_info"]["sweep"]["param"]
    points = [(b["extra_info"]["sweep"]["size"], stats_of(b)["median"]) for b in items]
    steps, fit = growth_exponents(points)
    out = [f"### {md_escape(name)}", "",
           f"| {param} | median | IQR | rounds x iter | time / {param} | exponent vs previous size | checks |",
           "|---|---|---|---|---|---|---|"]
    for b, step in zip(items, steps):
        e, s = b["extra_info"], stats_of(b)
        size = e["sweep"]["size"]
        out.append(f"| {size} | {fmt_time(s['median'])} | {fmt_time(s['iqr'])} | {s['rounds']} x {s['iterations']} "
                   f"| {fmt_time(s['median'] / size)} | {'-' if step is None else f'{step:.2f}'} "
                   f"| {md_escape(checks_text(e))} |")
    out += ["", f"Least-squares growth exponent over the sweep: "
                f"**{'-' if fit is None else f'{fit:.2f}'}** (time ~ {param}^exponent).", ""]
    return out


def not_measured(data: dict) -> list[str]:
    """What the suites define but this run could not time (skipped tests leave no JSON entry)."""
    facts = data.get("machine_info", {}).get("lrmath_bench", {})
    missing = []
    has_e2e = any(is_e2e(b) for b in data.get("benchmarks", []))
    if not facts.get("cuda_device"):
        missing.append("All CUDA parameters (no CUDA device): batched `pca_truncate` vs a per-head "
                       "`torch.linalg.eigh` loop (goal >= 3x), `Moments.update` on the GPU, and "
                       "`whitened_svd` vs SVD-LLM on the GPU, including 4,096 x 11,008"
                       + (", and the end-to-end benchmarks on CUDA" if has_e2e else "")
                       + ". Their goals are **not evaluated** here.")
    if not has_e2e:
        missing.append("End to end (`benchmarks/test_bench_e2e.py`: compression time vs the dense "
                       "forward, compressed vs dense SmolLM2-135M): not part of this run.")
    if facts.get("full_mode") and not facts.get("huge_cpu"):
        missing.append("`whitened_svd` at 4,096 x 11,008 on the CPU (minutes per call on this machine; "
                       "`LRMATH_BENCH_HUGE=1` runs it).")
    if not missing:
        return []
    return ["## Not measured in this run", ""] + [f"* {m}" for m in missing] + [""]


def render(data: dict, source: str, command: str = FULL_COMMAND, title: str = "Benchmarks") -> str:
    groups = group_benchmarks(data.get("benchmarks", []))
    lines = [f"# {title}", "",
             f"<!-- generated by scripts/bench_report.py from {source}; do not edit by hand -->", "",
             "Generated from pytest-benchmark's JSON by `scripts/bench_report.py`; every number below "
             "comes from one run of the command:", "", "```bash", command, "```", "",
             "CI runs the same modules in smoke mode (`--benchmark-disable`, small sizes): each "
             "benchmarked function runs once and every answer check still runs.", ""]
    lines += machine_section(data)
    lines += ["## Method", "",
              "* Both sides of a comparison get the same inputs; every answer is checked against the "
              "baseline's (or an independent reference) inside the benchmark module, outside the timer.",
              "* One warm-up call, then timed rounds chosen so that a benchmark takes about "
              f"{data.get('machine_info', {}).get('lrmath_bench', {}).get('budget_s', '?')} s "
              "(at least 5; the tables give rounds x iterations); calls under 2 ms are batched into "
              "iterations per round.",
              "* Tables show the median and the interquartile range (IQR). *Speedup* = baseline median "
              "/ this median, measured side by side in this run; the range in brackets pairs the "
              "quartiles the unfavourable and the favourable way (baseline q1 / this q3 .. baseline "
              "q3 / this q1).",
              "* BLAS / OpenMP / torch threads are pinned to the same count for every side "
              "(`LRMATH_BENCH_THREADS`); CUDA work is synchronised inside the timed call.",
              "* The machine is shared with other jobs; the load average is recorded before and after "
              "each benchmark in the JSON (`extra_info.loadavg_*`).", ""]

    comparison, sweeps, all_goals = [], [], []
    for name, items in groups.items():
        if any(is_e2e(b) for b in items):
            continue  # rendered in the End to end section
        if any("sweep" in b["extra_info"] for b in items):
            sweeps += sweep_table(name, items)
        else:
            table, goals = comparison_table(name, items)
            comparison += table
            all_goals += goals

    end_to_end = e2e_section(data.get("benchmarks", []), all_goals)

    lines += ["## Goals", ""]
    if all_goals:
        lines += ["| group | candidate | goal | measured | status |", "|---|---|---|---|---|"]
        lines += [f"| {md_escape(g)} | {md_escape(c)} | {md_escape(t)} | {md_escape(m)} | {s} |"
                  for g, c, t, m, s in all_goals]
        missed = sum("MISSED" in g[4] for g in all_goals)
        lines += ["", f"{len(all_goals) - missed} of {len(all_goals)} goals met in this run; "
                      f"{missed} missed." if missed else f"All {len(all_goals)} goals met in this run."]
    else:
        lines += ["No goals were recorded in this run."]
    lines += [""] + not_measured(data)
    lines += end_to_end
    if comparison:
        lines += ["## Comparisons", ""] + comparison
    if sweeps:
        lines += ["## Scaling", ""] + sweeps
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--output", default="docs/benchmarks.md", help="page to write")
    parser.add_argument("--command", default=FULL_COMMAND,
                        help="the command that produced the JSON, as the page should state it (default: the full run)")
    parser.add_argument("--title", default="Benchmarks")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    if not data.get("benchmarks"):
        print(f"{args.json}: no benchmarks (was --benchmark-enable given?)", file=sys.stderr)
        return 1
    Path(args.output).write_text(render(data, Path(args.json).as_posix(), args.command, args.title))
    print(f"wrote {args.output} ({len(data['benchmarks'])} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
