"""End-to-end speed of compressed models on a GPU, from their saved structure alone.

The lent GPU machine cannot receive the real SmolLM2 weights (its working-tree
limit is 64 MiB; the GGUF is 94 MiB). Speed depends on the shapes, not on the
values, so this script rebuilds each saved model's exact structure from its
``manifest.json`` + ``config.json`` (written by ``lrmath compress``), fills it
with random weights through the real reload path (``save_file`` then
:func:`lrmath_hf.io.load_compressed`), and times it against the dense model of
the same config, in one process, rounds interleaved.

Also times ``lrmath_hf.compress`` (calibration + compression) on the device
against the dense forward over the same calibration tokens, on the random
dense model: its cost depends on shapes too, while its ranks do not carry
meaning (random weights), so only the time is reported.

Usage::

    lrmath compress smollm2-135m --recipe auto --ratio 0.1 0.2 0.3 0.4 0.5 \
        --eval-windows 0 --no-speed --out runs/smollm2-auto-sweep
    python scripts/gpu_shapes_e2e.py runs/smollm2-auto-sweep/ratio-* --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "adapters")]

from lrmath_hf.io import _model_class, build_skeleton, load_compressed, read_manifest  # noqa: E402
from lrmath_hf.latency import _sync  # noqa: E402
from lrmath_hf.modules import count_parameters  # noqa: E402

PREFILL, DECODE, PROMPT = 512, 64, 32


def random_compressed(folder: Path, device, dtype, seed: int):
    """The saved model's structure with random weights, loaded by ``load_compressed``."""
    from safetensors.torch import save_file

    skeleton, manifest = build_skeleton(folder)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in skeleton.state_dict().items():
        if name in manifest["tied"]:
            continue
        if t.is_floating_point():
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
        else:
            tensors[name] = torch.zeros(t.shape, dtype=t.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("config.json", "manifest.json"):
            shutil.copy(folder / f, tmp)
        save_file(tensors, str(Path(tmp) / manifest["files"]["weights"]))
        return load_compressed(tmp, device=device, dtype=dtype), manifest


def random_dense(folder: Path, device, dtype, seed: int):
    from transformers import AutoConfig

    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = _model_class(manifest["model_class"])._from_config(
        config, attn_implementation=manifest.get("attn_implementation"))
    return model.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def time_all(models: dict, device, vocab: int, *, warmup: int, prefill_rounds: int, decode_rounds: int,
             prefill_batches=(1,)) -> dict:
    """Median seconds per model of each phase: ``prefill_b{B}`` (B x 512 tokens) and ``decode``."""
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, vocab, (b, PREFILL), generator=gen).to(device) for b in prefill_batches}
    short = prompts[min(prefill_batches)][:1, :PROMPT].contiguous()

    def prefill(ids):
        return lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).logits

    def decode(m):
        out = m.generate(input_ids=short, attention_mask=torch.ones_like(short), max_new_tokens=DECODE,
                         min_new_tokens=DECODE, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape == (1, PROMPT + DECODE), out.shape
        return out

    phases = [(f"prefill_b{b}", prefill(ids), prefill_rounds, b * PREFILL) for b, ids in prompts.items()]
    phases.append(("decode", decode, decode_rounds, DECODE))
    times = {name: {phase: [] for phase, *_ in phases} for name in models}
    for phase, fn, rounds, _ in phases:
        for r in range(warmup + rounds):
            for name, m in models.items():  # interleaved: drifts hit every model alike
                _sync(device)
                start = time.perf_counter()
                fn(m)
                _sync(device)
                if r >= warmup:
                    times[name][phase].append(time.perf_counter() - start)
    summary = {}
    for name in models:
        row = {}
        for phase, _, _, tokens in phases:
            t = statistics.median(times[name][phase])
            row[phase] = {"median_s": t, "tokens_per_s": tokens / t, "seconds": times[name][phase]}
        summary[name] = row
    return summary


def peak_bytes(model, device, vocab: int) -> int | None:
    if device.type != "cuda":
        return None
    prompt = torch.randint(0, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(2)).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def time_compress(folder: Path, device, *, windows: int, seq_len: int, ratio: float, recipe: str) -> dict:
    """Calibration + compression against the dense forward over the same tokens (one timed round each)."""
    import lrmath_hf

    dense = random_dense(folder, device, torch.float32, seed=0)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (windows, seq_len), generator=torch.Generator().manual_seed(3)).to(device)
    batches = list(torch.split(ids, 1))

    @torch.inference_mode()
    def forward(ws):
        for w in ws:
            dense(input_ids=w, use_cache=False)
        _sync(device)

    def compress(ws):
        model = copy.deepcopy(dense)
        report = lrmath_hf.compress(model, ws, recipe=recipe, ratio=ratio, progress=False)
        _sync(device)
        return report

    forward(batches[:4])
    compress(batches[:8])  # warm-up: kernels, solver handles, allocator
    _sync(device)
    start = time.perf_counter()
    forward(batches)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    report = compress(batches)
    compress_s = time.perf_counter() - start
    return {"recipe": recipe, "ratio": ratio, "windows": windows, "seq_len": seq_len,
            "dense_forward_s": forward_s, "compress_s": compress_s, "compress_over_forward": compress_s / forward_s,
            "ratio_achieved": report.ratio_achieved, "timings": dict(report.timings)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="folders written by lrmath compress")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefill-rounds", type=int, default=20)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 32],
                    help="prefill batch sizes (each row 512 tokens)")
    ap.add_argument("--compress-windows", type=int, default=64, help="0: skip the compression timing")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tune-layout", action="store_true",
                    help="also time a copy of every model with lrmath_hf.tune_decode_layout applied "
                         "(rows NAME+layout; their speedup_same_layout is against dense+layout)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    folders = sorted(args.folders)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "prefill_tokens": PREFILL, "decode_tokens": DECODE,
              "prompt_tokens": PROMPT, "weights": "random (shapes from the saved manifests)", "runs": {}}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"dense": random_dense(folders[0], device, dtype, seed=0)}
        facts = {"dense": {"params": count_parameters(models["dense"]), "ratio": None}}
        for i, folder in enumerate(folders):
            model, manifest = random_compressed(folder, device, dtype, seed=10 + i)
            report = manifest.get("report") or {}
            models[folder.name] = model
            facts[folder.name] = {"params": count_parameters(model), "ratio": report.get("ratio_requested"),
                                  "ratio_achieved": report.get("ratio_achieved")}
        if args.tune_layout:
            from lrmath_hf.layout import tune_decode_layout

            timings: dict = {}
            for name in list(models):
                tuned = copy.deepcopy(models[name])
                layout = tune_decode_layout(tuned, timings=timings)
                models[f"{name}+layout"] = tuned
                facts[f"{name}+layout"] = {**facts[name], "layout": layout.summary()}
                print(f"{dtype_name:9s} {name:12s} layout: {layout.summary()}", flush=True)
        vocab = models["dense"].config.vocab_size
        for name, m in models.items():
            facts[name]["peak_prefill_bytes"] = peak_bytes(m, device, vocab)
        timing = time_all(models, device, vocab, warmup=args.warmup, prefill_rounds=args.prefill_rounds,
                          decode_rounds=args.decode_rounds, prefill_batches=args.prefill_batches)
        rows = {name: {**facts[name], "phases": timing[name]} for name in models}
        dense = rows["dense"]
        for name, row in rows.items():
            row["params_ratio"] = dense["params"] / row["params"]
            cells = []
            for phase, t in row["phases"].items():
                t["speedup"] = dense["phases"][phase]["median_s"] / t["median_s"]
                if name.endswith("+layout"):  # both sides tuned
                    t["speedup_same_layout"] = rows["dense+layout"]["phases"][phase]["median_s"] / t["median_s"]
                cells.append(f"{phase} {t['tokens_per_s']:9.1f} tok/s ({t['speedup']:.2f}x)")
            print(f"{dtype_name:9s} {name:12s} params {row['params'] / 1e6:7.2f}M ({row['params_ratio']:.3f}x)  "
                  + "  ".join(cells), flush=True)
        result["runs"][dtype_name] = rows
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        args.json.write_text(json.dumps(result, indent=1))
    if args.compress_windows:
        middle = folders[len(folders) // 2]
        result["compress"] = time_compress(middle, device, windows=args.compress_windows, seq_len=args.seq_len,
                                           ratio=0.2, recipe="auto")
        c = result["compress"]
        print(f"compress auto 0.2 on {args.compress_windows}x{args.seq_len} tokens: {c['compress_s']:.2f} s, "
              f"dense forward {c['dense_forward_s']:.3f} s, ratio {c['compress_over_forward']:.1f}x", flush=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
