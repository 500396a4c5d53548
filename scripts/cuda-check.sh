#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (CI never has one): the core tests with the tiny
# models on the GPU (tests/conftest.py, PARALLELCOMP_TEST_DEVICE), then `python -m benchmarks cuda`
# (benchmarks/cuda.py) with the arguments given here. Logs and results go under $OUT (default
# cuda-check/ in the repository, git-ignored): tests.log, tests.xml (JUnit), bench.log, results.md,
# results.json.
#   scripts/cuda-check.sh [--random-weights] [--model DIR] [--lengths ...] [--attn ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="core:.${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

PARALLELCOMP_TEST_DEVICE=cuda timeout "${TEST_SECONDS:-240}" $py -m pytest -q -m "not slow" -p no:cacheprovider \
    --junitxml="$out/tests.xml" -o addopts="--strict-markers --durations=5" \
    tests/test_core.py tests/test_compression.py tests/test_calibration.py tests/test_fidelity.py \
    tests/test_decode.py tests/test_store.py tests/test_inputs.py tests/test_structured.py 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}

timeout "${BENCH_SECONDS:-240}" $py -m benchmarks cuda --out "$out" "$@" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "cuda-check: tests rc $tests, benchmark rc $bench"
exit $(( tests || bench ))
