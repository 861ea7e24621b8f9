"""What ``lrmath compress`` and ``lrmath eval`` measure of a model, and the tables they print.

Parameters, perplexity and tokens/s; by default the dense and the compressed model
are timed in the same rounds (:func:`lrmath_hf.evaluate.throughput_interleaved`).
With ``--tune-layout`` every timed model, dense included, first gets
:func:`lrmath_hf.tune_decode_layout` (strides only; the saved files do not change).
"""

from __future__ import annotations

__all__ = ["measure", "paired", "paired_speed", "table", "ratio_table"]


def _speed_options(tokenizer, eval_windows, args) -> tuple:
    prompt = eval_windows[0][None] if eval_windows is not None else tokenizer
    return prompt, dict(prefill_tokens=min(512, args.seq_len), decode_tokens=64, repeats=3)


def _speed_fields(result, args) -> dict:
    return {"prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
            "speed_layout": "tuned" if args.tune_layout else "stock"}


def _tune(models, args) -> None:
    """``--tune-layout``: every timed model gets the measured decode layout (one timing cache per run)."""
    if not args.tune_layout:
        return
    from .layout import tune_decode_layout

    timings = vars(args).setdefault("layout_timings", {})
    for model in models:
        report = tune_decode_layout(model, timings=timings, progress=not args.quiet)
        if not args.quiet:
            print(f"layout: {report.summary()}")


def measure(model, tokenizer, eval_windows, args, *, speed: bool = True) -> dict:
    from .evaluate import perplexity, throughput
    from .modules import count_parameters

    out = {"parameters": count_parameters(model)}
    if eval_windows is not None:
        out["perplexity"] = perplexity(model, eval_windows, progress=not args.quiet)
    if speed and not args.no_speed:
        prompt, options = _speed_options(tokenizer, eval_windows, args)
        _tune([model], args)
        out.update(_speed_fields(throughput(model, prompt, **options), args))
    return out


def paired(args) -> bool:
    """Time dense and compressed interleaved (the default), not one after the other."""
    return not args.no_speed and not args.sequential_speed


def paired_speed(dense, compressed, tokenizer, eval_windows, args) -> tuple[dict, dict]:
    """Speed fields of ``dense`` and ``compressed``, timed round by round in alternating order."""
    from .evaluate import throughput_interleaved

    prompt, options = _speed_options(tokenizer, eval_windows, args)
    _tune([dense, compressed], args)
    if not args.quiet:
        print("timing dense and compressed interleaved ...")
    both = throughput_interleaved({"dense": dense, "compressed": compressed}, prompt, **options)
    return {**_speed_fields(both["dense"], args), "speed_timing": "interleaved"}, \
        {**_speed_fields(both["compressed"], args), "speed_timing": "interleaved"}


_TEXT_ROWS = [("parameters", "{:,}"), ("perplexity", "{:.2f}"), ("prefill_tokens_per_s", "{:.0f}"),
              ("decode_tokens_per_s", "{:.1f}"), ("file_bytes", "{:,}")]


def table(before: dict, after: dict, *, rows=None) -> str:
    """Dense, compressed and their ratio for each ``(key, format)`` of ``rows`` that both measured."""
    rows = _TEXT_ROWS if rows is None else rows
    lines = [f"{'':24}{'dense':>16}{'compressed':>16}{'ratio':>9}"]
    for key, fmt in rows:
        if key in before and key in after:
            ratio = after[key] / before[key] if before[key] else float("nan")
            lines.append(f"{key:24}{fmt.format(before[key]):>16}{fmt.format(after[key]):>16}{ratio:>9.3f}")
    return "\n".join(lines)


def ratio_table(dense: dict, rows: list[dict], *, cols=None) -> str:
    """One line for the dense model and one per ratio; ``cols`` = ``(title, row -> text)`` pairs."""
    cols = cols or [("removed", lambda r: f"{100 * r['ratio_achieved']:.1f}%" if "ratio_achieved" in r else "-"),
            ("parameters", lambda r: f"{r['parameters']:,}"),
            ("file MB", lambda r: f"{r['file_bytes'] / 1e6:.2f}" if "file_bytes" in r else "-"),
            ("perplexity", lambda r: f"{r['perplexity']:.2f}" if "perplexity" in r else "-"),
            ("prefill tok/s", lambda r: f"{r['prefill_tokens_per_s']:.0f}" if "prefill_tokens_per_s" in r else "-"),
            ("decode tok/s", lambda r: f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "-")]
    lines = [f"{'ratio':<8}" + "".join(f"{c:>15}" for c, _ in cols)]
    for label, row in [("dense", dense)] + [(f"{r['ratio_requested']:g}", r) for r in rows]:
        lines.append(f"{label:<8}" + "".join(f"{fmt(row):>15}" for _, fmt in cols))
    return "\n".join(lines)
