#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see docs/benchmarks.md, "CUDA").
#
#   bash scripts/device_check.sh OUT_DIR [SHAPES_DIR]
#
# 1. the proofs' torch-CUDA and cupy variants (pytest -m gpu);
# 2. the core benchmarks' CUDA sides (pca_truncate, Moments, whitened_svd) in full mode;
# 3. end-to-end prefill / decode of the saved SmolLM2 structures (SHAPES_DIR/ratio-*, written by
#    `lrmath compress ... --ratio 0.1 0.2 0.3 0.4 0.5`) against dense, random weights
#    (SHAPES_ARGS=--tune-layout also times every model with lrmath_hf.tune_decode_layout);
# 4. FLAR's latency caps per linear shape;
# 5. which eigensolver path is fastest for a layer's heads;
# 6. the 4,096 x 11,008 whitened SVD;
# 7. one decode step's attention on reduced value heads, padded fused SDPA vs the grouped path.
# Each stage has its own time limit, so one slow stage cannot take the others' results with it.
#
# Preparing a lent-GPU call from this checkout (the machine has torch, CuPy, transformers 5.17, pytest-xdist
# and hypothesis, but not array-api-compat, and lrmath_hf needs transformers >= 5.18): put the wheels it
# lacks (array-api-compat, transformers) in .whl/ and the saved structures'
# config.json + manifest.json in .gpu/shapes/ratio-*/ (both ignored via .git/info/exclude), then run
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#   bash scripts/device_check.sh $OUT 2>&1 | tee $OUT/run.log
# carrying .whl and .gpu; render the results with scripts/gpu_report.py and scripts/bench_report.py.
# The whole default run took about 8 minutes on an H200 (stop 14, in three parts); in stop 21 the stages
# proofs, bench, eigh and attn took 3 min 50 s together, and shapes (bfloat16 only, with the compression
# timing) about 130 s.
# Next call (stop 22 had no GPU): STAGES="attn bench shapes" SHAPES_DTYPES=float32 measures what changed
# since the H200 run: the bmm form of the grouped decode attention (stage attn, both dtypes: does bfloat16
# still prefer the padded kernel, as _grouped_decode_pays assumes?), Moments.update's sum + column norm,
# and the float32 grouped decode and the compression time end to end.
set -u
OUT=${1:?output folder}
SHAPES=${2:-.gpu/shapes}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=${STAGES:-proofs bench shapes caps eigh huge attn}  # a subset reruns part of it
want() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo; echo "=== $1 ($(date -u +%T))"; }

stage environment
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PY - <<'EOF'
import importlib
for name in ("torch", "cupy", "numpy", "scipy", "transformers", "hypothesis", "array_api_compat", "xdist"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # report, do not stop: the stages skip what is missing
        print(f"{name} missing ({exc.__class__.__name__})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${GPU_WORKERS:-8}")

if want proofs; then
stage "proofs on torch-cuda and cupy"
timeout -s INT -k 15 "${T_PROOFS:-200}" $PY -m pytest ${PROOFS:-proofs_tests adapters/tests} -m gpu $XDIST -q -rfE --tb=short \
    -p no:cacheprovider --junitxml="$OUT/proofs.xml"
echo "proofs exit $?"
fi

if want bench; then
stage "core benchmarks, CUDA sides"
LRMATH_BENCH_FULL=1 LRMATH_BENCH_BUDGET=${BENCH_BUDGET:-2} timeout -s INT -k 15 "${T_BENCH:-150}" \
    $PY -m pytest benchmarks -m gpu --ignore=benchmarks/test_bench_e2e.py -k "not 4096" -q -rfE -p no:cacheprovider \
    --benchmark-enable --benchmark-json="$OUT/bench_cuda.json"
echo "bench exit $?"
fi

if want eigh; then
stage "eigensolver paths for a layer's heads"
timeout -s INT -k 15 "${T_EIGH:-60}" $PY scripts/eigh_paths.py --json "$OUT/eigh_paths.json"
echo "eigh exit $?"
fi

if want shapes; then
stage "end to end, saved structures"
if ls -d "$SHAPES"/ratio-* >/dev/null 2>&1; then
    timeout -s INT -k 15 "${T_SHAPES:-150}" $PY scripts/gpu_shapes_e2e.py "$SHAPES"/ratio-* --device cuda \
        --dtypes ${SHAPES_DTYPES:-float32 bfloat16} --compress-windows "${COMPRESS_WINDOWS:-64}" \
        ${SHAPES_ARGS:-} --json "$OUT/shapes.json"
    echo "shapes exit $?"
else
    echo "no $SHAPES/ratio-*: skipped"
fi
fi

if want caps; then
stage "latency caps"
timeout -s INT -k 15 "${T_CAPS:-90}" $PY scripts/latency_caps.py --device cuda --dtypes float32 bfloat16 \
    --json "$OUT/caps.json"
echo "caps exit $?"
fi

if want huge; then
stage "whitened_svd 4096 x 11008"
LRMATH_BENCH_FULL=1 LRMATH_BENCH_BUDGET=${BENCH_BUDGET:-2} timeout -s INT -k 15 "${T_HUGE:-100}" \
    $PY -m pytest benchmarks/test_bench_whitened_svd.py -m gpu -k "4096" -q -rfE -p no:cacheprovider \
    --benchmark-enable --benchmark-json="$OUT/bench_huge.json"
echo "huge exit $?"
fi
if want attn; then
stage "decode-step attention on reduced value heads"
for dtype in float32 bfloat16; do
    timeout -s INT -k 15 "${T_ATTN:-60}" $PY scripts/decode_attention_paths.py --device cuda --dtype $dtype \
        --json "$OUT/decode_attention_$dtype.json"
    echo "attn $dtype exit $?"
done
fi
stage done
