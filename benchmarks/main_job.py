"""`python -m benchmarks main-job`: `make ask` itself, timed against the FLOP bound of its prefill.

For each dtype: measure this CPU's matmul rate in that dtype (a 2048×576 · 576×1536 GEMM, the
shape of SmolLM2's MLP over a 2,048-token chunk), count the FLOPs the prefill does (below), and
run `make ask` with `--json --dtype D`. The bound is FLOPs ÷ GEMM rate; the ratio prefill ÷ bound
says how far the run is from what the hardware allows in that dtype. A dtype whose bound alone
exceeds `--max-bound-seconds` is reported, not run.

Prefill FLOPs (multiply-adds ×2), per chunk of c tokens behind a p-token prefix, question q tokens,
a model with L layers, hidden h, query heads H·D, KV heads H_kv·D, MLP width I, vocabulary V:
  dense weights per token  W = L·(2·h·H·D + 2·h·H_kv·D + 3·h·I)
  phase 1 (prefix re-run in every row, causal):  2·W·(p+c) + 2·L·H·D·(p+c)²  + 2·h·V (one logit row)
  phase 2 (question over the chunk's KV):        2·W·q + 4·L·H·D·q·(p+c)    + 2·h·V·q
plus the prefix once: 2·W·p + 2·L·H·D·p².
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from parallelcomp.hardware import measure_gflops

from . import machine

REPO = Path(__file__).resolve().parent.parent
GEMM = (2048, 576, 1536)


def prefill_flops(cfg: dict, prefix: int, question: int, chunks: list[int], logits: int | None = None) -> float:
    """A cold prefill: the prefix once, phase 1 of every chunk, then `question_flops`."""
    L, h, V, w, qd = _dims(cfg)
    total = 2 * w * prefix + 2 * L * qd * prefix**2
    for c in chunks:
        n = prefix + c
        total += 2 * w * n + 2 * L * qd * n**2 + 2 * h * V
    return total + question_flops(cfg, prefix, question, chunks, logits)


def question_flops(cfg: dict, prefix: int, question: int, chunks: list[int], logits: int | None = None) -> float:
    """Phase 2 alone (the question over every chunk's KV): all a question costs when every chunk's
    phase-1 KV comes from the store. `question`: the tokens phase 2 runs per chunk; `logits`: the
    vocabulary rows it computes per chunk (default: one per token)."""
    L, h, V, w, qd = _dims(cfg)
    logits = question if logits is None else logits
    return float(sum(2 * w * question + 4 * L * qd * question * (prefix + c) + 2 * h * V * logits for c in chunks))


def phase2_work(question_scored, carried: float = 0) -> tuple[float, int]:
    """(tokens phase 2 runs per chunk, logit rows it computes) for a run without compression, from
    `RunStats.question_scored`: the question before its last scored token, and one row per scored
    token after the first (whose log-probability phase 1 already computed). `carried`: the
    question-head tokens a chunk read from the store (`RunStats.reused_head_tokens` per chunk),
    which phase 2 did not run; with the whole head carried, nor the row predicting the first
    scored token (the stored head has it)."""
    start, end = question_scored
    if start and carried >= start:
        return end - 1 - start, end - 1 - start
    return end - 1 - carried, end - max(start, 1)


def _dims(cfg: dict) -> tuple[int, int, int, int, int]:
    """(layers, hidden, vocabulary, dense weights per token W, query width H·D) of a model config."""
    cfg = cfg.get("text_config", cfg)
    L, h, I, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    qd, kvd = heads * d, (cfg.get("num_key_value_heads") or heads) * d
    return L, h, V, L * (2 * h * qd + 2 * h * kvd + 3 * h * I), qd


def run(dtypes: list[str], out: Path, max_bound_seconds: float) -> Path:
    from parallelcomp.default_model import embedded_model_dir

    cfg = json.loads((embedded_model_dir(progress=False) / "config.json").read_text())
    rows = []
    for name in dtypes:
        gflops = measure_gflops(getattr(torch, name), GEMM, seconds=1.0)
        row = {"dtype": name, "gemm_gflops": round(gflops, 2), "load_before": os.getloadavg()[0]}
        est = None
        if rows and rows[0].get("flops"):
            est = rows[0]["flops"] / (gflops * 1e9)  # same work as the first dtype's run
        if est is not None and est > max_bound_seconds:
            rows.append(row | {"status": f"not run: its bound alone is {est:,.0f} s (> {max_bound_seconds:.0f} s)",
                               "bound_seconds": round(est, 1)})
            continue
        start = time.perf_counter()
        proc = subprocess.run(["make", "-s", "--no-print-directory", "ask", f"ASK_EXTRA=--json --dtype {name}"],
                              cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            rows.append(row | {"status": f"make ask exited {proc.returncode}: {proc.stderr.strip()[-300:]}"})
            continue
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        s = report["stats"]
        run_tokens, logit_rows = phase2_work(s["question_scored"])
        flops = prefill_flops(cfg, s["prefix_tokens"], run_tokens, [c["n_tokens"] for c in report["chunks"]], logit_rows)
        bound = flops / (gflops * 1e9)
        rows.append(row | {
            "status": "ok", "flops": flops, "bound_seconds": round(bound, 1),
            "prefill_seconds": round(s["prefill_seconds"], 1), "ratio": round(s["prefill_seconds"] / bound, 2),
            "ttft_seconds": round(s["prefill_seconds"] + s["first_token_seconds"], 1),
            "wall_seconds": round(wall, 1), "threads": s["threads"], "tokens_in": s["tokens_in"],
            "n_chunks": s["n_chunks"], "peak_rss_mb": round(report["peak_rss_mb"]), "answer": report["answer"],
            "load_after": os.getloadavg()[0],
        })
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine.describe(",".join(dtypes)), "rows": rows}, indent=1))
    (out / "results.md").write_text(table(rows))
    return out / "results.md"


def table(rows: list[dict]) -> str:
    lines = ["| dtype | GEMM GFLOP/s | prefill TFLOP | bound s | prefill s | ratio | TTFT s | wall s | peak RSS MB | load 1-min (before→after) | answer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['dtype']} | {r['gemm_gflops']} | | {r.get('bound_seconds', '')} | {r['status']} | | | | | {r['load_before']:.2f} | |")
            continue
        lines.append(f"| {r['dtype']} | {r['gemm_gflops']} | {r['flops'] / 1e12:.2f} | {r['bound_seconds']} | "
                     f"{r['prefill_seconds']} | {r['ratio']}× | {r['ttft_seconds']} | {r['wall_seconds']} | "
                     f"{r['peak_rss_mb']:,} | {r['load_before']:.2f}→{r['load_after']:.2f} | {r['answer']} |")
    return "\n".join(lines) + "\n"

