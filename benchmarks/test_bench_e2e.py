"""End to end: compressing a real decoder, and what the compressed model buys.

Full mode (``LRMATH_BENCH_FULL=1``): the real SmolLM2-135M from the model zoo
(``lrmath_hf.zoo.load_model("smollm2-135m")``, float32) and the evaluation
protocol's text. Smoke mode (the default, what CI runs): the same code on a
tiny two-layer random Llama from ``adapters/tests/_tiny_models.py`` and small
sizes, so the module never rots and takes seconds.

Two kinds of comparison, each measured side by side in one run:

* **Calibration + compression vs the dense forward** (``test_e2e_compress``):
  ``lrmath_hf.compress(model, windows, recipe=r, ratio=0.2)`` for ``r`` in
  auto / flat / svd against one dense forward pass (``model(ids,
  use_cache=False)``, the LM head included) over the same calibration windows
  (64 x 512 tokens in full mode). Goal: compression takes <= 1.5x the dense
  forward, i.e. speedup (dense time / compression time) >= 0.67x. Compression
  changes the model in place, so every round compresses a fresh
  ``copy.deepcopy`` made by pytest-benchmark's ``setup`` outside the timer.
  Each round is minutes long on a CPU, so this group times 3 rounds (5 in
  smoke mode), after a warm-up over a few windows only (imports, first-call
  costs); both are recorded in ``extra_info``.
* **Compressed vs dense at each ratio** (``test_e2e_inference``), default
  recipe (auto) at ratios 0.1 .. 0.5 (smoke: 0.2), each model compressed once
  outside the timers, all from one calibration (``union_plan``): prefill (one forward over a 1 x 512 prompt that fills a
  fresh KV cache, as ``lrmath_hf.evaluate.throughput`` times it) and decode
  (greedy ``generate`` of 64 new tokens with the KV cache from a 32-token
  prompt; the time includes that short prompt's prefill). The dense model is
  the baseline of each group. Recorded per model: parameters (all, and the
  decoder linears q/k/v/o/gate/up/down), the size of ``model.safetensors``
  written by ``lrmath_hf.save_compressed`` for *both* models (same writer, so
  the same format overhead), and peak memory (below). Goal for each compressed
  model: speedup >= 0.8 x (dense parameters / compressed parameters), all
  model parameters counted, judged on **interleaved pairs**: after its
  pytest-benchmark rounds, each compressed model and the dense model are timed
  back to back for ``PAIR_ROUNDS`` rounds, the order reversed every other
  round (``_harness.paired_rounds``); the speedup is the median of the
  per-round ratios, recorded in ``extra_info["paired"]``. pytest-benchmark
  times one model's rounds after the other's, so a change in the machine's
  load between them passes for speed: two idle full runs on the 2-core
  reference machine gave decode ratios up to 0.3x apart. The sequential ratio
  is still reported beside the paired one.

Decode layout (``extra_info["layout"]``, both phases): ``lrmath_hf.tune_decode_layout``
lays out each linear weight the way its one-token product runs faster on this
device. It speeds up the dense model as well, so it is measured apart from the
goals: the dense model's row pairs the tuned dense model against the stock one,
and each compressed model's row pairs its tuned copy against the tuned dense
model (``PAIR_ROUNDS`` interleaved rounds each), i.e. the compression's speedup
when both sides get the same treatment. Tuned and stock outputs are checked to
agree. The goals stay judged on the stock models.

Peak memory = the model's weights (parameters + buffers) + the peak extra
memory of one prefill (or one decode) above what was resident just before it:
on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
on the CPU the growth of the resident set's high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``) after ``malloc_trim(0)`` has handed the
allocator's free pages back to the kernel, so that the call's activations, KV
cache and temporaries land on pages it newly touches (without the trim, pages
kept from earlier calls hide most of them). ``memory_method`` in
``extra_info`` says which was used; the fallback without ``/proc`` is the
growth of ``ru_maxrss``, a lower bound.

CUDA parameters run where a GPU is present (dense model timed in the same
run) and are skipped otherwise. Timed functions synchronise CUDA before the
timer is read.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import time
from pathlib import Path

import pytest

from ._harness import (FULL, cuda_available, device_name, paired_rounds, size, synchronize,
                       thread_settings)

torch = pytest.importorskip("torch")
lrmath_hf = pytest.importorskip("lrmath_hf")

from lrmath_hf.evaluate import _pad_id as evaluate_pad_id  # noqa: E402
from lrmath_hf.io import WEIGHTS, save_compressed  # noqa: E402
from lrmath_hf.layout import tune_decode_layout  # noqa: E402
from lrmath_hf.modules import count_parameters  # noqa: E402
from lrmath_hf.recipes.common import linear_parameters, run_calibration, union_plan  # noqa: E402
from lrmath_hf.specs import get_spec  # noqa: E402

MODEL = "smollm2-135m" if FULL else "tiny-llama"
CAL_WINDOWS = size(4, 64)       # calibration windows (protocol: 64)
SEQ_LEN = size(64, 512)         # tokens per calibration window
WARMUP_WINDOWS = size(4, 8)     # compression warm-up: enough tokens for full-rank MLP statistics
COMPRESS_RATIO = 0.2
RECIPES = ["auto", "flat", "svd"]
COMPRESS_ROUNDS = size(5, 3)    # rounds are minutes long in full mode
RATIOS = size([0.2], [0.1, 0.2, 0.3, 0.4, 0.5])
DEFAULT_RECIPE = "auto"
PREFILL_TOKENS = size(64, 512)
DECODE_TOKENS = size(8, 64)
PROMPT_TOKENS = size(8, 32)     # decode prompt
PAIR_ROUNDS = size(3, 9)        # interleaved dense/compressed pairs per ratio and phase
SPEEDUP_FACTOR = 0.8            # goal: speedup >= 0.8 x dense params / compressed params
COMPRESS_GOAL = 1.5             # goal: compression time <= 1.5 x dense forward time

BACKENDS = [
    pytest.param("torch-cpu", id="cpu"),
    pytest.param("torch-cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device")]),
]
MODEL_MARKS = [pytest.mark.model] if FULL else []
pytestmark = MODEL_MARKS


# ------------------------------------------------------------------ models
def _tiny_models():
    """``adapters/tests/_tiny_models.py``, loaded by path (``adapters`` is not on sys.path here)."""
    path = Path(lrmath_hf.__file__).resolve().parent.parent / "tests" / "_tiny_models.py"
    spec = importlib.util.spec_from_file_location("_lrmath_bench_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_dense():
    """``(model, description, calibration windows, prefill prompt, decode prompt)`` on the CPU."""
    if FULL:
        from lrmath_hf.data import protocol_windows
        from lrmath_hf.zoo import MODELS, load_model

        model, tokenizer = load_model(MODEL, dtype=torch.float32)
        windows = protocol_windows(tokenizer, "calibration", seq_len=SEQ_LEN, n_windows=CAL_WINDOWS)
        prompt = protocol_windows(tokenizer, "evaluation", seq_len=PREFILL_TOKENS, n_windows=1)
        description = MODELS[MODEL]["description"]
    else:
        tiny = _tiny_models()
        model = tiny.tiny_model("llama", dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        windows = torch.randint(0, vocab, (CAL_WINDOWS, SEQ_LEN), generator=gen)
        prompt = torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=gen)
        description = "tiny random Llama (2 layers, hidden 64, GQA 4/2, MLP 128; smoke mode)"
    return model.eval(), description, windows, prompt, prompt[:, :PROMPT_TOKENS].clone()


def _file_bytes(model, folder: Path) -> dict:
    """Sizes written by ``lrmath_hf.save_compressed`` (the same writer for dense and compressed)."""
    import shutil

    save_compressed(model, folder)
    try:
        weights = (folder / WEIGHTS).stat().st_size
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"file_bytes": weights, "folder_bytes": total}


def _weights_bytes(model) -> int:
    """Bytes of the distinct parameter and buffer storages (tied weights counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _model_facts(model, folder: Path) -> dict:
    spec = get_spec(model)
    return {"params_model": count_parameters(model), "params_linear": linear_parameters(model, spec),
            "weights_bytes": _weights_bytes(model), **_file_bytes(model, folder)}


# ------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Set the kernel's VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Return glibc's free heap pages to the kernel (False where there is no ``malloc_trim``)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_extra_bytes(fn, backend: str) -> tuple[int, str]:
    """Peak memory of ``fn()`` above what was in use just before it, and how it was measured."""
    gc.collect()
    if backend == "torch-cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    trimmed = _malloc_trim()
    if _reset_rss_peak():
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if before is not None and peak is not None:
            how = "VmHWM - VmRSS (peak reset via /proc/self/clear_refs"
            how += ", after malloc_trim(0))" if trimmed else "; no malloc_trim: lower bound)"
            return max(0, peak - before) * 1024, how
    import resource

    # no reset: growth of the lifetime maximum RSS (0 when an earlier peak was higher)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after - before) * 1024, "ru_maxrss growth (not resettable: lower bound)"


# ------------------------------------------------------------------ fixtures
def _make_case(backend: str, host: dict, tmp_path_factory) -> dict:
    """The dense model on the backend's device, its inputs, and its facts."""
    device = "cuda" if backend == "torch-cuda" else "cpu"
    model = host["model"] if device == "cpu" else copy.deepcopy(host["model"]).to(device)
    windows, prompt = host["windows"].to(device), host["prompt"].to(device)
    with torch.inference_mode():
        logits = model(input_ids=prompt, use_cache=False).logits
    return {
        "backend": backend, "device": device, "model": model, "description": host["description"],
        "windows": windows, "batches": list(torch.split(windows, 1)),
        "prompt": prompt, "decode_prompt": host["decode_prompt"].to(device),
        "dense_facts": host["facts"], "dense_top1": logits.argmax(-1).cpu(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "tmp": tmp_path_factory,
    }


@pytest.fixture(scope="module")
def e2e_cases(tmp_path_factory):
    """``get(backend)``: the dense case of a backend, built on first use and kept for the module.

    The model is loaded once (on the CPU) and copied to CUDA where that is asked for, so that
    the order pytest picks for the tests never reloads it.
    """
    cases: dict = {}

    def get(backend: str) -> dict:
        if "host" not in cases:
            model, description, windows, prompt, decode_prompt = _load_dense()
            facts = _model_facts(model, tmp_path_factory.mktemp("dense") / "model")
            cases["host"] = {"model": model, "description": description, "windows": windows,
                             "prompt": prompt, "decode_prompt": decode_prompt, "facts": facts}
        if backend not in cases:
            cases[backend] = _make_case(backend, cases["host"], tmp_path_factory)
        return cases[backend]

    yield get
    cases.clear()
    gc.collect()
    if cuda_available():
        torch.cuda.empty_cache()


def _variant_params():
    params = []
    for backend in BACKENDS:
        for ratio in [None] + RATIOS:
            name = "dense" if ratio is None else f"{DEFAULT_RECIPE}-{ratio}"
            params.append(pytest.param((backend.values[0], ratio), marks=backend.marks,
                                       id=f"{backend.id}-{name}"))
    return params


@pytest.fixture(scope="module", params=_variant_params())
def variant(request, e2e_cases):
    """The dense model (ratio None) or the default recipe's compression at one ratio, compressed once."""
    backend, ratio = request.param
    case = e2e_cases(backend)
    if ratio is None:
        yield {"case": case, "model": case["model"], "ratio": None, "facts": case["dense_facts"], "report": None}
        return
    if "stats" not in case:  # one calibration serves every ratio (compression is outside the timers here)
        spec = get_spec(case["model"])
        case["stats"] = run_calibration(case["model"], spec, case["batches"], union_plan(spec), progress=False)
    model = copy.deepcopy(case["model"])
    report = lrmath_hf.compress(model, case["batches"], recipe=DEFAULT_RECIPE, ratio=ratio, progress=False,
                                stats=case["stats"])
    model.eval()
    facts = _model_facts(model.to("cpu"), case["tmp"].mktemp(f"auto-{ratio}") / "model")
    model = model.to(case["device"])
    yield {"case": case, "model": model, "ratio": ratio, "facts": facts, "report": report}
    del model
    gc.collect()


# ------------------------------------------------------------------ helpers
def _common_info(backend: str, role: str, label: str, shape, dtype: str = "float32") -> dict:
    """The fields ``Bench`` records, for the benchmarks here that call ``pedantic`` themselves."""
    return {"role": role, "label": label, "backend": backend, "device": device_name(backend),
            "dtype": dtype, "shape": list(shape), "threads": thread_settings(), "full_mode": FULL}


def _pad_id(model):
    pad = evaluate_pad_id(model)  # the same choice as lrmath_hf.evaluate's timing
    return 0 if pad is None else pad


# ------------------------------------------------ calibration + compression
COMPRESS_SIDES = ["dense-forward"] + RECIPES


@pytest.mark.parametrize("side", COMPRESS_SIDES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_e2e_compress(benchmark, e2e_cases, backend, side):
    e2e = e2e_cases(backend)
    dense, batches = e2e["model"], e2e["batches"]
    n, seq = e2e["windows"].shape
    group = (f"e2e calibration+compression vs dense forward: {MODEL} {n}x{seq} tokens, "
             f"ratio {COMPRESS_RATIO} ({backend})")
    benchmark.group = group
    extra = benchmark.extra_info
    warmup = batches[:WARMUP_WINDOWS]
    e2e_info = {"kind": "compress", "model": MODEL, "model_description": e2e["description"],
                "recipe": None if side == "dense-forward" else side, "ratio": COMPRESS_RATIO,
                "calibration_windows": n, "seq_len": seq,
                "attn_implementation": e2e["attn_implementation"]}

    if side == "dense-forward":
        label = f"dense forward over the {n} calibration windows (use_cache=False, LM head included)"
        extra.update(_common_info(backend, "baseline", label, (n, seq)), e2e=e2e_info)

        @torch.inference_mode()
        def run(windows=batches):
            out = None
            for ids in windows:
                out = dense(input_ids=ids, use_cache=False).logits
            synchronize(backend)
            return out

        setup = None
    else:
        label = f"lrmath_hf.compress(recipe={side!r}, ratio={COMPRESS_RATIO}) on a fresh copy"
        goal = {"metric": "speedup", "op": ">=", "target": 1.0 / COMPRESS_GOAL,
                "text": f"calibration + compression <= {COMPRESS_GOAL}x the dense forward over the same "
                        f"tokens (speedup >= {1.0 / COMPRESS_GOAL:.2f}x)"}
        extra.update(_common_info(backend, "candidate", label, (n, seq)), e2e=e2e_info, goal=goal)

        def run(model, windows=batches):
            report = lrmath_hf.compress(model, windows, recipe=side, ratio=COMPRESS_RATIO, progress=False)
            synchronize(backend)
            return model, report

        def setup():  # outside the timer
            gc.collect()
            return (copy.deepcopy(dense),), {}

    if not benchmark.disabled:
        # warm-up on a few windows only (imports, kernels, allocator): a full round is minutes long
        args = () if setup is None else (copy.deepcopy(dense),)
        start = time.perf_counter()
        run(*args, warmup)
        del args
        extra.update(warmup_s=time.perf_counter() - start, warmup_windows=len(warmup),
                     rounds=COMPRESS_ROUNDS, iterations=1, loadavg_before=os.getloadavg()[0],
                     rounds_note=f"{COMPRESS_ROUNDS} rounds: each is one full pass over the calibration "
                                 "windows (minutes on a CPU in full mode)")
        result = benchmark.pedantic(run, setup=setup, rounds=COMPRESS_ROUNDS, iterations=1, warmup_rounds=0)
        extra["loadavg_after"] = os.getloadavg()[0]
    else:
        result = benchmark.pedantic(run, setup=setup)

    if side == "dense-forward":
        assert torch.isfinite(result).all()
        return
    model, report = result
    extra.update(ratio_achieved=report.ratio_achieved, model_ratio_achieved=report.model_ratio_achieved,
                 params_model=report.model_params_after, params_linear=report.linear_params_after,
                 params_model_dense=report.model_params_before,
                 params_linear_dense=report.linear_params_before,
                 compress_timings=dict(report.timings), calibration_tokens=report.calibration["tokens"])
    # the model really shrank, about as asked, and still computes
    assert report.calibration["tokens"] == n * seq
    assert 0.5 * COMPRESS_RATIO <= report.ratio_achieved <= COMPRESS_RATIO + 0.05, report.ratio_achieved
    with torch.inference_mode():
        logits = model(input_ids=e2e["prompt"], use_cache=False).logits
    assert torch.isfinite(logits).all()
    extra["top1_agreement_vs_dense"] = float((logits.argmax(-1).cpu() == e2e["dense_top1"]).double().mean())


# ------------------------------------------------------ compressed vs dense
def _phase_run(model, phase: str, prompt, decode_prompt):
    """``(run, tokens, shape, what)``: the timed call of a phase on one model."""
    pad = _pad_id(model)
    if phase == "prefill":
        mask = torch.ones_like(prompt)

        @torch.inference_mode()
        def run():
            return model(input_ids=prompt, attention_mask=mask, use_cache=True).logits

        what = f"prefill 1x{PREFILL_TOKENS} (forward filling a fresh KV cache)"
        return run, PREFILL_TOKENS, tuple(prompt.shape), what
    mask = torch.ones_like(decode_prompt)

    @torch.inference_mode()
    def run():
        return model.generate(input_ids=decode_prompt, attention_mask=mask, max_new_tokens=DECODE_TOKENS,
                              min_new_tokens=DECODE_TOKENS, do_sample=False, use_cache=True, pad_token_id=pad)

    what = f"decode {DECODE_TOKENS} tokens (greedy generate, KV cache, {PROMPT_TOKENS}-token prompt)"
    return run, DECODE_TOKENS, tuple(decode_prompt.shape), what


def _layout_tuned(e2e: dict, holder: dict, model) -> tuple:
    """``(tuned copy of model, its LayoutReport)``, made once per holder; one timing cache per backend."""
    if "tuned" not in holder:
        tuned = copy.deepcopy(model)
        report = tune_decode_layout(tuned, timings=e2e.setdefault("layout_timings", {}))
        holder["tuned"] = (tuned, report)
    return holder["tuned"]


def _layout_pairs(e2e: dict, variant: dict, phase: str, run, out) -> dict:
    """Same layout on both sides: tuned dense vs stock dense, or tuned compressed vs tuned dense."""
    prompts = (e2e["prompt"], e2e["decode_prompt"])
    tuned_dense, dense_report = _layout_tuned(e2e, e2e, e2e["model"])
    dense_run = _phase_run(tuned_dense, phase, *prompts)[0]
    if variant["ratio"] is None:
        baseline, candidate, report, against = run, dense_run, dense_report, "stock dense (same weights)"
    else:
        tuned, report = _layout_tuned(e2e, variant, variant["model"])
        baseline, candidate, against = dense_run, _phase_run(tuned, phase, *prompts)[0], "tuned dense"
    tuned_out = candidate()  # the tuned copy of this row's model, checked against its stock output
    if phase == "prefill":  # same values, other summation order: the logits agree to float32 rounding
        torch.testing.assert_close(tuned_out, out, rtol=1e-3, atol=1e-3)
    else:
        assert tuned_out.shape == out.shape
    return {"against": against, "paired": paired_rounds(baseline, candidate, rounds=PAIR_ROUNDS,
                                                        backend=e2e["backend"]),
            "weights": len(report.choices), "transposed": report.transposed, "device": report.device,
            "predicted_standard_s": report.standard_s, "predicted_chosen_s": report.chosen_s,
            "margin": report.margin}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_e2e_inference(bench, variant, phase):
    e2e = variant["case"]
    backend, model = e2e["backend"], variant["model"]
    dense_facts, facts, ratio = e2e["dense_facts"], variant["facts"], variant["ratio"]
    run, tokens, shape, what = _phase_run(model, phase, e2e["prompt"], e2e["decode_prompt"])

    extra_bytes, method = peak_extra_bytes(run, backend)  # untimed
    info = {
        "e2e": {"kind": phase, "model": MODEL, "model_description": e2e["description"],
                "recipe": None if ratio is None else DEFAULT_RECIPE, "ratio": ratio,
                "attn_implementation": e2e["attn_implementation"], "prompt_tokens": shape[1],
                "file_writer": "lrmath_hf.save_compressed for both models"},
        "items": tokens, "items_unit": "tokens",
        **facts, "params_model_dense": dense_facts["params_model"],
        "params_linear_dense": dense_facts["params_linear"],
        "peak_extra_bytes": extra_bytes, "peak_memory_bytes": facts["weights_bytes"] + extra_bytes,
        "memory_method": method,
    }
    goal = None
    if ratio is None:
        role, label = "baseline", f"dense: {what}"
    else:
        report = variant["report"]
        role, label = "candidate", f"{DEFAULT_RECIPE} ratio {ratio}: {what}"
        params_ratio = dense_facts["params_model"] / facts["params_model"]
        target = SPEEDUP_FACTOR * params_ratio
        # judged on the interleaved pairs below: sequential passes mistake load drift for speed
        goal = {"metric": "paired_speedup", "op": ">=", "target": target,
                "text": f">= {SPEEDUP_FACTOR} x dense/compressed parameters "
                        f"= {SPEEDUP_FACTOR} x {params_ratio:.3f} = {target:.2f}x"}
        info.update(ratio_achieved=report.ratio_achieved, model_ratio_achieved=report.model_ratio_achieved,
                    compress_timings=dict(report.timings), speedup_factor=SPEEDUP_FACTOR)
    group = f"e2e {phase}: {MODEL} {what} ({backend})"
    out = bench(run, group=group, role=role, label=label, backend=backend, dtype="float32", shape=shape,
                goal=goal, info=info)

    extra = bench.benchmark.extra_info
    if ratio is not None:  # the dense model and this one, timed in alternating pairs (also in smoke mode)
        dense_run = _phase_run(e2e["model"], phase, e2e["prompt"], e2e["decode_prompt"])[0]
        extra["paired"] = paired_rounds(dense_run, run, rounds=PAIR_ROUNDS, backend=backend)
    extra["layout"] = _layout_pairs(e2e, variant, phase, run, out)
    if phase == "prefill":
        assert out.shape[:2] == shape and torch.isfinite(out).all()
        extra["top1_agreement_vs_dense"] = float((out.argmax(-1).cpu() == e2e["dense_top1"]).double().mean())
    else:
        assert out.shape == (1, shape[1] + DECODE_TOKENS), out.shape
    if ratio is not None:
        assert facts["params_model"] < dense_facts["params_model"]
        assert facts["file_bytes"] < dense_facts["file_bytes"]
