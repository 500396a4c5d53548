"""`python -m benchmarks cuda`: the runtime on a CUDA GPU, per attention implementation.

    python -m benchmarks cuda [--lengths 8192 32768 131072] [--attn sdpa eager flash_attention_2]
                              [--model DIR] [--random-weights] [--out DIR]

For each attention implementation the model (default: the embedded SmolLM2-135M) runs in bf16 on
the GPU with the settings `make ask` uses (the retrieval preset). `--random-weights` builds the
same architecture from the directory's config.json with random weights, for a GPU machine the
weights cannot be copied to: times and the exactness column hold, the answers are noise (the
needle column then says nothing). An implementation that is not installed (flash-attn) or fails
is reported as such and the others still run.

Per context length, over the repeat-query haystack (five needles in essays, one document):
  * question 1 cold: prefill s next to its FLOP bound (`main_job.prefill_flops` ÷ the bf16 GEMM
    rate measured on this GPU at the model's own matmul shape, `main_job.GEMM`);
  * the same question through `encode` + `generate(corpus=)`: its token ids must equal the cold
    run's ("exact");
  * question 2 over the corpus, every chunk's phase-1 KV reused: time to first token (prefill +
    question step, which ends in a host read of the token, so the GPU is synchronised) and its
    FLOP bound (`main_job.question_flops`);
  * decode tok/s after the first token, next to the bandwidth bound: weights + merged KV bytes
    read once per token ÷ the device-to-device copy bandwidth measured here (read + write);
  * peak GPU memory of the length (`torch.cuda.max_memory_allocated`).
Writes results.json and results.md under --out and prints the table.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch

from . import machine
from .main_job import GEMM, phase2_work, prefill_flops
from .repeat_query import CONFIG, MAX_NEW_TOKENS, flops, haystack

WARMUP_TOKENS = 4096


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.randn(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - start)


def load(model_dir: str, attn: str, random_weights: bool, device: torch.device):
    """A ParallelComp over the model in bf16 on `device` with attention implementation `attn`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from parallelcomp import ParallelComp, ParallelCompConfig

    config = ParallelCompConfig(**CONFIG, attn_implementation=attn)
    if not random_weights:
        return ParallelComp.from_pretrained(model_dir, config, device=device, dtype=torch.bfloat16)
    model_config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16, attn_implementation=attn)
    return ParallelComp(model.eval(), AutoTokenizer.from_pretrained(model_dir), config)


def measure(pc, length: int, gemm_flops: float, bandwidth: float) -> dict:
    """One context length: cold question, the corpus path, a reused question, decode."""
    device = pc.model.device
    context, questions, values = haystack(pc.tokenizer, length)
    cfg = pc.model.config.to_dict()
    torch.cuda.reset_peak_memory_stats(device)
    cold = pc.generate(questions[0], documents=[context], max_new_tokens=MAX_NEW_TOKENS)
    s = cold.stats
    corpus = pc.encode([context])
    again = pc.generate(questions[0], corpus=corpus, max_new_tokens=MAX_NEW_TOKENS)
    second = pc.generate(questions[1], corpus=corpus, max_new_tokens=MAX_NEW_TOKENS)
    r = second.stats
    chunks = [c.n_tokens for c in cold.chunks]
    tokens, logit_rows = phase2_work(s.question_scored)
    cold_flops = prefill_flops(cfg, s.prefix_tokens, tokens, chunks, logit_rows)
    weights = sum(p.numel() * p.element_size() for p in pc.model.parameters())
    decode_tokens = max(0, r.new_tokens - 1)
    reused_flops = flops(cfg, r, chunks)
    return {
        "length": length, "tokens_in": s.tokens_in, "n_chunks": s.n_chunks,
        "prefill_seconds": s.prefill_seconds, "cold_ttft_seconds": s.ttft_seconds,
        "cold_flops": cold_flops, "cold_bound_seconds": cold_flops / gemm_flops,
        "exact": again.token_ids == cold.token_ids, "reused_chunks": r.reused_chunks,
        "ttft_seconds": r.ttft_seconds,
        "reused_flops": reused_flops, "reused_bound_seconds": reused_flops / gemm_flops,
        "decode_tok_s": decode_tokens / max(1e-9, r.decode_seconds - r.first_token_seconds),
        "decode_bound_tok_s": bandwidth / (weights + r.kv_bytes), "kv_bytes": r.kv_bytes,
        "new_tokens": r.new_tokens, "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "correct": [values[0] in cold.text, values[1] in second.text],
    }


def run(lengths: list[int], attns: list[str], model_dir: str | None, random_weights: bool, out: Path) -> Path:
    from parallelcomp.default_model import embedded_model_dir
    from parallelcomp.hardware import measure_gflops

    if not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    model_dir = model_dir or str(embedded_model_dir(progress=False))
    results = {
        "machine": machine.describe("bfloat16"),
        "model_dir": Path(model_dir).name, "random_weights": random_weights, "config": CONFIG,
        "gemm_tflops": measure_gflops(torch.bfloat16, GEMM, seconds=1.0, device=device) / 1e3,
        "copy_gb_s": copy_bandwidth(device) / 1e9, "rows": [], "failures": {},
    }
    for attn in attns:
        try:
            pc = load(model_dir, attn, random_weights, device)
            measure(pc, WARMUP_TOKENS, 1.0, 1.0)  # CUDA context, cuBLAS handles, kernel selection
            for length in lengths:
                row = measure(pc, length, results["gemm_tflops"] * 1e12, results["copy_gb_s"] * 1e9)
                results["rows"].append({"attn": attn, "attention_kernel": pc.attention_kernel,
                                        "decode_kernel": pc.decode_kernel} | row)
                write(results, out)
            del pc
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - one backend's failure is a result, not the end of the run
            traceback.print_exc()
            results["failures"][attn] = f"{type(err).__name__}: {err}"[:500]
    write(results, out)
    return out / "results.md"


def write(results: dict, out: Path) -> None:
    """After every row, so a run stopped at its time limit keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    print(table(results).splitlines()[-1], flush=True)


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"{m['gpu']}, torch {m['torch']}, transformers {m['transformers']}; model {results['model_dir']}"
        f"{' with RANDOM weights (times and exactness only; answers are noise)' if results['random_weights'] else ''}, "
        f"bf16. bf16 GEMM at the model's shape {tuple(GEMM)}: {results['gemm_tflops']:.1f} TFLOP/s; "
        f"device copy: {results['copy_gb_s']:.0f} GB/s (read + write).",
        "",
        "| attn | context | chunks | cold prefill s | bound s | prefill ÷ bound | cold TTFT s | corpus path exact | "
        "reused TTFT s | bound s | decode tok/s | bound tok/s | % of bound | peak GPU MB | needle found (q1, q2) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['attn']} ({r['attention_kernel']}) | {r['tokens_in']:,} | {r['n_chunks']} | {r['prefill_seconds']:.3f} | "
            f"{r['cold_bound_seconds']:.4f} | {r['prefill_seconds'] / r['cold_bound_seconds']:.1f}× | "
            f"{r['cold_ttft_seconds']:.3f} | {'yes' if r['exact'] else 'NO'} | {r['ttft_seconds']:.3f} | "
            f"{r['reused_bound_seconds']:.4f} | {r['decode_tok_s']:.0f} | {r['decode_bound_tok_s']:.0f} | "
            f"{100 * r['decode_tok_s'] / r['decode_bound_tok_s']:.1f} | {r['peak_gpu_mb']:,.0f} | "
            f"{'/'.join('yes' if c else 'no' for c in r['correct'])} |")
    for attn, err in results["failures"].items():
        lines.append(f"\n{attn}: did not run: {err}")
    return "\n".join(lines) + "\n"
