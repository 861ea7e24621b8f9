"""Formatting and statistics helpers shared by the benchmark report scripts.

Separate from ``bench_report.py`` (page layout, CLI) and ``bench_report_e2e.py``
(end-to-end tables) so that both can use the same number formatting, medians,
speedup ranges and goal evaluation without importing each other.
"""

from __future__ import annotations

import math

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


def baseline_first(items: list[dict], baseline: dict | None) -> list[dict]:
    """The group's sides with the baseline (if any) first, the others in run order."""
    return ([baseline] if baseline else []) + [b for b in items if b is not baseline]


def ratio_cell(bench: dict, baseline: dict | None, *, invert: bool = False) -> str:
    """``speedup (IQR range)`` of ``bench`` over ``baseline``; ``invert`` gives time / baseline time."""
    if baseline is None:
        return "no baseline"
    if bench is baseline:
        return "1.00x (baseline)"
    v, lo, hi = speedup(baseline, bench)
    if invert:
        v, lo, hi = 1 / v, 1 / hi, 1 / lo
    return f"{fmt_ratio(v)} ({fmt_ratio(lo)}-{fmt_ratio(hi)})"


def evaluate_goal(goal: dict, bench: dict, baseline: dict | None, floor: dict | None = None):
    """``(measured value, status text)`` for a goal declared in ``extra_info``.

    With a ``floor`` side in the group, a speedup goal also shows the floor's
    speedup: the most that any candidate containing that operation can reach.
    A ``paired_speedup`` goal reads ``extra_info["paired"]`` (the median and
    quartiles of per-round ratios from ``_harness.paired_rounds``) instead of
    the ratio of the two sides' separately timed medians.
    """
    metric, op, target = goal["metric"], goal["op"], float(goal["target"])
    if metric == "speedup":
        if baseline is None:
            return None, "no baseline in this run"
        value, low, high = speedup(baseline, bench)
        shown = f"{fmt_ratio(value)} (IQR range {fmt_ratio(low)}-{fmt_ratio(high)})"
    elif metric == "paired_speedup":
        pairs = bench["extra_info"].get("paired")
        if not pairs:
            return None, "interleaved pairs not recorded"
        value, low, high = pairs["speedup"], pairs["q1"], pairs["q3"]
        shown = f"{fmt_ratio(value)} (IQR {fmt_ratio(low)}-{fmt_ratio(high)}, {pairs['rounds']} pairs)"
    else:
        value = bench["extra_info"].get(metric)
        if value is None:
            return None, f"{metric} not recorded"
        low = high = value
        shown = fmt_check(metric, value)
    met = value >= target if op == ">=" else value <= target
    status = "met" if met else "**MISSED**"
    if metric in ("speedup", "paired_speedup") and low <= target <= high:
        status += " (goal inside the quartile range: not resolved by this run)"
    if metric == "speedup" and floor is not None:
        status += f" (the floor side alone: {fmt_ratio(speedup(baseline, floor)[0])})"
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

