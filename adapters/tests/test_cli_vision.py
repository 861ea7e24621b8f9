"""The `lrmath` command on ViT-family encoders: image calibration, fidelity and latency, one-line refusals."""

import json

import numpy as np
import pytest
import torch

from lrmath_hf.cli import main

from ._interrupt import interrupt_second_save
from .test_vision_specs import tiny_vision_model

SIZE = "56"  # the tiny encoders' image size (4 x 4 patches of 14 px)
FLAR_FAST = ["--option", "latency_aware=false"]  # a tiny model's factorised pairs are never faster


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DINOv2 saved with save_pretrained, and two folders of PNG images (calibration, evaluation)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vit")
    tiny_vision_model("dinov2", dtype=torch.float32).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for split, count in (("calib", 6), ("eval", 4)):
        (root / split).mkdir()
        for i in range(count):
            shape = (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / f"{i}.png")
    (root / "calib" / "notes.txt").write_text("not an image: skipped")
    return root


def _compress(tiny, out, *ratios, extra=()):
    return main(["compress", str(tiny / "model"), "--image-size", SIZE, "--calib", str(tiny / "calib"),
                 "--eval-images", str(tiny / "eval"), "--calib-images", "8", "--quiet", *extra,
                 "--ratio", *map(str, ratios), "--out", str(out)])


def _fidelity_of_saved(tiny, folder):
    """The saved model's fidelity to the dense one, recomputed after reloading."""
    from transformers import Dinov2Model

    from lrmath_hf import data
    from lrmath_hf.cli_vision import EVAL_RANDOM_CROPS, _images
    from lrmath_hf.io import load_compressed
    from lrmath_hf.vision_eval import feature_fidelity

    images = _images(str(tiny / "eval"), "evaluation")
    pixels = torch.cat([data.preprocess_images(images, int(SIZE)),
                        data.random_crops(images, EVAL_RANDOM_CROPS, int(SIZE), seed=1)])
    return feature_fidelity(Dinov2Model.from_pretrained(tiny / "model").eval(), load_compressed(folder), pixels)


def test_one_ratio_writes_a_folder_whose_reload_has_the_reported_fidelity(tiny, tmp_path, capsys):
    out = tmp_path / "one"
    threads = torch.get_num_threads()
    assert _compress(tiny, out, 0.3, extra=[*FLAR_FAST, "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the command's own work only
    printed = capsys.readouterr().out
    assert "recipe flar" in printed and "CLS cosine" in printed and "latency_ms" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "flar" and report["options"] == {"latency_aware": False, "latency_batch": 1}
    assert report["calibration"]["source"] == f"{tiny / 'calib'}: 8 images at {SIZE} px"
    before, after = report["before"], report["after"]
    assert after["parameters"] < before["parameters"] and 0.25 < report["ratio_achieved"] < 0.35
    assert after["file_bytes"] == (out / "model.safetensors").stat().st_size
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0
    assert after["fidelity_images"] == 4 + 16
    fidelity = _fidelity_of_saved(tiny, out)  # nothing lost between the measured model and the saved one
    assert fidelity.cls_cosine == pytest.approx(after["cls_cosine"], abs=1e-6)
    assert fidelity.relative_error == pytest.approx(after["relative_error"], abs=1e-6)
    assert 0 < after["relative_error"] < 1 and 0 < after["cls_cosine"] < 1


def test_several_ratios_share_one_calibration_and_match_single_runs(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _compress(tiny, out, 0.5, 0.3, extra=[*FLAR_FAST, "--no-speed"]) == 0
    assert "CLS cosine" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ratios"] == [0.3, 0.5] and summary["calibration"]["shared"]
    assert [row["folder"] for row in summary["rows"]] == ["ratio-0.30", "ratio-0.50"]
    cosines = [row["cls_cosine"] for row in summary["rows"]]
    assert cosines[0] > cosines[1]  # removing more costs fidelity
    assert _compress(tiny, tmp_path / "one", 0.5, extra=[*FLAR_FAST, "--no-speed"]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    swept = json.loads((out / "ratio-0.50" / "report.json").read_text())
    assert swept["ranks"] == one["ranks"]
    assert swept["after"]["cls_cosine"] == pytest.approx(one["after"]["cls_cosine"], abs=1e-6)


def test_interrupt_during_a_sweep_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    from lrmath_hf import cli_vision

    interrupt_second_save(monkeypatch, cli_vision)
    assert _compress(tiny, tmp_path / "sweep", 0.2, 0.4, extra=[*FLAR_FAST, "--no-speed"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists() and not list(tmp_path.glob(".sweep.*"))


def test_another_recipe_runs_and_names_itself_in_the_report(tiny, tmp_path):
    assert _compress(tiny, tmp_path / "svd", 0.3, 0.4, extra=["--recipe", "svd-llm", "--no-speed"]) == 0
    report = json.loads((tmp_path / "svd" / "ratio-0.40" / "report.json").read_text())
    assert report["recipe"] == "svd-llm" and report["before"]["parameters"] > report["after"]["parameters"]


def test_heldout_shrinkage_gets_its_two_folds_when_ratios_share_a_calibration(tiny, tmp_path):
    extra = [*FLAR_FAST, "--option", "shrinkage=heldout", "--no-speed"]
    assert _compress(tiny, tmp_path / "sweep", 0.3, 0.5, extra=extra) == 0
    assert _compress(tiny, tmp_path / "one", 0.5, extra=extra) == 0
    swept = json.loads((tmp_path / "sweep" / "ratio-0.50" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert swept["details"]["heldout_multiple"] == one["details"]["heldout_multiple"]
    assert swept["ranks"] == one["ranks"]


def test_eval_compares_a_folder_with_the_model_its_report_names(tiny, tmp_path, capsys):
    out = tmp_path / "one"
    assert _compress(tiny, out, 0.3, extra=[*FLAR_FAST, "--no-speed"]) == 0
    after = json.loads((out / "report.json").read_text())["after"]
    capsys.readouterr()
    assert main(["eval", str(out), "--image-size", SIZE, "--eval-images", str(tiny / "eval"), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(tiny / "model")
    assert result["parameters"] == after["parameters"] < result["reference_parameters"]
    assert result["cls_cosine"] == pytest.approx(after["cls_cosine"], abs=1e-6)
    assert result["latency_ms"] > 0 and result["reference_latency_ms"] > 0
    # without a reference: parameters and latency only
    assert main(["eval", str(tiny / "model"), "--image-size", SIZE, "--eval-images", str(tiny / "eval"),
                 "--quiet"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert "reference" not in alone and "cls_cosine" not in alone and alone["latency_ms"] > 0


def test_the_image_processor_is_saved_and_its_normalisation_used(tmp_path, capsys):
    """A checkpoint normalised with mean = std = 0.5 (google/vit-base's): the command calibrates and scores
    with that, and the folder carries the processor so that eval does too."""
    from transformers import ViTImageProcessor

    from lrmath_hf.cli_vision import _normalisation, load_encoder

    model_dir = tmp_path / "vit"
    tiny_vision_model("vit", dtype=torch.float32).save_pretrained(model_dir)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 56, "width": 56}).save_pretrained(
        model_dir)
    assert _normalisation(load_encoder(str(model_dir), "cpu")[1]) == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    out = tmp_path / "out"
    assert main(["compress", str(model_dir), "--recipe", "svd-llm", "--ratio", "0.3", "--calib-images", "4",
                 "--no-speed", "--quiet", "--out", str(out)]) == 0  # image size from the ViT config: 56
    assert (out / "preprocessor_config.json").is_file()
    assert _normalisation(load_encoder(str(out), "cpu")[1]) == {"mean": (0.5,) * 3, "std": (0.5,) * 3}


def test_preprocessing_normalises_with_the_given_statistics():
    from lrmath_hf import data

    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    imagenet = data.preprocess_images(image, 28)
    half = data.preprocess_images(image, 28, mean=0.5, std=(0.5, 0.25, 0.5))
    pixels = imagenet * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(
        1, 3, 1, 1)
    expected = (pixels - 0.5) / torch.tensor([0.5, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(half, expected, atol=1e-5, rtol=1e-5)
    crops = data.random_crops(image, 3, 28, seed=2, mean=0.5, std=0.5)
    reference = data.random_crops(image, 3, 28, seed=2)  # same crops, ImageNet statistics
    back = reference * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(
        1, 3, 1, 1)
    torch.testing.assert_close(crops, (back - 0.5) / 0.5, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="std must be positive"):
        data.preprocess_images(image, 28, std=0.0)
    with pytest.raises(ValueError, match="one per RGB channel"):
        data.preprocess_images(image, 28, mean=(0.1, 0.2))


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "32"], "--seq-len applies to decoders"),
    (["--calib-windows", "8"], "--calib-windows applies to decoders"),
    (["--tune-layout"], "--tune-layout applies to decoders"),
    (["--calib", "wiki"], "--calib 'wiki': an encoder calibrates on photos or digits or a folder"),
    (["--eval-images", "digits"], "--eval-images 'digits': give photos or a folder"),
    (["--calib-images", "0"], "--calib-images must be at least 1"),
    (["--image-size", "0"], "--image-size must be a positive number"),
    (["--latency-batch", "0"], "--latency-batch must be at least 1"),
    (["--recipe", "global"], "auto handles gated MLPs"),
    (["--option", "nope=1"], "recipe 'flar' has no option 'nope'"),
    (["--option", "statistics=1"], "has no option 'statistics'"),
])
def test_bad_input_for_an_encoder_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, extra, message):
    argv = ["compress", str(tiny / "model"), "--quiet", "--no-speed", "--image-size", SIZE, "--calib-images", "4",
            *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_more_calibration_digits_than_the_split_holds_are_refused(tiny, tmp_path, capsys, monkeypatch):
    from lrmath_hf import zoo

    digits = np.zeros((5, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(zoo, "load_digits_mnist", lambda split: (digits, np.zeros(5, dtype=np.int64)))
    assert main(["compress", str(tiny / "model"), "--calib", "digits", "--calib-images", "6", "--quiet",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the digits' train split has 5" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_an_image_folder_without_images_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compress", str(tiny / "model"), "--calib", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "holds no image files" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--probe"], "--probe applies to encoders"),
                                            (["--image-size", "224"], "--image-size applies to encoders"),
                                            (["--calib-images", "8"], "--calib-images applies to encoders")])
def test_image_options_for_a_decoder_are_refused(tmp_path, capsys, extra, message):
    assert main(["compress", "smollm2-135m", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_default_calibration_uses_the_bundled_photos(tiny, tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    out = tmp_path / "photos"
    assert main(["compress", str(tiny / "model"), "--image-size", SIZE, "--calib-images", "4", "--quiet",
                 "--no-speed", *FLAR_FAST, "--ratio", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == f"photos: 4 images at {SIZE} px"
    assert report["after"]["fidelity_images"] > 16  # every evaluation photo's centre crop, then 16 random crops


def test_probe_is_fitted_on_the_dense_features_and_scores_both_models(tiny, tmp_path, monkeypatch, capsys):
    """The probe's plumbing on a small stand-in for the MNIST digits (the real ones take minutes)."""
    from lrmath_hf import zoo
    from lrmath_hf.cli_vision import _probe, load_encoder

    rng = np.random.default_rng(3)
    labels = np.arange(60) % 3
    images = (rng.integers(0, 60, (60, 28, 28)) + 60 * labels[:, None, None]).astype(np.uint8)  # separable
    monkeypatch.setattr(zoo, "load_digits_mnist",
                        lambda split: (images[:40], labels[:40]) if split == "train" else (images[40:], labels[40:]))
    assert _compress(tiny, tmp_path / "one", 0.3, extra=[*FLAR_FAST, "--no-speed", "--probe"]) == 0
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    dense = load_encoder(str(tiny / "model"), "cpu")[0]
    probe = _probe(dense, {}, quiet=True)
    assert report["before"]["probe_top1_percent"] == pytest.approx(100 * probe.reference_accuracy)
    assert report["after"]["probe_top1_percent"] == pytest.approx(
        100 * probe.score(load_encoder(str(tmp_path / "one"), "cpu")[0]))
    assert "probe_top1_percent" in capsys.readouterr().out


def test_a_classifier_reports_how_often_it_keeps_the_dense_answer(tmp_path, capsys):
    from transformers import ViTForImageClassification

    from lrmath_hf.vision_eval import prediction_agreement

    model_dir = tmp_path / "vit-cls"
    tiny_vision_model("vit", "ViTForImageClassification", dtype=torch.float32).save_pretrained(model_dir)
    assert main(["compress", str(model_dir), "--recipe", "svd-llm", "--ratio", "0.3", "0.6", "--calib-images", "4",
                 "--no-speed", "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert "top-1 agree" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    assert all(0.0 <= row["top1_agreement"] <= 1.0 for row in rows)
    dense = ViTForImageClassification.from_pretrained(model_dir).eval()
    pixels = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert prediction_agreement(dense, dense, pixels, batch_size=4) == 1.0
    flipped = ViTForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        flipped.classifier.weight.neg_()
        flipped.classifier.bias.neg_()
    assert prediction_agreement(dense, flipped, pixels) == 0.0  # argmax of -logits is never the argmax
    with pytest.raises(ValueError, match="no classification head"):
        prediction_agreement(dense.vit, dense.vit, pixels)
    teacher = tiny_vision_model("deit", "DeiTForImageClassificationWithTeacher", dtype=torch.float32)
    assert prediction_agreement(teacher, teacher, pixels) == 1.0  # two heads, averaged logits


def test_latency_batch_times_that_many_images_and_sets_flars_caps(tiny, tmp_path):
    out = tmp_path / "b"
    assert _compress(tiny, out, 0.3, extra=["--latency-batch", "3", "--option", "latency_aware=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["latency_batch"] == report["before"]["latency_batch"] == 3
    assert report["options"] == {"latency_aware": False, "latency_batch": 3}
    explicit = tmp_path / "e"  # an explicit recipe option wins
    assert _compress(tiny, explicit, 0.3, extra=["--latency-batch", "3", "--option", "latency_batch=2",
                                                 *FLAR_FAST]) == 0
    assert json.loads((explicit / "report.json").read_text())["options"]["latency_batch"] == 2


def test_inspect_lists_each_replaced_module_with_its_shape_in_layer_order(tiny, tmp_path, capsys):
    from lrmath_hf.cli import _natural

    out = tmp_path / "one"
    assert _compress(tiny, out, 0.5, extra=[*FLAR_FAST, "--no-speed"]) == 0
    ranks = json.loads((out / "report.json").read_text())["ranks"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "recipe flar; model_type dinov2" in lines[0]
    factorised = [line for line in lines[1:] if "factorized" in line]
    assert len(factorised) == sum(rank != "dense" for rank in ranks.values()) > 0
    assert all(" -> " in line and ", rank " in line for line in factorised)
    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp"]
    assert sorted(names, key=_natural) == ["model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compress_and_eval_on_cuda_write_a_folder_that_reloads_on_the_cpu(tiny, tmp_path, capsys):
    """``--device cuda``: calibration, search, latency table, fidelity and timing on the GPU."""
    out = tmp_path / "o"
    assert _compress(tiny, out, 0.3, extra=["--device", "cuda"]) == 0  # latency-aware: CUDA's own table
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["after"]["cls_cosine"] <= 1 and report["after"]["latency_ms"] > 0
    fidelity = _fidelity_of_saved(tiny, out)  # reloaded on the CPU
    assert fidelity.cls_cosine == pytest.approx(report["after"]["cls_cosine"], abs=1e-4)
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cuda", "--image-size", SIZE, "--eval-images", str(tiny / "eval"),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["cls_cosine"] == pytest.approx(report["after"]["cls_cosine"], abs=1e-4)
