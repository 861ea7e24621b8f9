"""The ``lrmath`` command: compress, evaluate and inspect models (also ``python -m lrmath_hf``).

Decoders (SmolLM2 / Llama / Mistral / Qwen2) are compressed and scored on text by
:mod:`lrmath_hf.cli_text`; ViT-family encoders (ViT, DeiT, DINOv2) on images by
:mod:`lrmath_hf.cli_vision`. The model's kind is read from its config before anything
loads, so an option for the other kind is refused at once. Everything is written into a
staging folder that is renamed into place at the very end, so a failure or Ctrl-C
leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_common import CLIError, check_ratios, device_from, model_kind, ratio_folder, recipe_options_from

_ratio_folder = ratio_folder  # the name the tests know

__all__ = ["main", "build_parser"]


# Options that apply to one kind of model only, with their defaults there (argparse's default is None,
# so that an option given for the other kind is refused rather than ignored).
_TEXT_ONLY = {"seq_len": 512, "eval_windows": 80, "calib_windows": 64, "eval_text": None, "text": "wiki",
              "tune_layout": False, "sequential_speed": False}
_IMAGE_ONLY = {"image_size": None, "calib_images": 32, "eval_images": "photos", "probe": False, "latency_batch": 1}


def _resolve(args) -> str:
    """The model's kind; its kind's defaults filled in, the other kind's options refused, the device checked."""
    args.device_obj = device_from(args.device)  # a bad device fails before the model loads
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    kind = model_kind(args.model) or "decoder"
    own, other = (_IMAGE_ONLY, _TEXT_ONLY) if kind == "encoder" else (_TEXT_ONLY, _IMAGE_ONLY)
    for key in other:
        if getattr(args, key, None) not in (None, False):
            raise CLIError(f"--{key.replace('_', '-')} applies to {'decoders' if kind == 'encoder' else 'encoders'}; "
                           f"{args.model} is {'an encoder' if kind == 'encoder' else 'a decoder'}")
    for key, default in own.items():
        if getattr(args, key, None) is None and hasattr(args, key):
            setattr(args, key, default)
    if hasattr(args, "calib") and args.calib is None:
        args.calib = "photos" if kind == "encoder" else "wiki"
    if hasattr(args, "recipe") and args.recipe is None:
        args.recipe = "flar" if kind == "encoder" else "auto"
    if kind == "encoder":
        from .cli_vision import check_image_args

        check_image_args(args)
    if args.quiet:  # transformers' own bars too (loading weights, writing shards)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return kind


def cmd_compress(args) -> int:
    import torch

    from .recipes import get_recipe

    ratios = check_ratios(list(args.ratio))
    kind = _resolve(args)
    get_recipe(args.recipe)  # an unknown recipe or option fails before any model is loaded
    args.recipe_options = recipe_options_from(args.option, args.recipe)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    if kind == "encoder":
        from .cli_vision import compress_encoder

        return compress_encoder(args, sorted(ratios), out)
    from .cli_text import compress_decoder

    return compress_decoder(args, sorted(ratios), out)


def cmd_eval(args) -> int:
    if _resolve(args) == "encoder":
        from .cli_vision import eval_encoder

        return eval_encoder(args)
    from .cli_text import eval_decoder

    return eval_decoder(args)


def _natural(name: str) -> list:
    # layers.2 before layers.10
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _describe(entry: dict) -> str:
    shape = f"{entry.get('in_features', '?')} -> {entry.get('out_features', '?')}"
    rank = f", rank {entry['rank']}" if entry.get("rank") is not None else ""
    return f"{entry.get('kind', '?'):<11} {shape}{rank}"


def cmd_inspect(args) -> int:
    from .io import read_manifest

    manifest = read_manifest(args.folder)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    modules = manifest.get("modules", {})
    print(f"format {manifest.get('format_version')}; recipe {manifest.get('recipe')}; model_type "
          f"{manifest.get('model_type')}; {len(modules)} replaced modules; versions {manifest.get('versions')}")
    width = max((len(name) for name in modules), default=0)
    for name in sorted(modules, key=_natural):
        print(f"  {name:<{width}}  {_describe(modules[name])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrmath", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-speed", action="store_true", help="skip the tokens/s or latency measurements")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives steadier timings on a "
                             "machine shared with other jobs")
    common.add_argument("--device", default="cpu",
                        help="where the model runs: cpu (default), cuda, cuda:N, or auto (CUDA if present); "
                             "calibration, evaluation and timing all run there")
    text = common.add_argument_group("decoders (text)")
    text.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512)")
    text.add_argument("--eval-windows", type=int, default=None,
                      help="evaluation windows (default 80; 0: skip perplexity)")
    text.add_argument("--tune-layout", action="store_true", default=None,
                      help="before timing, give every timed model (dense too) the decode weight layout "
                           "measured fastest on this device (lrmath_hf.tune_decode_layout)")
    images = common.add_argument_group("encoders (ViT, DeiT, DINOv2; images)")
    images.add_argument("--image-size", type=int, default=None,
                        help="pixels per side (default: 224 for DINOv2, the config's image_size otherwise)")
    images.add_argument("--eval-images", default=None,
                        help="'photos' (default: the bundled evaluation photos) or a folder of image files")
    images.add_argument("--latency-batch", type=int, default=None,
                        help="images per timed forward (default 1); flar's latency caps are measured at it too "
                             "unless --option latency_batch says otherwise")
    images.add_argument("--probe", action="store_true", default=None,
                        help="also score the MNIST linear probe (fitted on the dense model's features)")

    p = sub.add_parser("compress", parents=[common], help="compress a model and write a loadable folder")
    p.add_argument("model", help="zoo name (smollm2-135m, dinov2-s14), local folder or hub id")
    p.add_argument("--recipe", default=None,
                   help="auto (decoders' default), flat, flat-paper, global, latent, svd, svd-llm, "
                        "flar (encoders' default)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a recipe option (repeatable; VALUE read as JSON, else as text), e.g. "
                        "--option selection=leverage; lrmath_hf.recipes.recipe_options(recipe) lists them")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.2], metavar="RATIO",
                   help="fraction of the decoder's or encoder's linear parameters to remove, in (0, 1); "
                        "several ratios write one folder each (ratio-0.20/ ...) and summary.json")
    p.add_argument("--calib", default=None,
                   help="decoders: 'wiki' (default) or a text file; encoders: 'photos' (default: random crops "
                        "and flips of the bundled calibration photos), 'digits' (MNIST train digits) or a "
                        "folder of image files")
    p.add_argument("--calib-windows", type=int, default=None, help="decoders: calibration windows (default 64)")
    p.add_argument("--calib-images", type=int, default=None, help="encoders: calibration images (default 32)")
    p.add_argument("--eval-text", default=None, help="decoders; default: the evaluation split of --calib")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequential-speed", action="store_true", default=None,
                   help="decoders: time the dense model before compressing and the compressed one after, "
                        "instead of interleaved after compressing (saves the dense copy that timing keeps, "
                        "but a change in machine load between the two then reads as a speedup)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[common],
                       help="decoders: perplexity and tokens/s; encoders: latency, and fidelity to a reference")
    p.add_argument("model")
    p.add_argument("--text", default=None, help="decoders: 'wiki' (default) or a text file")
    p.add_argument("--reference", default=None,
                   help="the model to compare with on the same data, timed in the same rounds (encoders' "
                        "default: the one a folder's report.json names; decoders: none unless given)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="what a saved folder's manifest says")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    # --quiet turns transformers' bars off, --threads sets torch's threads: for this call only
    bars, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lrmath: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (lrmath inspect F | head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CLIError as exc:
        print(f"lrmath: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as exc:  # OSError: a missing folder, an unreachable hub id
        print(f"lrmath: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
