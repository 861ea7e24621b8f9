"""End-to-end tables of the benchmark report (compression time, compressed vs dense model).

Separate from ``bench_report.py`` because these tables read the ``extra_info["e2e"]``
records of ``benchmarks/test_bench_e2e.py`` only; ``bench_report.py`` places them on the page.
"""

from __future__ import annotations

from bench_format import (baseline_first, evaluate_goal, fmt_bytes, fmt_count, fmt_ratio, fmt_time,
                          group_benchmarks, md_escape, ratio_cell, stats_of)


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
    return "-" if bench is None or baseline is None else ratio_cell(bench, baseline)


def _pairs_text(pairs: dict | None) -> str:
    """Median of the per-round time ratios of interleaved pairs (``paired_rounds``), and their IQR."""
    if not pairs:
        return "-"
    return f"{fmt_ratio(pairs['speedup'])} ({fmt_ratio(pairs['q1'])}-{fmt_ratio(pairs['q3'])})"


def _paired_cell(bench: dict | None) -> str:
    """The dense/compressed pairs of a benchmark."""
    return _pairs_text((bench or {}).get("extra_info", {}).get("paired"))


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
    for b in baseline_first(items, baseline):
        e, s = b["extra_info"], stats_of(b)
        rel = ratio_cell(b, baseline, invert=True)
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
           "compressed once, outside the timers; the dense model is timed in the same run.", ""]
    paired = any(b["extra_info"].get("paired") for b in items)
    if paired:
        n_pairs = sorted({b["extra_info"]["paired"]["rounds"] for b in items if b["extra_info"].get("paired")})
        out += ["*Sequential*: tokens/s and speedup from pytest-benchmark's rounds, each model's "
                "rounds one after the other (a change in the machine's load between them passes for "
                "speed). *Pairs*: after those rounds, the dense and the compressed model timed back to "
                f"back in {'/'.join(map(str, n_pairs))} rounds, the order reversed every other round; "
                "the median of the per-round ratios dense time / compressed time, and in brackets "
                "their quartiles. The goals are judged on the pairs.", ""]
    out += ["| model | linears removed | parameters (all / decoder linears) | model.safetensors "
            "| peak memory prefill / decode | prefill tokens/s | prefill speedup (IQR range) "
            + ("| prefill speedup, pairs (IQR) " if paired else "")
            + "| decode tokens/s | decode speedup (IQR range) "
            + ("| decode speedup, pairs (IQR) " if paired else "")
            + "| goal: speedup >= | prefill goal | decode goal |",
            "|---" * (14 if paired else 12) + "|"]
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
                   + (f"| {_paired_cell(p)} " if paired else "")
                   + f"| {_tokens_per_s(d) if d else '-'} | {_speedup_cell(d, base.get('decode'))} "
                   + (f"| {_paired_cell(d)} " if paired else "")
                   + f"| {md_escape(goal)} | {statuses[0]} | {statuses[1]} |")
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


def _layout_cell(bench: dict | None) -> str:
    """The same-layout pairs of a benchmark (``extra_info["layout"]``)."""
    return _pairs_text(((bench or {}).get("extra_info", {}).get("layout") or {}).get("paired"))


def e2e_layout_table(items: list[dict]) -> list[str]:
    """Speedups with ``lrmath_hf.tune_decode_layout`` applied to both sides of each pair (no goals)."""
    rows: dict = {}
    for b in items:
        if b["extra_info"].get("layout"):
            rows.setdefault(b["extra_info"]["e2e"].get("ratio"), {})[b["extra_info"]["e2e"]["kind"]] = b
    if not rows:
        return []
    n_pairs = sorted({b["extra_info"]["layout"]["paired"]["rounds"] for r in rows.values() for b in r.values()})
    out = ["#### The same measured weight layout on both sides", "",
           "`lrmath_hf.tune_decode_layout` lays out each linear weight (standard or transposed) the way "
           "its one-token product ran faster on this device; it speeds up the dense model too, so the "
           "goals above stay judged on the stock models. Dense row: the tuned dense model against the "
           "stock one. Other rows: each compressed model, tuned, against the tuned dense model, i.e. "
           "what compression adds once both have the layout. Median of the per-round time ratios over "
           f"{'/'.join(map(str, n_pairs))} interleaved rounds, and in brackets their quartiles. "
           "Predicted: the isolated one-token timings of all weights added, standard layout -> chosen.", "",
           "| model | pairs against | weights transposed | predicted one-token products | prefill speedup, "
           "pairs (IQR) | decode speedup, pairs (IQR) | decode vs 0.8 x parameter ratio |",
           "|---|---|---|---|---|---|---|"]
    for ratio in sorted(rows, key=lambda r: -1.0 if r is None else r):
        p, d = rows[ratio].get("prefill"), rows[ratio].get("decode")
        e = (p or d)["extra_info"]
        lay = e["layout"]
        model = "dense" if ratio is None else f"{e['e2e'].get('recipe')} {ratio}"
        predicted = (f"{fmt_time(lay['predicted_standard_s'])} -> {fmt_time(lay['predicted_chosen_s'])}")
        verdict = "-"
        if d is not None and e.get("goal"):
            target = float(e["goal"]["target"])
            verdict = (f"{'met' if d['extra_info']['layout']['paired']['speedup'] >= target else 'below'} "
                       f"({fmt_ratio(target)})")
        out.append(f"| {md_escape(model)} | {md_escape(lay['against'])} | {lay['transposed']} / {lay['weights']} "
                   f"| {predicted} | {_layout_cell(p)} | {_layout_cell(d)} | {verdict} |")
    return out + [""]


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
            out += e2e_layout_table(inference)
    return out
