"""`python -m benchmarks long-question`: a prompt with no corpus, against transformers' own forward.

A chat turn, or a stuffed prompt that fits the window (routing rule "question"), has no
documents: the whole prompt is the question step, one causal forward over the prefix and the
question (docs/decode.md, "The new path"). Per length, in one process with the embedded
model in the machine's default dtype: the GEMM rate (`main_job.GEMM`), then
`ParallelComp.generate` of the repeat-query haystack of that length followed by its first
needle question, as one user message (time to the first token), then transformers' forward of
the same prompt ids (`model(ids, logits_to_keep=1)` under `torch.inference_mode`, the model's own
sdpa attention), then both again. The bound is the forward's FLOPs (`main_job.prefill_flops` of
one chunk: 2·W·n + 2·L·H·D·n² + one logit row) ÷ the GEMM rate.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import machine
from .main_job import GEMM, prefill_flops
from .repeat_query import MAX_NEW_TOKENS, haystack

RUNS = ("parallelcomp", "transformers", "parallelcomp again", "transformers again")


def load_engine():
    """The embedded model's engine with the default config."""
    from parallelcomp import ParallelComp
    from parallelcomp.default_model import embedded_model_dir

    return ParallelComp.from_pretrained(str(embedded_model_dir(progress=False)))


def run(lengths: list[int], out: Path) -> Path:
    import torch

    from parallelcomp.hardware import measure_gflops

    pc = load_engine()
    results = machine.per_length_results(out, str(pc.model.dtype), {"max_new_tokens": MAX_NEW_TOKENS})
    prompts = {}

    def prompt(length: int) -> tuple[str, str, list[int]]:
        if length not in prompts:
            context, questions, values = haystack(pc.tokenizer, length)
            text = f"{context}\n\n{questions[0]}"
            parts = pc.prompt_parts(text, False)
            prompts[length] = text, values[0], parts.prefix_ids + parts.question_ids
        return prompts[length]

    def ours(length: int) -> dict:
        text, value, _ = prompt(length)
        out = pc.generate(text, max_new_tokens=MAX_NEW_TOKENS)
        s = out.stats
        return {"tokens": s.prefix_tokens + s.question_tokens, "ttft_seconds": s.ttft_seconds,
                "exceeds_window": s.exceeds_window, "attention_kernel": s.attention_kernel, "answer": out.text,
                "correct": value in out.text}

    def theirs(length: int) -> dict:
        ids = torch.tensor([prompt(length)[2]], device=pc.model.device)
        with torch.inference_mode():
            start = time.perf_counter()
            pc.model(ids, logits_to_keep=1)
            seconds = time.perf_counter() - start
        flops = prefill_flops(pc.model.config.to_dict(), 0, 0, [ids.shape[1]])
        return {"tokens": ids.shape[1], "forward_seconds": seconds, "flops": flops,
                "attention": pc.model.config._attn_implementation}

    runs = {"gemm_gflops": lambda length: measure_gflops(pc.model.dtype, GEMM, seconds=1.0),
            **{name: (ours if name.startswith("parallelcomp") else theirs) for name in RUNS}}
    return machine.side_by_side(out, results, lengths, runs, table)


def table(results: dict) -> str:
    lines = ["| prompt tokens | ParallelComp to first token s | transformers forward s | ParallelComp ÷ transformers "
             "(best of two each) | FLOP bound s | ParallelComp ÷ bound | attention (ours / theirs) | correct | "
             "load 1-min | answer |",
             "|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for entry in results["lengths"].values():
        ours = [entry[n] for n in RUNS if n.startswith("parallelcomp")]
        theirs = [entry[n] for n in RUNS if n.startswith("transformers")]
        best, their_best = min(r["ttft_seconds"] for r in ours), min(r["forward_seconds"] for r in theirs)
        bound = theirs[0]["flops"] / (entry["gemm_gflops"] * 1e9)
        times = [" / ".join(f"{r[key]:.2f}" for r in runs) for key, runs in (("ttft_seconds", ours),
                                                                              ("forward_seconds", theirs))]
        lines.append(f"| {theirs[0]['tokens']:,} | {times[0]} | {times[1]} | {best / their_best:.2f}× | "
                     f"{bound:.2f} | {best / bound:.2f}× | {ours[0]['attention_kernel']} / {theirs[0]['attention']} | "
                     f"{'/'.join('yes' if r['correct'] else 'no' for r in ours)} | "
                     f"{entry['load_before']:.1f}→{entry['load_after']:.1f} | {ours[0]['answer'][:60]!r} |")
    return "\n".join(lines) + "\n"
