"""The ``lrmath`` command: one-line errors with exit code 2 and nothing written on bad input."""

import subprocess
import sys

import pytest

from lrmath_hf.cli import main


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


def test_unknown_recipe_is_refused_before_any_work(tmp_path, capsys):
    assert main(["compress", "smollm2-135m", "--recipe", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "lrmath_hf", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compress" in out.stdout
