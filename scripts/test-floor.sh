#!/usr/bin/env bash
# The second CI job: the core tests (without the slow SmolLM2 ones) on the LOWEST transformers
# release that pyproject.toml allows (docs/method-fidelity.md §4), so the floor in the pin is one that is
# actually tested.
# A throwaway venv reuses .venv's packages through a .pth file and replaces only transformers.
set -euo pipefail
cd "$(dirname "$0")/.."

floor=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[[ -n "$floor" ]] || { echo "test-floor: no transformers>=X pin in pyproject.toml" >&2; exit 1; }
venv=.venv-floor
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [[ "$(cat "$venv/.floor" 2>/dev/null)" != "$floor" ]]; then
    rm -rf "$venv"
    .venv/bin/python -m venv --without-pip "$venv"
    own=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$site" > "$own/parallelcomp-base.pth"
    .venv/bin/python -m pip install -qq --no-deps --target "$own" "transformers==$floor"
    echo "$floor" > "$venv/.floor"
fi
got=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
echo "test-floor: transformers $got (pin floor $floor)" >&2
# The tests that exercise transformers' surface (forward, caches, masks, attention, tokenizers and
# chat templates, logits processors); the wrappers, Ray and the benchmarks run in the main job.
HF_HUB_OFFLINE=1 PYTHONPATH=core:. "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider \
    tests/test_core.py tests/test_compression.py tests/test_calibration.py tests/test_fidelity.py \
    tests/test_decode.py tests/test_store.py tests/test_inputs.py tests/test_structured.py
