"""The ``lrmath`` command: compress, evaluate and inspect models (also ``python -m lrmath_hf``).

``lrmath compress smollm2-135m --recipe auto --ratio 0.2 --out runs/smollm2-20``
loads the registry-shipped model, measures it, compresses it on the bundled
calibration text, measures it again, and writes a loadable folder with
``report.json`` and plots.  Everything is written into a staging folder that is
renamed into place at the very end, so a failure or Ctrl-C leaves no
half-written output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _load(name: str):
    from . import zoo

    if Path(name).is_dir() and (Path(name) / "manifest.json").exists():
        from .io import load_compressed

        model = load_compressed(name)
        tokenizer = _tokenizer_for(json.loads((Path(name) / "report.json").read_text()).get("model"))
        return model, tokenizer
    if name not in zoo.list_models() and not Path(name).exists() and "/" not in name:
        raise CLIError(f"unknown model {name!r}: use one of {', '.join(zoo.list_models())}, "
                       "a local folder, or a hub id (org/name)")
    return zoo.load_model(name)


def _tokenizer_for(model_name: str | None):
    if not model_name:
        raise CLIError("this folder has no report.json naming its base model: cannot pick a tokenizer")
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


def _measure(model, tokenizer, eval_windows, args) -> dict:
    from .evaluate import perplexity, throughput
    from .modules import count_parameters

    out = {"parameters": count_parameters(model)}
    if eval_windows is not None:
        out["perplexity"] = perplexity(model, eval_windows, progress=not args.quiet)
    if not args.no_speed:
        speed = throughput(model, eval_windows[0][None] if eval_windows is not None else tokenizer,
                           prefill_tokens=min(512, args.seq_len), decode_tokens=64, repeats=3)
        out["prefill_tokens_per_s"] = speed.prefill_tokens_per_s
        out["decode_tokens_per_s"] = speed.decode_tokens_per_s
    return out


def _table(before: dict, after: dict) -> str:
    rows = [("parameters", "{:,}"), ("perplexity", "{:.2f}"), ("prefill_tokens_per_s", "{:.0f}"),
            ("decode_tokens_per_s", "{:.1f}"), ("file_bytes", "{:,}")]
    lines = [f"{'':24}{'dense':>16}{'compressed':>16}{'ratio':>9}"]
    for key, fmt in rows:
        if key in before and key in after:
            ratio = after[key] / before[key] if before[key] else float("nan")
            lines.append(f"{key:24}{fmt.format(before[key]):>16}{fmt.format(after[key]):>16}{ratio:>9.3f}")
    return "\n".join(lines)


def cmd_compress(args) -> int:
    import torch

    from .io import save_compressed
    from .pipeline import compress

    from .recipes import get_recipe

    if not 0.0 < args.ratio < 1.0:
        raise CLIError(f"--ratio must be in (0, 1), got {args.ratio}")
    get_recipe(args.recipe)  # an unknown recipe fails before any model is loaded
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = _load(args.model)
    calib = _windows(tokenizer, _text(args.calib, "calibration"), args.seq_len, args.calib_windows, "calibration")
    eval_windows = None
    if args.eval_windows > 0:
        eval_windows = _windows(tokenizer, _text(args.eval_text or args.calib, "evaluation"), args.seq_len,
                                args.eval_windows, "evaluation")
    before = _measure(model, tokenizer, eval_windows, args)
    report = compress(model, calib, recipe=args.recipe, ratio=args.ratio, progress=not args.quiet,
                      calibration_source=f"{args.calib}: {args.calib_windows} x {args.seq_len} tokens")
    after = _measure(model, tokenizer, eval_windows, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = staging / "model"
        payload = report.to_dict()
        save_compressed(model, folder, report=payload, recipe=args.recipe, options={"ratio": args.ratio})
        after["file_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        before["file_bytes"] = before["parameters"] * next(model.parameters()).element_size()
        payload.update(model=args.model, before=before, after=after, command=shlex.join(sys.argv),
                       wall_seconds=time.perf_counter() - started)
        (folder / "report.json").write_text(json.dumps(payload, indent=2, default=str))
        try:
            from .plots import write_plots

            write_plots(report, folder)
        except ImportError:  # matplotlib is optional
            pass
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(report.summary())
    print(_table(before, after))
    print(f"saved to {out} (load with lrmath_hf.load_compressed)")
    return 0


def cmd_eval(args) -> int:
    model, tokenizer = _load(args.model)
    windows = _windows(tokenizer, _text(args.text, "evaluation"), args.seq_len, args.eval_windows, "evaluation")
    result = _measure(model, tokenizer, windows, args)
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

    p = sub.add_parser("compress", parents=[common], help="compress a model and write a loadable folder")
    p.add_argument("model", help="zoo name (e.g. smollm2-135m), local folder or hub id")
    p.add_argument("--recipe", default="auto")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of decoder-linear parameters to remove")
    p.add_argument("--calib", default="wiki", help="'wiki' or a text file")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-text", default=None, help="default: the evaluation split of --calib")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
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
