"""The lent-GPU scripts, checked on the CPU: the GPU results page regenerates from the committed
run files (the CUDA benchmark page is re-rendered with the other benchmark pages in
``benchmarks/test_bench_harness.py``), and ``gpu_shapes_e2e`` rebuilds exactly the saved structure."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

import lrmath_hf
from lrmath_hf.modules import count_parameters

from ._tiny_models import tiny_model, token_batch

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_lrmath_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_gpu_page_is_generated_from_the_committed_run():
    page = (ROOT / "docs" / "results-gpu.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(.*?)\n```", page, re.S).group(1)
    assert _script("gpu_report").render(Path("docs/data/h200-2026-11-27"), command) == page


def _save_tiny_compressed(folder):
    """A tiny Llama compressed by ``auto`` at 0.3 and saved with its report, as ``lrmath compress`` writes it."""
    model = tiny_model("llama", dtype=torch.float32)
    batches = [token_batch(seed=s, batch=2, length=24) for s in range(4)]
    report = lrmath_hf.compress(model, batches, recipe="auto", ratio=0.3, progress=False)
    lrmath_hf.save_compressed(model, folder, report=report.to_dict(), recipe="auto")


def test_random_compressed_rebuilds_the_saved_structure(tmp_path):
    """Same modules and shapes as the saved model, new values: what the GPU timings stand on."""
    _save_tiny_compressed(tmp_path / "m")
    shapes = _script("gpu_shapes_e2e")
    rebuilt, manifest = shapes.random_compressed(tmp_path / "m", torch.device("cpu"), torch.float32, seed=1)
    saved = lrmath_hf.load_compressed(tmp_path / "m")
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in saved.named_parameters()}
    assert {n: type(m) for n, m in rebuilt.named_modules()} == {n: type(m) for n, m in saved.named_modules()}
    assert count_parameters(rebuilt) == count_parameters(saved) < count_parameters(
        shapes.random_dense(tmp_path / "m", torch.device("cpu"), torch.float32, seed=0))
    ids = token_batch(seed=5)
    assert not torch.equal(rebuilt(ids).logits, saved(ids).logits)


def test_decode_attention_paths_runs_and_the_paths_agree(tmp_path):
    """The script the CUDA stage ``attn`` runs, here on the CPU at small sizes."""
    import json

    out = tmp_path / "paths.json"
    assert _script("decode_attention_paths").main(
        ["--lengths", "8", "40", "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["cached_tokens"] for row in result["rows"]] == [8, 40]
    for row in result["rows"]:
        assert row["relative_difference"] < 1e-5  # float32 rounding of the same attention
        assert min(row["dense_sdpa_us"], row["padded_us"], row["grouped_us"]) > 0


def test_shapes_script_times_tuned_layouts_beside_the_stock_models(tmp_path):
    """``--tune-layout``: every model also timed as a tuned copy, and its speedup against the tuned dense one."""
    import json

    _save_tiny_compressed(tmp_path / "ratio-0.30")
    out = tmp_path / "shapes.json"
    assert _script("gpu_shapes_e2e").main(
        [str(tmp_path / "ratio-0.30"), "--device", "cpu", "--dtypes", "float32", "--warmup", "0",
         "--prefill-rounds", "1", "--decode-rounds", "1", "--prefill-batches", "1", "--compress-windows", "0",
         "--tune-layout", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]["float32"]
    assert set(rows) == {"dense", "ratio-0.30", "dense+layout", "ratio-0.30+layout"}
    assert "weights" in rows["ratio-0.30+layout"]["layout"]
    for phase in rows["ratio-0.30+layout"]["phases"].values():
        assert phase["speedup_same_layout"] > 0
