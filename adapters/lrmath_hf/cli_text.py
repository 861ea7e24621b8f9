"""``lrmath compress`` / ``lrmath eval`` for decoders: text in; perplexity, size and tokens/s out.

``lrmath compress smollm2-135m --recipe auto --ratio 0.2 --out runs/smollm2-20``
loads the registry-shipped model, measures it, compresses it on the bundled
calibration text, measures it again, and writes a loadable folder with
``report.json`` and plots.  With several ratios (``--ratio 0.1 0.2 0.3``) the dense
model is measured and calibrated once, and ``--out`` holds one loadable folder per
ratio (``ratio-0.10/`` ...), ``summary.json`` and ``perplexity_vs_ratio.png``.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path

from .cli_common import CLIError, publish, ratio_folder, report_model, shared_statistics, staged
from .cli_common import save_folder as _save  # module-level name: a test interrupts a sweep through it
from .cli_measure import measure, paired, paired_speed, ratio_table, table

__all__ = ["compress_decoder", "eval_decoder"]


def _load(name: str, device, *, need_tokenizer: bool = True):
    """Model (on ``device``) and tokenizer of a zoo name, saved folder or hub id."""
    from . import zoo

    if Path(name).is_dir() and (Path(name) / "manifest.json").exists():
        from .io import load_compressed

        model = load_compressed(name, device=device)
        _require_decoder(model, name)
        return model, _folder_tokenizer(Path(name)) if need_tokenizer else None
    if name not in zoo.list_models() and not Path(name).exists() and "/" not in name:
        raise CLIError(f"unknown model {name!r}: use one of {', '.join(zoo.list_models())}, "
                       "a local folder, or a hub id (org/name)")
    model, tokenizer = zoo.load_model(name, device=device)
    _require_decoder(model, name)
    if tokenizer is None and need_tokenizer:
        raise CLIError(f"{name} has no tokenizer: save one into it (tokenizer.save_pretrained)")
    return model, tokenizer


def _require_decoder(model, name: str) -> None:
    # model_kind could not read the config before loading; the text path needs a language model.
    from .specs import get_spec

    if get_spec(model).kind != "decoder":
        raise CLIError(f"{name} is a {model.config.model_type} encoder whose kind was unknown before loading; "
                       "pass a zoo name or a folder with a config.json")


def _folder_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, else the one of the base model its report.json names."""
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    model_name = report_model(folder)
    if not model_name:
        raise CLIError(f"{folder} has no tokenizer and no report.json naming its base model: save one into it "
                       "(tokenizer.save_pretrained(folder)), or compress with the lrmath command, which records it")
    from . import zoo

    return zoo.load_model(model_name)[1]  # the registry ships model and tokenizer in one file


def _text(source: str, split: str) -> str:
    from . import zoo

    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        return zoo.load_text(source, split=split)
    except (KeyError, ValueError) as exc:
        raise CLIError(f"unknown text {source!r}: give 'wiki' or a text file path ({exc})") from None


def _windows(tokenizer, text: str, seq_len: int, n: int, what: str):
    from .data import token_windows

    windows = token_windows(tokenizer, text, seq_len=seq_len, n_windows=None)
    if len(windows) < n:
        raise CLIError(f"the {what} text gives {len(windows)} windows of {seq_len} tokens; {n} are needed")
    return windows[:n]


def _prepare(args):
    """Load the model (onto ``--device``) and the calibration / evaluation windows (on the host)."""
    model, tokenizer = _load(args.model, args.device_obj)
    calib = _windows(tokenizer, _text(args.calib, "calibration"), args.seq_len, args.calib_windows, "calibration")
    eval_windows = None
    if args.eval_windows > 0:
        eval_windows = _windows(tokenizer, _text(args.eval_text or args.calib, "evaluation"), args.seq_len,
                                args.eval_windows, "evaluation")
    return model, tokenizer, calib, eval_windows


def compress_decoder(args, ratios: list[float], out: Path) -> int:
    """Compress a decoder at each ratio: one folder (one ratio) or ``ratio-*/`` and summary.json (several)."""
    if len(ratios) > 1:
        return _compress_many(args, ratios, out)
    from .pipeline import compress

    ratio = ratios[0]
    started = time.perf_counter()
    model, tokenizer, calib, eval_windows = _prepare(args)
    before = measure(model, tokenizer, eval_windows, args, speed=not paired(args))
    dense = copy.deepcopy(model) if paired(args) else None  # timed beside the compressed model below
    report = compress(model, calib, recipe=args.recipe, ratio=ratio, progress=not args.quiet,
                      calibration_source=f"{args.calib}: {args.calib_windows} x {args.seq_len} tokens",
                      **args.recipe_options)
    after = measure(model, tokenizer, eval_windows, args, speed=not paired(args))
    if dense is not None:
        dense_speed, compressed_speed = paired_speed(dense, model, tokenizer, eval_windows, args)
        before.update(dense_speed)
        after.update(compressed_speed)
        del dense
    with staged(out) as root:
        _save(model, report, root / "model", args, ratio, before, after, started, processor=tokenizer)
        publish(root / "model", out)
    print(report.summary())
    print(table(before, after))
    print(f"saved to {out} (load with lrmath_hf.load_compressed)")
    return 0


def _compress_many(args, ratios: list[float], out: Path) -> int:
    """One dense measurement and (where the recipe reuses statistics) one calibration for every ratio."""
    from .pipeline import compress

    started = time.perf_counter()
    model, tokenizer, calib, eval_windows = _prepare(args)
    before = measure(model, tokenizer, eval_windows, args, speed=not paired(args))
    before["file_bytes"] = before["parameters"] * next(model.parameters()).element_size()
    source = f"{args.calib}: {args.calib_windows} x {args.seq_len} tokens"
    t0 = time.perf_counter()
    shared = shared_statistics(model, [w[None] for w in calib], args.recipe, args.recipe_options,
                               progress=not args.quiet)
    calib_seconds = time.perf_counter() - t0 if shared else 0.0
    if shared and not args.quiet:
        print(f"calibrated once for {len(ratios)} ratios: {shared['stats'].tokens:,} tokens in {calib_seconds:.1f} s")
    rows = []
    with staged(out) as root:
        for ratio in ratios:
            t0 = time.perf_counter()
            trial = copy.deepcopy(model)
            report = compress(trial, calib, recipe=args.recipe, ratio=ratio, progress=not args.quiet,
                              calibration_source=source, **args.recipe_options, **shared)
            if shared:
                report.timings["calibration_shared"] = calib_seconds
                report.calibration["shared_across_ratios"] = ratios
            after = measure(trial, tokenizer, eval_windows, args, speed=not paired(args))
            dense_here = dict(before)
            if paired(args):  # each ratio against the dense model timed in the same rounds
                dense_speed, compressed_speed = paired_speed(model, trial, tokenizer, eval_windows, args)
                after.update(compressed_speed)
                dense_here.update(dense_speed)
                if "prefill_tokens_per_s" not in before:  # the summary's dense row: the first pair's timing
                    before.update(dense_speed)
            name = ratio_folder(ratio)
            _save(trial, report, root / name, args, ratio, dense_here, after, t0, processor=tokenizer)
            rows.append({"folder": name, "ratio_requested": ratio, "ratio_achieved": report.ratio_achieved,
                         "model_ratio_achieved": report.model_ratio_achieved, **after,
                         **{f"dense_{k}": v for k, v in dense_here.items() if k.endswith("_per_s")},
                         "compress_seconds": report.timings.get("total")})
            del trial
            if not args.quiet:
                ppl = f", perplexity {after['perplexity']:.2f}" if "perplexity" in after else ""
                print(f"ratio {ratio}: removed {100 * report.ratio_achieved:.1f}% of decoder-linear "
                      f"parameters{ppl} -> {name}/")
        summary = {"model": args.model, "recipe": args.recipe, "ratios": ratios, "dense": before,
                   "rows": rows,
                   "calibration": {"source": source, "shared": bool(shared), "seconds": calib_seconds},
                   "command": shlex.join(sys.argv), "wall_seconds": time.perf_counter() - started}
        (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if all("perplexity" in r for r in rows):
            try:
                from .plots import plot_quality_vs_ratio

                plot_quality_vs_ratio({args.recipe: [(r["ratio_achieved"], r["perplexity"]) for r in rows]},
                                      root / "perplexity_vs_ratio.png", dense=before.get("perplexity"),
                                      title=f"{_model_label(args.model)}: recipe {args.recipe}")
            except ImportError:  # matplotlib is optional
                pass
        publish(root, out)
    print(ratio_table(before, rows))
    print(f"saved {len(rows)} models to {out}/ratio-*/ (load each with lrmath_hf.load_compressed); "
          f"summary in {out / 'summary.json'}")
    return 0


def _model_label(name: str) -> str:
    return Path(name).name if Path(name).exists() else name


def eval_decoder(args) -> int:
    """Perplexity and tokens/s of a decoder (a zoo name, hub id or saved folder).

    With ``--reference``, the same of that model on the same windows (with the evaluated
    model's tokenizer), its tokens/s timed in the same rounds.
    """
    model, tokenizer = _load(args.model, args.device_obj)
    windows = _windows(tokenizer, _text(args.text, "evaluation"), args.seq_len, args.eval_windows, "evaluation")
    if not args.reference:
        print(json.dumps(measure(model, tokenizer, windows, args), indent=2))
        return 0
    reference, _ = _load(args.reference, args.device_obj, need_tokenizer=False)  # scored with the model's
    if reference.config.vocab_size != model.config.vocab_size:
        raise CLIError(f"--reference {args.reference} has a vocabulary of {reference.config.vocab_size} tokens, "
                       f"{args.model} one of {model.config.vocab_size}: they cannot be scored on the same windows")
    result = measure(model, tokenizer, windows, args, speed=False)
    theirs = measure(reference, tokenizer, windows, args, speed=False)
    if not args.no_speed:
        their_speed, our_speed = paired_speed(reference, model, tokenizer, windows, args)
        result.update(our_speed)
        theirs.update(their_speed)
    result.update(reference=args.reference, **{f"reference_{key}": value for key, value in theirs.items()})
    print(json.dumps(result, indent=2))
    return 0
