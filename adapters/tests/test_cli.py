"""The `lrmath` command: one-line errors, exit code 2, nothing written on bad input; several ratios per run."""

import json
import random
import subprocess
import sys

import pytest
import torch

from lrmath_hf.cli import _ratio_folder, main

from ._interrupt import interrupt_second_save
from ._tiny_models import tiny_model


@pytest.mark.parametrize("argv, message", [
    (["compress", "no-such-model", "--out", "{tmp}/o"], "unknown model"),
    (["compress", "smollm2-135m", "--ratio", "1.5", "--out", "{tmp}/o"], "--ratio"),
    (["compress", "smollm2-135m", "--ratio", "0", "--out", "{tmp}/o"], "--ratio"),
    (["compress", "smollm2-135m", "--out", "{tmp}/exists"], "exists"),
])
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_a_folder_that_does_not_exist_is_one_line_error(command, tmp_path, capsys):
    # (a hub id goes the same way, but without a network each try waits for a timeout)
    extra = ["--out", str(tmp_path / "o")] if command == "compress" else []
    assert main([command, str(tmp_path / "no-such-folder"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a zoo name" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device, message", [("tpu:7", "not a device"), ("nonsense", "not a device"),
                                             ("meta", "supported are")])
def test_bad_device_is_refused_before_any_work(device, message, tmp_path, capsys):
    code = main(["compress", "smollm2-135m", "--device", device, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, capsys):
    assert main(["compress", "smollm2-135m", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_unknown_recipe_is_refused_before_any_work(tmp_path, capsys):
    assert main(["compress", "smollm2-135m", "--recipe", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, message", [
    (["--option", "nope=1"], "recipe 'auto' has no option 'nope'; its options: qk"),
    (["--option", "stats=1"], "has no option 'stats'"),  # data, not a setting
    (["--option", "selection"], "--option takes KEY=VALUE, got 'selection'"),
    (["--recipe", "svd-llm", "--option", "selection=obs"], "recipe 'svd-llm' has no option 'selection'"),
])
def test_bad_recipe_options_are_refused_before_any_work(options, message, tmp_path, capsys):
    assert main(["compress", "smollm2-135m", *options, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_encoder_folder_saved_from_python_is_evaluated_on_images(tmp_path, capsys):
    """No report.json names a reference: parameters and latency, no fidelity (test_cli_vision has the rest)."""
    from lrmath_hf.io import save_compressed

    from .test_vision_specs import tiny_vision_model

    folder = save_compressed(tiny_vision_model("dinov2", dtype=torch.float32), tmp_path / "vit")
    assert main(["eval", str(folder), "--image-size", "56", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] > 0 and result["latency_ms"] > 0 and "cls_cosine" not in result


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "lrmath_hf", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compress" in out.stdout


# --- several ratios in one run, on a tiny local model folder -------------------------------------------------

TINY_ARGS = ["--seq-len", "32", "--calib-windows", "8", "--eval-windows", "4", "--quiet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer Llama saved with a byte-level tokenizer, and a calibration text file."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", dtype=torch.float32, vocab_size=256).save_pretrained(root / "model")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "model")
    rng = random.Random(0)
    words = ["the", "model", "low", "rank", "matrix", "of", "a", "and", "is", "spectrum"]
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    return root


def _compress(tiny_folder, out, *ratios, extra=()):
    return main(["compress", str(tiny_folder / "model"), "--calib", str(tiny_folder / "text.txt"), *TINY_ARGS,
                 *extra, "--ratio", *map(str, ratios), "--out", str(out)])


def _no_staging_left(folder):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_several_ratios_write_one_loadable_folder_each_and_a_summary(tiny_folder, tmp_path, capsys):
    from lrmath_hf.io import load_compressed

    out = tmp_path / "sweep"
    assert _compress(tiny_folder, out, 0.4, 0.2) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["ratio", "removed"] and [line.split()[0] for line in table[1:4]] == [
        "dense", "0.2", "0.4"]
    assert sorted(p.name for p in out.iterdir()) == ["perplexity_vs_ratio.png", "ratio-0.20", "ratio-0.40",
                                                     "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["ratio_requested"] for r in summary["rows"]] == [0.2, 0.4]
    assert summary["calibration"]["shared"] is True
    for key in ("perplexity", "prefill_tokens_per_s", "decode_tokens_per_s", "parameters", "file_bytes"):
        assert key in summary["dense"] and all(key in r for r in summary["rows"])
    for row in summary["rows"]:  # each ratio timed beside the dense model, which it records
        assert row["speed_timing"] == "interleaved" and row["dense_prefill_tokens_per_s"] > 0
    assert summary["rows"][0]["parameters"] > summary["rows"][1]["parameters"]
    ids = torch.arange(16)[None]
    for row in summary["rows"]:
        folder = out / row["folder"]
        report = json.loads((folder / "report.json").read_text())
        assert report["ratio_requested"] == row["ratio_requested"] and "stats" not in report["options"]
        assert abs(report["ratio_achieved"] - row["ratio_achieved"]) < 1e-12
        assert (folder / "ranks.png").read_bytes().startswith(PNG_SIGNATURE)
        model = load_compressed(folder)
        assert torch.isfinite(model(input_ids=ids).logits).all()
        assert sum(p.numel() for p in model.parameters()) <= row["parameters"]  # tied weights counted once
    assert (out / "perplexity_vs_ratio.png").read_bytes().startswith(PNG_SIGNATURE)
    assert _no_staging_left(tmp_path)


def test_shared_calibration_matches_a_single_ratio_run(tiny_folder, tmp_path):
    assert _compress(tiny_folder, tmp_path / "sweep", 0.2, 0.4, extra=["--no-speed"]) == 0
    assert _compress(tiny_folder, tmp_path / "one", 0.4, extra=["--no-speed"]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())  # one ratio: the folder is the model
    assert not (tmp_path / "one" / "summary.json").exists()
    swept = json.loads((tmp_path / "sweep" / "ratio-0.40" / "report.json").read_text())
    assert swept["ranks"] == one["ranks"]
    assert swept["after"]["parameters"] == one["after"]["parameters"]
    assert swept["after"]["perplexity"] == pytest.approx(one["after"]["perplexity"], rel=1e-5)


def test_recipe_options_reach_every_ratio_and_the_report(tiny_folder, tmp_path):
    # VALUE is read as JSON (0.01: a number), else kept as text (obs)
    extra = ["--no-speed", "--recipe", "flat", "--option", "selection=obs", "--option", "ridge=0.01"]
    assert _compress(tiny_folder, tmp_path / "sweep", 0.2, 0.4, extra=extra) == 0
    assert _compress(tiny_folder, tmp_path / "one", 0.4, extra=extra) == 0
    for report in (tmp_path / "sweep" / "ratio-0.20" / "report.json", tmp_path / "sweep" / "ratio-0.40" / "report.json",
                   tmp_path / "one" / "report.json"):
        payload = json.loads(report.read_text())
        assert payload["options"] == {"selection": "obs", "ridge": 0.01}
        assert payload["details"]["selection"] == "obs" and payload["details"]["ridge"] == 0.01


def test_the_folder_carries_its_tokenizer_so_eval_needs_no_base_model(tiny_folder, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_folder / "model", base)
    out = tmp_path / "small"
    assert main(["compress", str(base), "--calib", str(tiny_folder / "text.txt"), *TINY_ARGS, "--no-speed",
                 "--ratio", "0.3", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    shutil.rmtree(base)  # report.json still names it; eval must not need it
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(tiny_folder / "text.txt"), "--seq-len", "32", "--eval-windows",
                 "2", "--no-speed", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_eval_against_a_reference_scores_both_on_the_same_windows(tiny_folder, tmp_path, capsys):
    out = tmp_path / "small"
    assert _compress(tiny_folder, out, 0.3, extra=["--no-speed"]) == 0
    after = json.loads((out / "report.json").read_text())["after"]
    before = json.loads((out / "report.json").read_text())["before"]
    capsys.readouterr()
    argv = ["eval", str(out), "--reference", str(tiny_folder / "model"), "--text", str(tiny_folder / "text.txt"),
            "--seq-len", "32", "--eval-windows", "4", "--quiet"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(tiny_folder / "model")
    # compress scored the same 4 windows: the first ones of the same text file
    assert result["perplexity"] == pytest.approx(after["perplexity"], rel=1e-5)
    assert result["reference_perplexity"] == pytest.approx(before["perplexity"], rel=1e-5)
    assert result["parameters"] < result["reference_parameters"]
    assert result["speed_timing"] == result["reference_speed_timing"] == "interleaved"
    assert result["decode_tokens_per_s"] > 0 and result["reference_decode_tokens_per_s"] > 0
    other = tmp_path / "other-vocab"
    tiny_model("llama", dtype=torch.float32, vocab_size=300).save_pretrained(other)  # and no tokenizer
    capsys.readouterr()
    assert main([*argv[:2], "--reference", str(other), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "vocabulary of 300 tokens" in err and len(err.splitlines()) == 1
    assert main(["compress", str(other), *TINY_ARGS, "--out", str(tmp_path / "o")]) == 2  # nothing to tokenise with
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_eval_of_a_folder_saved_from_python_finds_its_tokenizer(tiny_folder, tmp_path, capsys):
    """A folder written by save_compressed has no report.json: a tokenizer saved beside it is used,
    and without one the error says what to do."""
    import shutil

    from transformers import AutoModelForCausalLM

    import lrmath_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_folder / "model")
    lrmath_hf.compress(model, torch.randint(0, model.config.vocab_size, (4, 32)), recipe="svd-llm", ratio=0.3,
                       progress=False)
    folder = lrmath_hf.save_compressed(model, tmp_path / "py")
    argv = ["eval", str(folder), "--text", str(tiny_folder / "text.txt"), "--seq-len", "32", "--eval-windows", "2",
            "--no-speed", "--quiet"]
    assert main(argv) == 2
    assert "has no tokenizer and no report.json" in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_folder / "model" / name).exists():
            shutil.copy(tiny_folder / "model" / name, folder / name)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_interrupt_during_a_sweep_leaves_nothing(tiny_folder, tmp_path, monkeypatch, capsys):
    from lrmath_hf import cli_text

    interrupt_second_save(monkeypatch, cli_text)
    assert _compress(tiny_folder, tmp_path / "sweep", 0.2, 0.4, extra=["--no-speed"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists() and _no_staging_left(tmp_path)


@pytest.mark.parametrize("ratios, message", [
    (["0.2", "0.2"], "twice"),
    (["0.2", "0.20"], "twice"),
    (["0.2", "1.5"], "--ratio must be in (0, 1)"),
    (["0.1", "0"], "--ratio must be in (0, 1)"),
])
def test_bad_ratio_lists_are_refused_before_any_work(ratios, message, tmp_path, capsys):
    code = main(["compress", "smollm2-135m", "--ratio", *ratios, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and _no_staging_left(tmp_path)


def test_ratio_folder_names_keep_distinct_ratios_apart():
    assert _ratio_folder(0.2) == "ratio-0.20" and _ratio_folder(0.1) == "ratio-0.10"
    assert _ratio_folder(0.205) == "ratio-0.205" != _ratio_folder(0.2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compress_on_cuda_writes_a_folder_that_reloads(tiny_folder, tmp_path):
    """``--device cuda``: calibration, surgery and evaluation on the GPU; the saved folder loads on the CPU."""
    from lrmath_hf.io import load_compressed

    assert _compress(tiny_folder, tmp_path / "o", 0.3, extra=("--device", "cuda")) == 0
    model = load_compressed(tmp_path / "o")
    assert all(p.device.type == "cpu" for p in model.parameters())
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 0.2 <= report["ratio_achieved"] <= 0.4


@pytest.mark.parametrize("extra, timing", [((), "interleaved"), (("--sequential-speed",), None)])
def test_one_ratio_times_dense_and_compressed_as_asked(tiny_folder, tmp_path, extra, timing):
    """By default the dense model is timed in the same interleaved rounds as the compressed one."""
    out = tmp_path / "one"
    assert _compress(tiny_folder, out, 0.3, extra=extra) == 0
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert report[side]["prefill_tokens_per_s"] > 0 and report[side]["decode_tokens_per_s"] > 0
        assert report[side].get("speed_timing") == timing
        assert report[side]["speed_layout"] == "stock"


@pytest.mark.parametrize("extra", [(), ("--sequential-speed",)])
def test_tuned_layout_is_timed_on_both_sides_and_not_saved(tiny_folder, tmp_path, extra):
    """Sequentially the dense model is tuned in place before compression, which reads values only."""
    out = tmp_path / "tuned"
    assert _compress(tiny_folder, out, 0.3, extra=["--tune-layout", *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["speed_layout"] == report["after"]["speed_layout"] == "tuned"
    from lrmath_hf.io import load_compressed

    reloaded = load_compressed(out)
    assert all(p.is_contiguous() for p in reloaded.parameters())
