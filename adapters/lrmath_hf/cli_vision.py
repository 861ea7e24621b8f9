"""``lrmath compress`` / ``lrmath eval`` for ViT-family encoders: images in; feature fidelity, latency and a probe out.

``lrmath compress dinov2-s14 --ratio 0.3 --out runs/dinov2-30`` compresses the bundled
DINOv2-S/14 with FLAR-SVD (the encoders' default recipe) on random crops and flips of
the bundled calibration photos, then scores it against the dense model on the
evaluation photos (centre crops plus random crops): the cosine similarity of the CLS
and patch features and the relative error of the final features
(:func:`lrmath_hf.vision_eval.feature_fidelity`), and the median one-image latency of
both, timed in interleaved rounds. ``--probe`` adds the MNIST linear probe of
docs/results-vit.md: a logistic regression fitted once on the dense backbone's features
of 3,000 train digits, then kept fixed while the compressed backbone is scored on the
2,000 others.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from .cli_common import CLIError, publish, ratio_folder, report_model, shared_statistics, staged
from .cli_common import save_folder as _save  # module-level name: a test interrupts a sweep through it
from .cli_measure import ratio_table, table

__all__ = ["compress_encoder", "eval_encoder", "load_encoder", "check_image_args", "IMAGE_SOURCES"]

IMAGE_SOURCES = ("photos", "digits")  # besides a folder of image files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LATENCY_ROUNDS = {"warmup": 3, "repeats": 15}  # docs/results-vit.md's protocol
EVAL_RANDOM_CROPS = 16  # evaluation: every photo's centre crop, then this many random crops (seed 1)
PROBE_SIZE_DINOV2 = 112  # DINOv2 interpolates its position embeddings; 112 px is the results page's probe
BATCH = 8

_ROWS = [("parameters", "{:,}"), ("latency_ms", "{:.2f}"), ("probe_top1_percent", "{:.2f}"), ("file_bytes", "{:,}")]


def load_encoder(name: str, device):
    """An encoder (on ``device``) and its image processor (``None`` where none is known).

    A saved folder brings the processor saved in it, if any.
    """
    from . import zoo
    from .specs_vision import sync_mlp_width

    folder = Path(name)
    if folder.is_dir() and (folder / "manifest.json").exists():
        from .io import load_compressed

        model = load_compressed(folder, device=device)
        processor = _folder_processor(folder)
    else:
        model, processor = zoo.load_model(name, device=device)
    if model.config.model_type == "dinov2":
        sync_mlp_width(model)  # DINOv2 builds its MLP from mlp_ratio; get_spec reads intermediate_size
    return model, processor


def _folder_processor(folder: Path):
    """The image processor saved in ``folder`` (the command saves one); ``None``: ImageNet statistics."""
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder)
    return None


def _normalisation(processor) -> dict:
    """The processor's ``image_mean`` / ``image_std``; ImageNet's where it names none."""
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return {"mean": tuple(mean), "std": tuple(std)} if mean is not None and std is not None else {}


def _image_size(args, model) -> int:
    """``--image-size``, else 224 for DINOv2 (its crop) and the config's size for ViT / DeiT."""
    if args.image_size is not None:
        return args.image_size
    return 224 if model.config.model_type == "dinov2" else int(model.config.image_size)


def _images(source: str, split: str):
    """The bundled photos of ``split``, or every image file of a folder (sorted by name)."""
    from . import zoo

    if source == "photos":
        return zoo.load_images(split=split)
    folder = Path(source)
    if not folder.is_dir():
        raise CLIError(f"unknown images {source!r}: give {' or '.join(IMAGE_SOURCES)} or a folder of image files")
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise CLIError(f"{path} is not a readable image ({exc})") from None
    return images


def calibration_pixels(args, size: int, norm: dict):
    """``--calib-images`` calibration images at ``size`` px, in batches of 8."""
    from . import data, zoo

    if args.calib == "digits":
        digits, _ = zoo.load_digits_mnist("train")
        if args.calib_images > len(digits):
            raise CLIError(f"--calib-images {args.calib_images}: the digits' train split has {len(digits):,}")
        pixels = data.preprocess_images(digits[: args.calib_images], size, center_crop=False, **norm)
    else:
        pixels = data.random_crops(_images(args.calib, "calibration"), args.calib_images, size, seed=0, **norm)
    return list(pixels.split(BATCH))


def evaluation_pixels(args, size: int, norm: dict):
    """Centre crops of the evaluation images, then random crops of them (photos: the bundled evaluation split)."""
    import torch

    from . import data

    images = _images(args.eval_images, "evaluation")
    centre = data.preprocess_images(images, size, **norm)
    return torch.cat([centre, data.random_crops(images, EVAL_RANDOM_CROPS, size, seed=1, **norm)])


@dataclasses.dataclass
class _Probe:
    classifier: object
    test_pixels: object
    test_labels: object
    reference_accuracy: float

    def score(self, model) -> float:
        from .vision_eval import linear_probe_accuracy, vit_features

        return linear_probe_accuracy(self.classifier, vit_features(model, self.test_pixels), self.test_labels)


def _probe(reference, norm: dict, quiet: bool) -> _Probe:
    """The MNIST probe fitted on ``reference``'s features of the train digits."""
    from . import data, zoo
    from .vision_eval import fit_linear_probe, linear_probe_accuracy, vit_features

    size = PROBE_SIZE_DINOV2 if reference.config.model_type == "dinov2" else int(reference.config.image_size)
    train_x, train_y = zoo.load_digits_mnist("train")
    test_x, test_y = zoo.load_digits_mnist("test")
    train = data.preprocess_images(train_x, size, center_crop=False, **norm)
    test = data.preprocess_images(test_x, size, center_crop=False, **norm)
    if not quiet:
        print(f"probe: features of {len(train_y):,} train and {len(test_y):,} test digits at {size} px ...")
    classifier = fit_linear_probe(vit_features(reference, train, progress=not quiet), train_y)
    accuracy = linear_probe_accuracy(classifier, vit_features(reference, test, progress=not quiet), test_y)
    return _Probe(classifier, test, test_y, accuracy)


def _latency(models: dict, pixels, batch: int) -> dict:
    """Median forward seconds of each model on the first ``batch`` images (cycled if there are fewer)."""
    from .latency import time_models

    index = [i % len(pixels) for i in range(batch)]
    return time_models(models, pixels[index], **LATENCY_ROUNDS)


def _score(dense, compressed, pixels, probe: _Probe | None) -> dict:
    """Fidelity to ``dense``, and the probe, of ``compressed``."""
    from .modules import count_parameters
    from .vision_eval import feature_fidelity, has_classifier, prediction_agreement

    fidelity = feature_fidelity(dense, compressed, pixels)
    out = {"parameters": count_parameters(compressed), "cls_cosine": fidelity.cls_cosine,
           "patch_cosine": fidelity.patch_cosine, "relative_error": fidelity.relative_error,
           "fidelity_images": fidelity.n_images}
    if has_classifier(dense) and has_classifier(compressed):  # a ...ForImageClassification: same answers?
        out["top1_agreement"] = prediction_agreement(dense, compressed, pixels)
    if probe is not None:
        out["probe_top1_percent"] = 100 * probe.score(compressed)
    return out


def _fidelity_line(after: dict) -> str:
    agreement = (f", top-1 agreement with the dense classifier {after['top1_agreement']:.3f}"
                 if "top1_agreement" in after else "")
    return (f"fidelity to the dense model on {after['fidelity_images']} evaluation images: CLS cosine "
            f"{after['cls_cosine']:.4f}, patch cosine {after['patch_cosine']:.4f}, relative error "
            f"{after['relative_error']:.4f}{agreement}")


def compress_encoder(args, ratios: list[float], out: Path) -> int:
    """Compress an encoder at each ratio; one folder (one ratio) or ``ratio-*/`` and summary.json (several)."""
    import torch

    from .latency import device_name
    from .modules import count_parameters
    from .pipeline import compress
    from .recipes import recipe_options

    started = time.perf_counter()
    model, processor = load_encoder(args.model, args.device_obj)
    norm = _normalisation(processor)
    size = _image_size(args, model)
    batches = calibration_pixels(args, size, norm)
    evaluation = evaluation_pixels(args, size, norm)
    source = f"{args.calib}: {sum(len(b) for b in batches)} images at {size} px"
    probe = _probe(model, norm, args.quiet) if args.probe else None
    before = {"parameters": count_parameters(model)}
    before["file_bytes"] = before["parameters"] * next(model.parameters()).element_size()
    if probe is not None:
        before["probe_top1_percent"] = 100 * probe.reference_accuracy
    if "latency_batch" in (recipe_options(args.recipe) or ()):  # flar's latency caps: measured at the batch timed
        args.recipe_options.setdefault("latency_batch", args.latency_batch)
    shared = {} if len(ratios) == 1 else shared_statistics(model, batches, args.recipe, args.recipe_options,
                                                           progress=not args.quiet)
    rows = []
    with staged(out) as root:
        for ratio in ratios:
            t0 = time.perf_counter()
            trial = copy.deepcopy(model)
            torch.manual_seed(0)
            report = compress(trial, batches, recipe=args.recipe, ratio=ratio, progress=not args.quiet,
                              calibration_source=source, **args.recipe_options, **shared)
            after = _score(model, trial, evaluation, probe)
            dense_here = dict(before)
            if not args.no_speed:  # against the dense model timed in the same rounds
                seconds = _latency({"dense": model, "compressed": trial}, evaluation, args.latency_batch)
                timing = {"latency_device": device_name(args.device_obj), "latency_batch": args.latency_batch}
                dense_here.update(latency_ms=1e3 * seconds["dense"], **timing)
                after.update(latency_ms=1e3 * seconds["compressed"], **timing)
                before.setdefault("latency_ms", dense_here["latency_ms"])
            name = ratio_folder(ratio)
            _save(trial, report, root / name, args, ratio, dense_here, after, t0, processor=processor)
            rows.append({"folder": name, "ratio_requested": ratio, "ratio_achieved": report.ratio_achieved,
                         "model_ratio_achieved": report.model_ratio_achieved, **after,
                         "dense_latency_ms": dense_here.get("latency_ms"),
                         "compress_seconds": report.timings.get("total")})
            if not args.quiet and len(ratios) > 1:
                print(f"ratio {ratio}: removed {100 * report.ratio_achieved:.1f}% of encoder-linear parameters, "
                      f"CLS cosine {after['cls_cosine']:.4f} -> {name}/")
            del trial
        if len(ratios) == 1:  # the folder is the model
            publish(root / rows[0]["folder"], out)
        else:
            summary = {"model": args.model, "recipe": args.recipe, "ratios": ratios, "dense": before, "rows": rows,
                       "calibration": {"source": source, "shared": bool(shared)},
                       "command": shlex.join(sys.argv), "wall_seconds": time.perf_counter() - started}
            (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            publish(root, out)
    if len(ratios) == 1:
        print(report.summary())
        print(table(dense_here, after, rows=_ROWS))
        print(_fidelity_line(after))
        print(f"saved to {out} (load with lrmath_hf.load_compressed)")
    else:
        print(ratio_table(before, rows, cols=_ratio_columns(rows, probe is not None)))
        print(f"saved {len(rows)} models to {out}/ratio-*/ (load each with lrmath_hf.load_compressed); "
              f"summary in {out / 'summary.json'}")
    return 0


def _ratio_columns(rows: list[dict], with_probe: bool) -> list:
    def fmt(key, spec):
        return lambda r: format(r[key], spec) if r.get(key) is not None else "-"

    cols = [("removed", lambda r: f"{100 * r['ratio_achieved']:.1f}%" if "ratio_achieved" in r else "-"),
            ("parameters", fmt("parameters", ",")),
            ("file MB", lambda r: f"{r['file_bytes'] / 1e6:.2f}" if "file_bytes" in r else "-"),
            ("CLS cosine", fmt("cls_cosine", ".4f")), ("patch cosine", fmt("patch_cosine", ".4f")),
            ("rel. error", fmt("relative_error", ".4f")), ("latency ms", fmt("latency_ms", ".2f"))]
    if any("top1_agreement" in r for r in rows):
        cols.append(("top-1 agree", fmt("top1_agreement", ".3f")))
    return cols + ([("probe top-1 %", fmt("probe_top1_percent", ".2f"))] if with_probe else [])


def eval_encoder(args) -> int:
    """Parameters and latency of an encoder; fidelity to (and latency beside) a reference, and the probe."""
    from .latency import device_name
    from .modules import count_parameters
    from .vision_eval import feature_fidelity, has_classifier, prediction_agreement

    model, processor = load_encoder(args.model, args.device_obj)
    reference_name = args.reference or report_model(Path(args.model))
    reference = load_encoder(reference_name, args.device_obj)[0] if reference_name else None
    norm = _normalisation(processor)
    result: dict = {"model": args.model, "parameters": count_parameters(model)}
    if reference is not None:
        result.update(reference=reference_name, reference_parameters=count_parameters(reference))
    if reference is not None or not args.no_speed:
        evaluation = evaluation_pixels(args, _image_size(args, model), norm)
    if reference is not None:
        fidelity = dataclasses.asdict(feature_fidelity(reference, model, evaluation))
        result.update({k: v for k, v in fidelity.items() if not k.endswith("_per_image")})
        if has_classifier(reference) and has_classifier(model):
            result["top1_agreement"] = prediction_agreement(reference, model, evaluation)
    if args.probe:
        probe = _probe(reference if reference is not None else model, norm, args.quiet)
        result["probe_fitted_on"] = reference_name if reference is not None else args.model
        result["probe_top1_percent"] = 100 * probe.score(model)
        if reference is not None:
            result["reference_probe_top1_percent"] = 100 * probe.reference_accuracy
    if not args.no_speed:
        models = {"model": model, **({"reference": reference} if reference is not None else {})}
        seconds = _latency(models, evaluation, args.latency_batch)
        result.update(latency_ms=1e3 * seconds["model"], latency_device=device_name(args.device_obj),
                      latency_batch=args.latency_batch)
        if reference is not None:
            result["reference_latency_ms"] = 1e3 * seconds["reference"]
    print(json.dumps(result, indent=2))
    return 0


def check_image_args(args) -> None:
    """The image options, checked before any model loads: ``--calib`` is photos, digits or a folder,
    ``--eval-images`` photos or a folder, sizes and counts positive."""
    calib = getattr(args, "calib", "photos")
    if calib not in IMAGE_SOURCES and not Path(calib).is_dir():
        raise CLIError(f"--calib {calib!r}: an encoder calibrates on {' or '.join(IMAGE_SOURCES)} "
                       "or a folder of image files")
    if args.eval_images != "photos" and not Path(args.eval_images).is_dir():
        raise CLIError(f"--eval-images {args.eval_images!r}: give photos or a folder of image files")
    if args.image_size is not None and args.image_size < 1:
        raise CLIError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    if getattr(args, "calib_images", 1) < 1:
        raise CLIError(f"--calib-images must be at least 1, got {args.calib_images}")
    if args.latency_batch < 1:
        raise CLIError(f"--latency-batch must be at least 1, got {args.latency_batch}")
