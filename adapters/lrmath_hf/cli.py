"""The ``lrmath`` command: compress, evaluate and inspect models (also ``python -m lrmath_hf``).

``lrmath compress smollm2-135m --recipe auto --ratio 0.2 --out runs/smollm2-20``
loads the registry-shipped model, measures it, compresses it on the bundled
calibration text, measures it again, and writes a loadable folder with
``report.json`` and plots.  With several ratios (``--ratio 0.1 0.2 0.3``) the dense
model is measured and calibrated once, and ``--out`` holds one loadable folder per
ratio (``ratio-0.10/`` ...), ``summary.json`` and ``perplexity_vs_ratio.png``.
Everything is written into a staging folder that is renamed into place at the very
end, so a failure or Ctrl-C leaves no half-written output.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .cli_measure import measure, paired, paired_speed, ratio_table, table

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _load(name: str, device):
    """Model (on ``device``) and tokenizer of a zoo name, saved folder or hub id."""
    from . import zoo

    if Path(name).is_dir() and (Path(name) / "manifest.json").exists():
        from .io import load_compressed

        model = load_compressed(name, device=device)
        _require_decoder(model, name)
        return model, _folder_tokenizer(Path(name))
    if name not in zoo.list_models() and not Path(name).exists() and "/" not in name:
        raise CLIError(f"unknown model {name!r}: use one of {', '.join(zoo.list_models())}, "
                       "a local folder, or a hub id (org/name)")
    model, tokenizer = zoo.load_model(name, device=device)
    _require_decoder(model, name)
    return model, tokenizer


def _require_decoder(model, name: str) -> None:
    # The command measures perplexity and tokens/s on text: a language model's job.
    from .specs import get_spec

    if get_spec(model).kind != "decoder":
        raise CLIError(f"{name} is a {model.config.model_type} encoder: the lrmath command compresses and scores "
                       "decoders on text; for a ViT call lrmath_hf.compress(model, pixel_batches, recipe='flar') "
                       "(docs/vit.md)")


def _options(pairs: list[str] | None, recipe: str) -> dict:
    """``--option KEY=VALUE`` pairs as recipe options (VALUE read as JSON, else kept as text), checked."""
    from .recipes import check_options

    options = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    try:
        check_options(recipe, options, hidden=("stats",))  # statistics are data, not a command-line setting
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    return options


def _device(name: str):
    """The ``--device`` argument as a torch device: ``auto`` is CUDA where present, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: supported are cpu, cuda, cuda:N and auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: this torch sees no CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _folder_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, else the one of the base model its report.json names."""
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    report = folder / "report.json"
    model_name = json.loads(report.read_text()).get("model") if report.is_file() else None
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


def _check_ratios(ratios: list[float]) -> list[float]:
    seen: dict[str, float] = {}
    for ratio in ratios:
        if not 0.0 < ratio < 1.0:
            raise CLIError(f"--ratio must be in (0, 1), got {ratio}")
        name = _ratio_folder(ratio)
        if name in seen and seen[name] == ratio:
            raise CLIError(f"--ratio lists {ratio} twice; give each ratio once")
        if name in seen:
            raise CLIError(f"--ratio lists {seen[name]} and {ratio}: both would be written to {name}; "
                           "give each ratio once")
        seen[name] = ratio
    return ratios


def _ratio_folder(ratio: float) -> str:
    """``ratio-0.20``; more digits only where two decimals would round the ratio."""
    text = f"{ratio:.2f}"
    return f"ratio-{text if float(text) == ratio else format(ratio, '.6g')}"


def _plots(report, folder: Path, model) -> None:
    try:
        from .plots import write_plots
        from .specs import get_spec

        write_plots(report, folder, spec=get_spec(model))
    except ImportError:  # matplotlib is optional
        pass


def _prepare(args):
    """Load the model (onto ``--device``) and the calibration / evaluation windows (on the host)."""
    model, tokenizer = _load(args.model, _device(args.device))  # a bad device fails before the model loads
    calib = _windows(tokenizer, _text(args.calib, "calibration"), args.seq_len, args.calib_windows, "calibration")
    eval_windows = None
    if args.eval_windows > 0:
        eval_windows = _windows(tokenizer, _text(args.eval_text or args.calib, "evaluation"), args.seq_len,
                                args.eval_windows, "evaluation")
    return model, tokenizer, calib, eval_windows


def _save(model, report, folder: Path, args, ratio: float, before: dict, after: dict, started: float) -> dict:
    """Write the loadable folder with report.json and plots; return the report payload."""
    from .io import save_compressed

    payload = report.to_dict()
    save_compressed(model, folder, report=payload, recipe=args.recipe, options={"ratio": ratio})
    after["file_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    before.setdefault("file_bytes", before["parameters"] * next(model.parameters()).element_size())
    payload.update(model=args.model, before=before, after=after, command=shlex.join(sys.argv),
                   wall_seconds=time.perf_counter() - started)
    (folder / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    _plots(report, folder, model)
    return payload


def _publish(built: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    built.rename(out)


def cmd_compress(args) -> int:
    import torch

    from .recipes import get_recipe

    ratios = _check_ratios(list(args.ratio))
    get_recipe(args.recipe)  # an unknown recipe or option fails before any model is loaded
    args.recipe_options = _options(args.option, args.recipe)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    if len(ratios) > 1:
        return _compress_many(args, sorted(ratios), out)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = staging / "model"
        _save(model, report, folder, args, ratio, before, after, started)
        _publish(folder, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(report.summary())
    print(table(before, after))
    print(f"saved to {out} (load with lrmath_hf.load_compressed)")
    return 0


def _takes_stats(recipe: str) -> bool:
    from .recipes import recipe_options

    return "stats" in (recipe_options(recipe) or ())


def _compress_many(args, ratios: list[float], out: Path) -> int:
    """One dense measurement and (where the recipe reuses statistics) one calibration for every ratio."""
    from .pipeline import compress
    from .recipes.common import run_calibration, union_plan
    from .specs import get_spec

    started = time.perf_counter()
    model, tokenizer, calib, eval_windows = _prepare(args)
    before = measure(model, tokenizer, eval_windows, args, speed=not paired(args))
    before["file_bytes"] = before["parameters"] * next(model.parameters()).element_size()
    source = f"{args.calib}: {args.calib_windows} x {args.seq_len} tokens"
    stats, calib_seconds = None, 0.0
    if _takes_stats(args.recipe):
        t0 = time.perf_counter()
        stats = run_calibration(model, get_spec(model), [w[None] for w in calib], union_plan(get_spec(model)),
                                progress=not args.quiet)
        calib_seconds = time.perf_counter() - t0
        if not args.quiet:
            print(f"calibrated once for {len(ratios)} ratios: {stats.tokens:,} tokens in {calib_seconds:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    rows = []
    try:
        root = staging / "result"
        root.mkdir()
        for ratio in ratios:
            t0 = time.perf_counter()
            trial = copy.deepcopy(model)
            shared = {"stats": stats} if stats is not None else {}
            report = compress(trial, calib, recipe=args.recipe, ratio=ratio, progress=not args.quiet,
                              calibration_source=source, **args.recipe_options, **shared)
            if stats is not None:
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
            name = _ratio_folder(ratio)
            _save(trial, report, root / name, args, ratio, dense_here, after, t0)
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
                   "calibration": {"source": source, "shared": stats is not None, "seconds": calib_seconds},
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
        _publish(root, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(ratio_table(before, rows))
    print(f"saved {len(rows)} models to {out}/ratio-*/ (load each with lrmath_hf.load_compressed); "
          f"summary in {out / 'summary.json'}")
    return 0


def _model_label(name: str) -> str:
    return Path(name).name if Path(name).exists() else name


def cmd_eval(args) -> int:
    model, tokenizer = _load(args.model, _device(args.device))
    windows = _windows(tokenizer, _text(args.text, "evaluation"), args.seq_len, args.eval_windows, "evaluation")
    result = measure(model, tokenizer, windows, args)
    print(json.dumps(result, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from .io import read_manifest

    manifest = read_manifest(args.folder)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    modules = manifest.get("modules", {})
    print(f"format {manifest.get('format_version')}; recipe {manifest.get('recipe')}; "
          f"{len(modules)} replaced modules; versions {manifest.get('versions')}")
    for name, entry in sorted(modules.items()):
        print(f"  {name}: {entry.get('kind')} rank={entry.get('rank', '-')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seq-len", type=int, default=512)
    common.add_argument("--eval-windows", type=int, default=80, help="evaluation windows (0: skip perplexity)")
    common.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurements")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--tune-layout", action="store_true",
                        help="before timing, give every timed model (dense too) the decode weight layout "
                             "measured fastest on this device (lrmath_hf.tune_decode_layout)")
    common.add_argument("--device", default="cpu",
                        help="where the model runs: cpu (default), cuda, cuda:N, or auto (CUDA if present); "
                             "calibration, evaluation and timing all run there")

    p = sub.add_parser("compress", parents=[common], help="compress a model and write a loadable folder")
    p.add_argument("model", help="zoo name (e.g. smollm2-135m), local folder or hub id")
    p.add_argument("--recipe", default="auto",
                   help="auto (default), flat, flat-paper, global, latent, svd, svd-llm")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a recipe option (repeatable; VALUE read as JSON, else as text), e.g. "
                        "--option selection=leverage; lrmath_hf.recipes.recipe_options(recipe) lists them")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.2], metavar="RATIO",
                   help="fraction of decoder-linear parameters to remove, in (0, 1); several ratios write "
                        "one folder each (ratio-0.20/ ...), summary.json and perplexity_vs_ratio.png")
    p.add_argument("--calib", default="wiki", help="'wiki' or a text file")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-text", default=None, help="default: the evaluation split of --calib")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequential-speed", action="store_true",
                   help="time the dense model before compressing and the compressed one after, instead "
                        "of interleaved after compressing (saves the dense copy that timing keeps, but a "
                        "change in machine load between the two then reads as a speedup)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[common], help="perplexity and tokens/s of a model or folder")
    p.add_argument("model")
    p.add_argument("--text", default="wiki")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="what a saved folder's manifest says")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lrmath: interrupted; nothing was written", file=sys.stderr)
        return 130
    except CLIError as exc:
        print(f"lrmath: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"lrmath: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
