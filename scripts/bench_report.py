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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FULL_COMMAND = ("LRMATH_BENCH_FULL=1 nice -n 10 .venv/bin/python -m pytest benchmarks "
                "--benchmark-enable --benchmark-json=runs/bench.json && "
                ".venv/bin/python scripts/bench_report.py runs/bench.json")

# extra_info keys that record an answer check, shown next to the timings
CHECK_KEYS = (
    "covariance_rel_err", "shrinkage_abs_err", "gram_rel_err", "projector_max_err",
    "eigenvalues_rel_err", "dropped_rel_err", "error_ratio", "excess_over_optimum",
    "orthonormality_err", "objective_rel_err", "max_abs_err_vs_bisection",
    "dropped_rel_err_vs_optimum", "certified_gap",
)


# ------------------------------------------------------------------ formatting
def fmt_time(seconds: float) -> str:
    """Seconds with a unit that keeps 3-4 significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_num(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0.0:
            return "0"
        if 1e-3 <= abs(x) < 1e4:
            return f"{x:.4g}"
        return f"{x:.2e}"
    return str(x)


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def fmt_bytes(n) -> str:
    """Bytes in binary units, 3-4 significant digits."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def fmt_count(n) -> str:
    """A parameter count: ``134.5M``, ``90.43k``."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


# -------------------------------------------------------------------- analysis
def stats_of(bench: dict) -> dict:
    s = bench["stats"]
    return {"median": s["median"], "q1": s["q1"], "q3": s["q3"], "iqr": s["iqr"],
            "rounds": s["rounds"], "iterations": s.get("iterations", 1), "min": s["min"]}


def speedup(baseline: dict, bench: dict) -> tuple[float, float, float]:
    """Median ratio baseline / candidate, and a conservative range from the quartiles.

    The range ``[b_q1 / c_q3, b_q3 / c_q1]`` pairs the fast quartile of one side
    with the slow quartile of the other: if the goal lies inside it, this run
    does not resolve the comparison.
    """
    b, c = stats_of(baseline), stats_of(bench)
    return b["median"] / c["median"], b["q1"] / c["q3"], b["q3"] / c["q1"]


def evaluate_goal(goal: dict, bench: dict, baseline: dict | None, floor: dict | None = None):
    """``(measured value, status text)`` for a goal declared in ``extra_info``.

    With a ``floor`` side in the group, a speedup goal also shows the floor's
    speedup: the most that any candidate containing that operation can reach.
    """
    metric, op, target = goal["metric"], goal["op"], float(goal["target"])
    if metric == "speedup":
        if baseline is None:
            return None, "no baseline in this run"
        value, low, high = speedup(baseline, bench)
        shown = f"{fmt_ratio(value)} (IQR range {fmt_ratio(low)}-{fmt_ratio(high)})"
    else:
        value = bench["extra_info"].get(metric)
        if value is None:
            return None, f"{metric} not recorded"
        low = high = value
        shown = fmt_check(metric, value)
    met = value >= target if op == ">=" else value <= target
    status = "met" if met else "**MISSED**"
    if metric == "speedup" and low <= target <= high:
        status += " (goal inside the quartile range: not resolved by this run)"
    if metric == "speedup" and floor is not None:
        status += f" (bound in this run, {md_escape(floor['extra_info'].get('label', 'floor'))}: " \
                  f"{fmt_ratio(speedup(baseline, floor)[0])})"
    return shown, status


def growth_exponents(points: list[tuple[float, float]]) -> tuple[list[float | None], float | None]:
    """Slopes of log(time) vs log(size) between consecutive sizes, and the least-squares slope."""
    points = sorted(points)
    steps = [None]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        steps.append(math.log(t1 / t0) / math.log(s1 / s0) if s1 != s0 else None)
    if len(points) < 2:
        return steps, None
    xs = [math.log(s) for s, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else None
    return steps, fit


def group_benchmarks(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    return groups


def fmt_check(key: str, value) -> str:
    """A check value; ratios near 1 show their distance from 1 (``1-2.1e-11``), which is the news."""
    if key == "error_ratio" and isinstance(value, float) and abs(value - 1.0) < 1e-3:
        return f"1{value - 1.0:+.2e}"
    return fmt_num(value)


def checks_text(extra: dict) -> str:
    parts = [f"{k}={fmt_check(k, extra[k])}" for k in CHECK_KEYS if k in extra]
    return "; ".join(parts) if parts else "-"


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
        ("Caches L1d / L2 / L3", " / ".join(
            f"{cpu[k] // 1024} KiB" if isinstance(cpu.get(k), int) else "?"
            for k in ("l1_data_cache_size", "l2_cache_size", "l3_cache_size"))),
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
    ordered = ([baseline] if baseline else []) + [b for b in items if b is not baseline]
    for b in ordered:
        e, s = b["extra_info"], stats_of(b)
        if baseline is None:
            ratio = "no baseline"
        elif b is baseline:
            ratio = "1.00x (baseline)"
        else:
            v, lo, hi = speedup(baseline, b)
            ratio = f"{fmt_ratio(v)} ({fmt_ratio(lo)}-{fmt_ratio(hi)})"
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


# ----------------------------------------------------------------- end to end
def is_e2e(bench: dict) -> bool:
    return "e2e" in bench.get("extra_info", {})


def _e2e_goal(bench: dict, baseline: dict | None, goals: list, group: str) -> str:
    """Status of a candidate's goal (collected for the Goals table too)."""
    e = bench["extra_info"]
    if not e.get("goal"):
        return "-"
    shown, status = evaluate_goal(e["goal"], bench, baseline)
    goals.append((group, e.get("label", bench["name"]), e["goal"]["text"], shown, status))
    return _short_status(status)


def _short_status(status: str) -> str:
    return status.replace(" (goal inside the quartile range: not resolved by this run)",
                          " (unresolved: goal inside the IQR range)")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _tokens_per_s(bench: dict) -> str:
    """Median tokens/s and the range from the timing quartiles."""
    e, s = bench["extra_info"], stats_of(bench)
    n = e.get("items")
    if not n:
        return "-"
    return f"{fmt_rate(n / s['median'])} ({fmt_rate(n / s['q3'])}-{fmt_rate(n / s['q1'])})"


def _speedup_cell(bench: dict | None, baseline: dict | None) -> str:
    if bench is None or baseline is None:
        return "-"
    if bench is baseline:
        return "1.00x (baseline)"
    v, lo, hi = speedup(baseline, bench)
    return f"{fmt_ratio(v)} ({fmt_ratio(lo)}-{fmt_ratio(hi)})"


def e2e_compress_table(name: str, items: list[dict], goals: list) -> list[str]:
    """Calibration + compression time per recipe against the dense forward over the same tokens."""
    baseline = next((b for b in items if b["extra_info"].get("role") == "baseline"), None)
    first = items[0]["extra_info"]
    info = first["e2e"]
    rounds = sorted({stats_of(b)["rounds"] for b in items})
    warm = first.get("warmup_windows")
    out = [f"### Calibration + compression vs the dense forward ({md_escape(first.get('backend'))})", "",
           f"{md_escape(info.get('model_description') or info.get('model'))}; device "
           f"{md_escape(first.get('device'))}, {md_escape(first.get('dtype'))}, attention "
           f"{md_escape(info.get('attn_implementation'))}; {info.get('calibration_windows')} x "
           f"{info.get('seq_len')} calibration tokens, ratio {info.get('ratio')}. Every side runs "
           f"over the same windows; each round compresses a fresh copy of the dense model made "
           f"outside the timer. {'/'.join(map(str, rounds))} timed rounds per side"
           + (f" after a warm-up over {warm} windows" if warm else "")
           + " (each round is a full pass over the calibration data, hence fewer rounds than "
             "elsewhere on this page). Baseline: "
           + md_escape(baseline["extra_info"].get("label") if baseline else "none in this run") + ".", "",
           "| side | median | IQR | rounds | time / dense forward (IQR range) | goal | "
           "linears removed | calibration / decisions / surgery (last round) | top-1 agreement with dense |",
           "|---|---|---|---|---|---|---|---|---|"]
    ordered = ([baseline] if baseline else []) + [b for b in items if b is not baseline]
    for b in ordered:
        e, s = b["extra_info"], stats_of(b)
        if baseline is None:
            rel = "no baseline"
        elif b is baseline:
            rel = "1.00x (baseline)"
        else:
            v, lo, hi = speedup(baseline, b)
            rel = f"{fmt_ratio(1 / v)} ({fmt_ratio(1 / hi)}-{fmt_ratio(1 / lo)})"
        status = _e2e_goal(b, baseline, goals, name)
        if e.get("goal") and status != "-":
            status = f"<= {1 / float(e['goal']['target']):.3g}x: {status}"
        phases = e.get("compress_timings") or {}
        phase_text = (" / ".join(fmt_time(phases[k]) for k in ("calibration", "decisions", "surgery")
                                 if k in phases) or "-")
        side = e["e2e"].get("recipe") or "dense forward"
        removed = "-" if e.get("ratio_achieved") is None else f"{100 * e['ratio_achieved']:.1f}%"
        agree = "-" if e.get("top1_agreement_vs_dense") is None else f"{e['top1_agreement_vs_dense']:.3f}"
        out.append(f"| {md_escape(side)} | {fmt_time(s['median'])} | {fmt_time(s['iqr'])} | {s['rounds']} "
                   f"| {rel} | {status} | {removed} | {phase_text} | {agree} |")
    return out + [""]


def e2e_inference_table(backend: str, items: list[dict], goals: list) -> list[str]:
    """One row per model (dense, then each ratio): size, memory, prefill and decode speed."""
    by_kind: dict[str, dict] = {"prefill": {}, "decode": {}}
    groups: dict[str, str] = {}
    for b in items:
        kind = b["extra_info"]["e2e"]["kind"]
        by_kind[kind][b["extra_info"]["e2e"].get("ratio")] = b
        groups[kind] = b.get("group") or b["name"]
    base = {k: v.get(None) for k, v in by_kind.items()}
    ratios = sorted({r for v in by_kind.values() for r in v if r is not None})
    any_b = next(iter(items))
    e0, i0 = any_b["extra_info"], any_b["extra_info"]["e2e"]
    recipe = next((b["extra_info"]["e2e"].get("recipe") for b in items if b["extra_info"]["e2e"].get("recipe")),
                  "?")
    pre = next(iter(by_kind["prefill"].values()), None)
    dec = next(iter(by_kind["decode"].values()), None)
    pre_shape = pre["extra_info"].get("shape") if pre else None
    dec_info = dec["extra_info"] if dec else {}
    out = [f"### Compressed vs dense, recipe {md_escape(recipe)} ({md_escape(backend)})", "",
           f"{md_escape(i0.get('model_description') or i0.get('model'))}; device {md_escape(e0.get('device'))}, "
           f"{md_escape(e0.get('dtype'))}, attention {md_escape(i0.get('attn_implementation'))}. "
           f"Prefill: one forward over a {pre_shape[0] if pre_shape else '?'} x "
           f"{pre_shape[1] if pre_shape else '?'} prompt filling a fresh KV cache. Decode: greedy "
           f"`generate` of {dec_info.get('items', '?')} new tokens with the KV cache from a "
           f"{dec_info.get('e2e', {}).get('prompt_tokens', '?')}-token prompt (its prefill included). "
           "Tokens/s: median, and in brackets the range from the timing quartiles. Each model is "
           "compressed once, outside the timers; the dense model is timed in the same run.", "",
           "| model | linears removed | parameters (all / decoder linears) | model.safetensors "
           "| peak memory prefill / decode | prefill tokens/s | prefill speedup (IQR range) "
           "| decode tokens/s | decode speedup (IQR range) | goal: speedup >= | prefill goal | decode goal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in [None] + ratios:
        p, d = by_kind["prefill"].get(ratio), by_kind["decode"].get(ratio)
        some = p or d
        e = some["extra_info"]
        model = "dense" if ratio is None else f"{e['e2e'].get('recipe')} {ratio}"
        removed = "-" if e.get("ratio_achieved") is None else (
            f"{100 * e['ratio_achieved']:.1f}% (model {100 * e.get('model_ratio_achieved', 0):.1f}%)")
        params = f"{fmt_count(e.get('params_model'))} / {fmt_count(e.get('params_linear'))}"
        memory = (f"{fmt_bytes(p['extra_info'].get('peak_memory_bytes')) if p else '-'} / "
                  f"{fmt_bytes(d['extra_info'].get('peak_memory_bytes')) if d else '-'}")
        goal = "-"
        if e.get("goal"):
            target = float(e["goal"]["target"])
            factor = e.get("speedup_factor")
            params_ratio = (e["params_model_dense"] / e["params_model"]
                            if e.get("params_model_dense") and e.get("params_model") else None)
            goal = fmt_ratio(target) + (f" ({factor} x {params_ratio:.3f})" if factor and params_ratio else "")
        statuses = [_e2e_goal(b, base.get(kind), goals, groups.get(kind, kind)) if b else "-"
                    for kind, b in (("prefill", p), ("decode", d))]
        out.append(f"| {md_escape(model)} | {removed} | {params} | {fmt_bytes(e.get('file_bytes'))} | {memory} "
                   f"| {_tokens_per_s(p) if p else '-'} | {_speedup_cell(p, base.get('prefill'))} "
                   f"| {_tokens_per_s(d) if d else '-'} | {_speedup_cell(d, base.get('decode'))} "
                   f"| {md_escape(goal)} | {statuses[0]} | {statuses[1]} |")
    methods = sorted({b["extra_info"].get("memory_method") for b in items if b["extra_info"].get("memory_method")})
    writer = i0.get("file_writer")
    out += ["", "Parameters: all distinct model parameters (tied embeddings once) / the decoder linears "
                "q, k, v, o, gate, up, down (both factors of a factorised linear). "
            + (f"File size: `model.safetensors` written by {md_escape(writer)}. " if writer else "")
            + "".join(f"Goal: speedup >= {f} x (dense parameters / compressed parameters), all "
                      "parameters counted. " for f in sorted({b["extra_info"]["speedup_factor"] for b in items
                                                               if b["extra_info"].get("speedup_factor")}))
            + "Peak memory: weights (parameters + buffers) + the peak extra memory of one call above "
              "what was in use before it"
            + (f" ({md_escape('; '.join(methods))})" if methods else "") + ".", ""]
    return out


def e2e_section(benchmarks: list[dict], goals: list) -> list[str]:
    """The end-to-end tables, per backend."""
    e2e = [b for b in benchmarks if is_e2e(b)]
    if not e2e:
        return []
    out = ["## End to end", ""]
    if not any(b["extra_info"].get("full_mode") for b in e2e):
        out += ["**Smoke sizes**: a tiny random model, not SmolLM2-135M; these numbers only show that "
                "the benchmark runs.", ""]
    backends = list(dict.fromkeys(b["extra_info"].get("backend") for b in e2e))
    for backend in backends:
        compress = group_benchmarks([b for b in e2e if b["extra_info"].get("backend") == backend
                                     and b["extra_info"]["e2e"]["kind"] == "compress"])
        for name, items in compress.items():
            out += e2e_compress_table(name, items, goals)
        inference = [b for b in e2e if b["extra_info"].get("backend") == backend
                     and b["extra_info"]["e2e"]["kind"] in ("prefill", "decode")]
        if inference:
            out += e2e_inference_table(backend, inference, goals)
    return out


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
