"""Docs contract: every theorem page names tests that exist, and the site builds with warnings as errors."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_REF = re.compile(r"((?:proofs_tests|adapters/tests|benchmarks)/[\w/]+\.py)::(\w+)")


def _theorem_pages():
    return sorted((ROOT / "docs" / "theorems").glob("*.md"))


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("page", _theorem_pages(), ids=lambda p: p.stem)
def test_theorem_page_cites_existing_tests(page):
    refs = TEST_REF.findall(page.read_text())
    assert refs, f"{page.name} names no proving test (proofs_tests/<file>.py::<test>)"
    for file, name in refs:
        path = ROOT / file
        assert path.exists(), f"{page.name} cites missing file {file}"
        assert name in _defined_tests(path), f"{page.name} cites {file}::{name}, which does not exist"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("numpydoc")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-4000:]
