"""`python -m benchmarks profile`: where the time of a cold encode and of a reused question goes.

One RULER haystack (the repeat-query one) at `--length` tokens with `make ask`'s settings (K=1,
2,048-token chunks): `encode` runs phase 1 on every chunk under torch.profiler, then a question
is asked twice over the corpus and the second, fully reused one is profiled. Writes the top CPU
operators of both to results.md, with the share each takes of the profiled call's wall time, and
the time outside torch's operators, which the profiler does not see: the C kernels (attention,
layer kernels, decoding, called through ctypes) and Python. Then the two
kernels' rates in float32 and in the model's dtype: the GEMM of the roofline (`main_job.GEMM`) and
the causal SDPA of one phase-1 micro-batch (2 rows of prefix + 2,048-token chunk, this model's
heads), which the roofline counts at the GEMM rate.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from parallelcomp.attention_kernel import KERNELS

from . import machine
from .main_job import GEMM
from .repeat_query import CONFIG, haystack

TOP = 8


def run(length: int, out: Path) -> Path:
    from transformers import AutoTokenizer

    from parallelcomp import ParallelComp, ParallelCompConfig
    from parallelcomp.default_model import embedded_model_dir

    model_dir = embedded_model_dir(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context, questions, _ = haystack(tokenizer, length)
    pc = ParallelComp.from_pretrained(model_dir, ParallelCompConfig(**CONFIG))
    load = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU]) as cold:
        start = time.perf_counter()
        corpus = pc.encode([context])
        encode_seconds = time.perf_counter() - start
    pc.generate(questions[0], corpus=corpus, max_new_tokens=2)  # warm-up: allocator, kernels
    with profile(activities=[ProfilerActivity.CPU]) as warm:
        start = time.perf_counter()
        answer = pc.generate(questions[1], corpus=corpus, max_new_tokens=2)
        question_seconds = time.perf_counter() - start
    result = {
        "machine": machine.describe(answer.stats.dtype), "length": length, "config": CONFIG,
        "load_before": load, "load_after": os.getloadavg()[0],
        "encode": {"seconds": round(encode_seconds, 2), "chunks": len(corpus.chunks),
                   **_top(cold, encode_seconds)},
        "reused_question": {"prefill_seconds": round(answer.stats.prefill_seconds, 2),
                            "first_token_seconds": round(answer.stats.first_token_seconds, 2),
                            "reused_chunks": answer.stats.reused_chunks, **_top(warm, question_seconds)},
        "kernels": [_kernel_rates(pc.model, dtype, answer.stats.prefix_tokens + CONFIG["chunk_tokens"])
                    for dtype in dict.fromkeys([torch.float32, pc.model.dtype])],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(_table(result))
    return out / "results.md"


def _kernel_rates(model, dtype: torch.dtype, tokens: int, rows: int = 2) -> dict:
    """GFLOP/s of the roofline's GEMM and of causal attention over `rows` × `tokens` with the
    model's heads on the kernels of ParallelCompConfig.attention_kernel (torch's fused SDPA, the
    blocked matmuls and, where one of its builds runs, attention_kernel.c; `hardware.measure_attention`), in `dtype`,
    best of 3."""
    from parallelcomp import kv as kvops
    from parallelcomp.hardware import measure_attention, measure_gflops

    _, h_kv, d = kvops.layout(model)
    h = model.config.get_text_config().num_attention_heads
    rates = measure_attention((rows, h, h_kv, tokens, d), dtype)
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "rows": rows,
            "gemm_gflops": round(measure_gflops(dtype, GEMM, seconds=1.0), 1),
            "attention_gflops": round(rates["fused"], 1), "matmul_attention_gflops": round(rates["matmul"], 1),
            **{f"{name}_attention_gflops": round(rates[name], 1) for name in KERNELS if name in rates}}


def _top(prof, wall: float) -> dict:
    """The TOP operators by self time, each with its share of the profiled call's `wall` seconds,
    and the seconds outside every torch operator ("outside_s": C kernels called through ctypes,
    Python), which the profiler's operator table does not show."""
    events = prof.key_averages()
    inside = sum(e.self_cpu_time_total for e in events) / 1e6
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:TOP]
    ops = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / 1e6 / wall, 3), "calls": e.count} for e in ranked]
    return {"wall_s": round(wall, 3), "ops": ops, "outside_s": round(max(wall - inside, 0.0), 3)}


def _table(r: dict) -> str:
    lines = [f"# Profile at {r['length']:,} tokens ({r['machine']['dtype']}, {r['machine']['torch_threads']} threads, "
             f"load 1-min {r['load_before']:.1f}→{r['load_after']:.1f})", ""]
    warm = r["reused_question"]
    for title, part in ((f"Cold encode: {r['encode']['seconds']} s, {r['encode']['chunks']} chunks", r["encode"]),
                        (f"Reused question: prefill {warm['prefill_seconds']} s + first token "
                         f"{warm['first_token_seconds']} s, {warm['reused_chunks']} chunks reused", warm)):
        lines += [f"## {title}", "", f"Shares of the call's {part['wall_s']} s under the profiler.", "",
                  "| operator | self CPU s | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| {o['op']} | {o['self_cpu_s']} | {o['share']:.0%} | {o['calls']} |" for o in part["ops"]]
        lines.append(f"| outside torch's operators: C kernels, Python | {part['outside_s']} | "
                     f"{part['outside_s'] / part['wall_s']:.0%} | |")
        lines.append("")
    lines += ["## Kernel rates", "", f"GEMM {GEMM[0]}×{GEMM[1]}·{GEMM[1]}×{GEMM[2]} (the roofline's rate) and the causal "
              "attention of one phase-1 micro-batch on each kernel (`attention_kernel`: torch's fused SDPA, the "
              "blocked matmuls, attention_kernel.c where one of its builds runs), best of 3:", "",
              "| dtype | rows × tokens | GEMM GFLOP/s | fused attention GFLOP/s | matmul attention GFLOP/s | "
              "C kernel attention GFLOP/s (build) | best attention ÷ GEMM |", "|---|---|---:|---:|---:|---:|---:|"]
    for k in r.get("kernels", []):
        c = next(((name, k[f"{name}_attention_gflops"]) for name in KERNELS if f"{name}_attention_gflops" in k), None)
        best = max(k["attention_gflops"], k.get("matmul_attention_gflops", 0), c[1] if c else 0)
        lines.append(f"| {k['dtype']} | {k['rows']} × {k['tokens']:,} | {k['gemm_gflops']} | "
                     f"{k['attention_gflops']} | {k.get('matmul_attention_gflops', '–')} | "
                     f"{f'{c[1]} ({c[0]})' if c else '–'} | "
                     f"{best / k['gemm_gflops']:.2f} |")
    return "\n".join(lines) + "\n"
