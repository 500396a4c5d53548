"""`python -m benchmarks ray-scaling`: parallelcomp.distributed with 1 and 2 Ray workers (one torch
thread each) next to one process with one thread, on the embedded SmolLM2 over the repeat-query
haystack (repeat_query.py: RULER essays with five needles).

Per context length and setup, in a subprocess of its own (its own local Ray): load, `encode` the
haystack (every chunk's phase 1, on the worker that will keep its KV), then two questions over the
corpus (phase 2 onwards; the second is the steady state). Reported: encode seconds and tokens/s,
each question's time to first token and total seconds, the bytes of kept KV moved to the driver,
the chunks and phase-1+2 seconds per worker, the KV the workers hold, and whether the answer
holds the needle's value. Timings mean something only on an otherwise idle machine: the file
records the 1-minute load before and after each length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import machine
from .repeat_query import CONFIG, MAX_NEW_TOKENS, haystack

REPO = Path(__file__).resolve().parent.parent
SETUPS = {"1 process": 0, "1 worker": 1, "2 workers": 2}
"""Setup → Ray workers (0: the single-process ParallelComp)."""


def worker(spec: dict) -> dict:
    """Run inside a subprocess: one setup at one length."""
    from transformers import AutoTokenizer

    from parallelcomp import ParallelComp, ParallelCompConfig

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    context, questions, values = haystack(tokenizer, spec["length"])
    config = ParallelCompConfig(**CONFIG)
    start = time.perf_counter()
    if spec["workers"]:
        from parallelcomp.distributed import RayParallelComp

        pc = RayParallelComp.from_pretrained(spec["model_dir"], config, num_workers=spec["workers"], threads=1)
    else:
        pc = ParallelComp.from_pretrained(spec["model_dir"], config, threads=1)
    load_seconds = time.perf_counter() - start
    corpus = pc.encode([context])
    row = {"load_seconds": round(load_seconds, 1), "tokens": corpus.n_tokens, "chunks": len(corpus.chunks),
           "encode_seconds": round(corpus.encode_seconds, 2),
           "encode_tok_s": round(corpus.n_tokens / corpus.encode_seconds, 1), "bytes_held": corpus.bytes_held,
           "questions": []}
    for i in (0, 1):
        start = time.perf_counter()
        out = pc.generate(questions[i], corpus=corpus, max_new_tokens=MAX_NEW_TOKENS)
        s = out.stats
        row["questions"].append({
            "ttft_seconds": round(s.ttft_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2), "encoded_chunks": s.encoded_chunks,
            "transfer_bytes": s.transfer_bytes, "kv_bytes": s.kv_bytes, "worker_chunks": s.worker_chunks,
            "worker_seconds": {k: round(v, 2) for k, v in s.worker_seconds.items()},
            "correct": values[i] in out.text, "answer": out.text, "dtype": s.dtype,
        })
    return row


def run(lengths: list[int], setups: list[str], out: Path) -> Path:
    """Measure `setups` at each of `lengths`; rows of other lengths already in `out` are kept."""
    from parallelcomp.default_model import embedded_model_dir

    model_dir = str(embedded_model_dir(progress=False))
    results = machine.per_length_results(out, "per machine (hardware.default_dtype)", CONFIG)
    runs = {name: lambda length, workers=SETUPS[name]: _spawn({"model_dir": model_dir, "length": length,
                                                                "workers": workers})
            for name in setups}
    return machine.side_by_side(out, results, lengths, runs, table)


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_worker_niceness": "0",  # workers at the driver's priority (Ray's default is nice 15)
           "PYTHONPATH": os.pathsep.join([str(REPO / "core"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_scaling"], input=json.dumps(spec),
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"ray-scaling worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["| context | setup | encode s | encode tok/s | ÷ 1 worker | Q1 TTFT s | Q2 TTFT s | Q2 total s | "
             "KV moved per question MiB | KV held MiB | chunks (phase 1+2 s) per worker | correct |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for length, entry in results["lengths"].items():
        base = entry["1 worker"]["encode_seconds"]
        for name in [name for name in SETUPS if name in entry]:
            r = entry[name]
            q1, q2 = r["questions"]
            split = ", ".join(f"{q2['worker_chunks'][w]} ({q2['worker_seconds'][w]})" for w in sorted(q2["worker_chunks"]))
            lines.append(
                f"| {int(length):,} | {name} | {r['encode_seconds']} | {r['encode_tok_s']:,} | "
                f"{base / r['encode_seconds']:.2f}× | {q1['ttft_seconds']} | {q2['ttft_seconds']} | "
                f"{q2['total_seconds']} | {q2['transfer_bytes'] / 2**20:.1f} | {r['bytes_held'] / 2**20:,.0f} | "
                f"{split or '—'} | {'yes' if q1['correct'] and q2['correct'] else 'no'} |")
        lines.append(f"| | {entry['1 worker']['chunks']} chunks of ≤{CONFIG['chunk_tokens']} tokens, "
                     f"{entry['1 worker']['questions'][0]['dtype']}; load 1-min {entry['load_before']:.1f}→"
                     f"{entry['load_after']:.1f} | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
