#!/usr/bin/env bash
# The one prepared run for a machine with an NVIDIA GPU, from the repository root:
#
#     OUT=/some/folder bash bench/gpu_check.sh
#
# 1. what the machine is (nvidia-smi, Python packages)          -> $OUT/gpu-env.log
# 2. the gpu-marked unit tests                                   -> $OUT/gpu-tests.log
# 3. the GPU benchmark (python -m bench.gpu)                     -> $OUT/gpu.json, gpu.md, gpu-bench.log
#
# A step that fails does not stop the next; every exit status is in $OUT/gpu-check.status. The machine
# need not have the pipeline's services (MLflow, Airflow, Triton client, Evidently): only the test files
# that hold gpu-marked tests are collected, found by grep rather than listed here. About 2 to 4 minutes,
# bounded by the timeouts below (6 minutes at most).
set -u
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PYTHONUNBUFFERED=1
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
with_timeout() {  # with_timeout SECONDS COMMAND...: coreutils timeout where there is one
  local seconds=$1; shift
  if command -v timeout >/dev/null; then timeout "$seconds" "$@"; else "$@"; fi
}

{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on ${HOSTNAME:-?}, repository at $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
  nvidia-smi || echo "nvidia-smi: not available"
  "$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "numpy", "pandas", "pytest", "pyarrow",
             "onnxscript", "safetensors", "tokenizers", "mlflow", "airflow", "tritonclient", "evidently"):
    try:
        module = importlib.import_module(name)
    except Exception as error:  # any import failure is what this line reports
        print(f"{name}: not importable ({type(error).__name__}: {str(error)[:120]})")
    else:
        print(f"{name}: {getattr(module, '__version__', '?')}")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
          [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    import onnxruntime
    print("onnxruntime providers", onnxruntime.get_available_providers())
except Exception as error:
    print("probe failed:", type(error).__name__, error)
EOF
} 2>&1 | tee "$OUT/gpu-env.log"

mapfile -t GPU_TESTS < <(grep -lE 'mark\.gpu' tests/unit/test_*.py | sort)
if [ "${#GPU_TESTS[@]}" -eq 0 ]; then
  echo "no gpu-marked tests under tests/unit" | tee "$OUT/gpu-tests.log"
  tests_rc=5
else
  echo "== gpu-marked tests in: ${GPU_TESTS[*]}" | tee "$OUT/gpu-tests.log"
  # -o addopts='' drops the project's "-m 'not slow and not gpu'" (and its other defaults), so -m gpu selects.
  with_timeout "$TESTS_TIMEOUT" "$PYTHON" -m pytest -q -rA -p no:cacheprovider -o addopts='' -m gpu "${GPU_TESTS[@]}" \
    2>&1 | tee -a "$OUT/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

echo "== python -m bench.gpu --out $OUT" | tee "$OUT/gpu-bench.log"
with_timeout "$BENCH_TIMEOUT" "$PYTHON" -m bench.gpu --out "$OUT" 2>&1 | tee -a "$OUT/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests: exit $tests_rc (0 passed or skipped, 1 failed, 5 none selected, 124 timed out); bench: exit $bench_rc" \
  | tee "$OUT/gpu-check.status"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
