"""`python -m benchmarks repeat-query`: encode once, ask many — the chunk KV store measured.

Per context length: one haystack of the RULER essays with five needles (different keys, at
10/30/50/70/90% depth) and five questions, one per needle. In one process: question 1 cold (every
chunk's phase 1 runs; the disk tier is filled after its last token), then questions 2-5 (every chunk from
the memory tier). Then a fresh process asks question 1 again with the disk tier only
(kv_store_bytes=0: the bounded-memory worst case), and another with both tiers at their
defaults (what a new CLI run with `--kv-store DIR` gets: phase 2 scores every chunk read from
disk in one forward). Each process runs in its own subprocess so its peak RSS is its own.

Reported per question: prefill s, time to first token (prefill + the question step), decode
tok/s, seconds spent writing the disk tier (after the last token since the store writes behind),
the whole call's seconds, chunks reused, store bytes, peak RSS, the answer and whether it holds
the needle's value.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from parallelcomp.config import PRESETS

from . import machine
from .main_job import GEMM, phase2_work, prefill_flops, question_flops
from .tasks import NIAH_NEEDLE, NIAH_QUESTION, _count, _first_tokens, _insert, data

REPO = Path(__file__).resolve().parent.parent
DEPTHS = (10, 30, 50, 70, 90)
CONFIG = PRESETS["retrieval"]  # what `make ask` runs: K=1, 2048-token chunks
MAX_NEW_TOKENS = 48


def haystack(tokenizer, length: int) -> tuple[str, list[str], list[str]]:
    """(context, questions, values): five needles in about `length` tokens of essays."""
    rng = random.Random(f"repeat-query-{length}")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{6,}", data.essays()[:200_000])})
    keys = [f"{rng.choice(words)}-{rng.choice(words)}" for _ in DEPTHS]
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in DEPTHS]
    needles = [NIAH_NEEDLE.format(kind="numbers", key=k, value=v) for k, v in zip(keys, values)]
    text = _first_tokens(tokenizer, length - sum(_count(tokenizer, n) for n in needles))
    sentences = re.split(r"(?<=[.!?])\s+", text)
    for needle, depth in sorted(zip(needles, DEPTHS), key=lambda nd: -nd[1]):  # deepest first: depths hold
        text, _ = _insert(sentences, needle, depth, " ")
        sentences = re.split(r"(?<=[.!?])\s+", text)
    return text, [NIAH_QUESTION.format(one="number", key=k) for k in keys], values


def worker(spec: dict) -> dict:
    """Run inside a subprocess: ask `spec["questions"]` over the context, one engine."""
    from transformers import AutoTokenizer

    from parallelcomp import ParallelComp, ParallelCompConfig

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    context, questions, values = haystack(tokenizer, spec["length"])
    preset = PRESETS[spec.get("preset", "retrieval")]
    config = ParallelCompConfig(**{**preset, "kv_store_dir": spec["store"], **spec.get("config", {})})
    pc = ParallelComp.from_pretrained(spec["model_dir"], config)
    rows, history = [], []
    for i in spec["questions"]:
        start = time.perf_counter()
        out = pc.generate(questions[i], context=context, history=history, max_new_tokens=MAX_NEW_TOKENS)
        call, asked_after = time.perf_counter() - start, len(history)
        if spec.get("conversation") and out.text.strip():  # the next question after this turn
            history = [*history, {"role": "user", "content": questions[i]}, {"role": "assistant", "content": out.text}]
        s = out.stats
        decode_tokens = max(0, s.new_tokens - 1)
        rows.append({
            "question": i + 1, "chunk_seconds": round(s.chunk_seconds, 2), "reused_documents": s.reused_documents,
            "prefill_seconds": round(s.prefill_seconds, 2),
            "ttft_seconds": round(s.ttft_seconds, 2),
            "decode_tok_s": round(decode_tokens / max(1e-9, s.decode_seconds - s.first_token_seconds), 2),
            "write_seconds": round(s.store_write_seconds, 2), "call_seconds": round(call, 2),
            "reused_chunks": s.reused_chunks, "reused_head_tokens": s.reused_head_tokens,
            "disk_hits": s.store_disk_hits, "n_chunks": s.n_chunks, "history_messages": asked_after,
            "question_tokens": s.question_tokens, "exceeds_window": s.exceeds_window,
            "tokens_in": s.tokens_in, "store_bytes": s.store_bytes, "kv_bytes": s.kv_bytes, "dtype": s.dtype,
            "answer": out.text, "correct": values[i] in out.text,
            "flops": flops(pc.model.config.to_dict(), s, [c.n_tokens for c in out.chunks]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        })
    disk = Path(spec["store"]).rglob("*.safetensors") if spec["store"] else ()
    return {"rows": rows, "disk_bytes": sum(p.stat().st_size for p in disk)}


def flops(cfg: dict, s, chunks: list[int]) -> float:
    """The work a question did (RunStats `s`): a cold prefill, or phase 2 alone when every chunk
    was reused. Phase 2 runs from the first question-head token a chunk did not read from the
    store (`reused_head_tokens`, spread evenly over the chunks): from the question's first token
    when the whole head was reused, from where a conversation's last head and this one part
    otherwise, over the carried keys too."""
    if s.encoded_chunks:
        tokens, logits = phase2_work(s.question_scored)
        return prefill_flops(cfg, s.prefix_tokens, tokens, chunks, logits)
    carried = s.reused_head_tokens / len(chunks)
    tokens, logits = phase2_work(s.question_scored, carried)
    return question_flops(cfg, s.prefix_tokens + carried, tokens, chunks, logits)


def run(lengths: list[int], out: Path, repeats: int = 1, preset: str = "retrieval") -> Path:
    """Measure each of `lengths`; rows of other lengths already in `out` are kept (if they were
    measured with the same preset). `repeats` > 1 runs the cold and the 2nd question again in that
    many more fresh processes (each over a store of its own), so that the 2nd question's ratio to
    the cold one is seen across the host's spread. `preset`: the engine's (`ParallelCompConfig.preset`);
    `retrieval` is what `make ask` runs, the paper's default K = 3 keeps three times the KV."""
    from parallelcomp.default_model import embedded_model_dir

    model_dir = str(embedded_model_dir(progress=False))
    import torch

    from parallelcomp.hardware import default_dtype, measure_gflops

    dtype = default_dtype(torch.device("cpu"))
    results = machine.per_length_results(out, str(dtype), PRESETS[preset])
    for length in lengths:
        with tempfile.TemporaryDirectory(prefix="pc-store-") as store:
            load = os.getloadavg()[0]
            gflops = measure_gflops(dtype, GEMM, seconds=1.0)
            warm = spawn("repeat_query", {"model_dir": model_dir, "length": length, "store": store,
                                          "questions": [0, 1, 2, 3, 4], "preset": preset})
            fresh = spawn("repeat_query", {"model_dir": model_dir, "length": length, "store": store, "questions": [0], "preset": preset,
                            "config": {"kv_store_bytes": 0}})
            both = spawn("repeat_query", {"model_dir": model_dir, "length": length, "store": store, "questions": [0], "preset": preset})
        again = []
        for _ in range(repeats - 1):
            with tempfile.TemporaryDirectory(prefix="pc-store-") as store:
                again.append(spawn("repeat_query", {"model_dir": model_dir, "length": length, "store": store,
                                                    "questions": [0, 1], "preset": preset})["rows"])
        results["lengths"][str(length)] = {"same_process": warm["rows"], "fresh_process_disk": fresh["rows"],
                                           "fresh_process_both": both["rows"], "repeats": again,
                                           "disk_bytes": warm["disk_bytes"], "load_before": load,
                                           "gemm_gflops": gflops,
                                           "load_after": os.getloadavg()[0]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(table(results))
    return out / "results.md"


LAYOUTS = {"history after documents": True, "history before documents": False}


def run_conversation(lengths: list[int], out: Path, preset: str = "retrieval") -> Path:
    """The five questions as one conversation (each after the earlier questions and answers), in
    each layout of `ParallelCompConfig.history_after_documents`, side by side per length: one
    process per layout, the memory tier only (docs/integrations.md, "A conversation over one
    corpus")."""
    from parallelcomp.default_model import embedded_model_dir

    model_dir = str(embedded_model_dir(progress=False))
    import torch

    from parallelcomp.hardware import default_dtype, measure_gflops

    dtype = default_dtype(torch.device("cpu"))
    results = machine.per_length_results(out, str(dtype), PRESETS[preset])

    def conversation(after: bool) -> Callable[[int], list[dict]]:
        return lambda length: spawn("repeat_query", {
            "model_dir": model_dir, "length": length, "store": None, "questions": [0, 1, 2, 3, 4], "preset": preset,
            "conversation": True, "config": {"history_after_documents": after}})["rows"]

    runs = {"gemm_gflops": lambda length: measure_gflops(dtype, GEMM, seconds=1.0),  # the bound's rate, first
            **{name: conversation(after) for name, after in LAYOUTS.items()}}
    return machine.side_by_side(out, results, lengths, runs, conversation_table)


def conversation_table(results: dict) -> str:
    lines = ["| context | layout | turn | history messages | question suffix tokens | chunks reused | "
             "head tokens carried | prefill s | FLOP bound s | TTFT s | past the window | peak RSS MB | correct | answer |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for length, entry in results["lengths"].items():
        for name in LAYOUTS:
            for turn, r in enumerate(entry[name], 1):
                bound = _bound(r, entry) if "gemm_gflops" in entry else "–"  # results before 2026-12-06 13:30
                lines.append(f"| {int(length):,} | {name} | {turn} | {r['history_messages']} | "
                             f"{r['question_tokens']} | {r['reused_chunks']}/{r['n_chunks']} | {r['reused_head_tokens']} | "
                             f"{r['prefill_seconds']} | {bound} | "
                             f"{r['ttft_seconds']} | {'yes' if r['exceeds_window'] else 'no'} | {r['peak_rss_mb']:,} | "
                             f"{'yes' if r['correct'] else 'no'} | {r['answer'][:50]!r} |")
        summary = {name: (sum(r["correct"] for r in entry[name]), sum(r["ttft_seconds"] for r in entry[name][1:]))
                   for name in LAYOUTS}
        lines.append(f"| | {'; '.join(f'{n}: {c}/5 correct, turns 2-5 {t:.1f} s to first token in all' for n, (c, t) in summary.items())}"
                     f"; load 1-min {entry['load_before']:.1f}→{entry['load_after']:.1f}"
                     f"{'; GEMM %.0f GFLOP/s' % entry['gemm_gflops'] if 'gemm_gflops' in entry else ''} | | | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def spawn(module: str, spec: dict) -> dict:
    """Run `python -m benchmarks.<module>` on `spec` (JSON on stdin) in a fresh process, so its
    peak RSS is its own; return the JSON object it prints last, with the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "core"), str(REPO)])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}"], input=json.dumps(spec),
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"{module} worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_seconds": time.perf_counter() - start}


def table(results: dict) -> str:
    lines = ["| context | run | question | chunks reused | chunking s (documents memoized) | prefill s | FLOP bound s | prefill ÷ bound | TTFT s | "
             "cold ÷ this TTFT | decode tok/s | disk writes s | call s | store MB (memory) | peak RSS MB | correct | answer |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for length, entry in results["lengths"].items():
        cold = entry["same_process"][0]["ttft_seconds"]
        runs = [("same process", r) for r in entry["same_process"]] + \
               [("fresh process, disk tier", r) for r in entry["fresh_process_disk"]] + \
               [("fresh process, both tiers", r) for r in entry.get("fresh_process_both", [])]
        for name, r in runs:
            lines.append(
                f"| {int(length):,} | {name} | {r['question']} | {r['reused_chunks']}/{r['n_chunks']} | "
                f"{_chunking(r)} | {r['prefill_seconds']} | {_bound(r, entry)} | {_ratio(r, entry)} | {r['ttft_seconds']} | {cold / r['ttft_seconds']:.1f}× | {r['decode_tok_s']} | "
                f"{r.get('write_seconds', '–')} | {r.get('call_seconds', '–')} | {r['store_bytes'] / 1e6:,.0f} | {r['peak_rss_mb']:,} | {'yes' if r['correct'] else 'no'} | "
                f"{r['answer'][:60]!r} |")
        first = entry["same_process"][0]
        bound = first["flops"] / (entry["gemm_gflops"] * 1e9)
        lines.append(f"| | cold prefill {first['flops'] / 1e12:.2f} TFLOP ÷ {entry['gemm_gflops']:.1f} GFLOP/s GEMM = "
                     f"bound {bound:.1f} s; measured {first['prefill_seconds']} s = {first['prefill_seconds'] / bound:.2f}× "
                     f"the bound; disk tier {entry['disk_bytes'] / 1e6:,.0f} MB; load 1-min {entry['load_before']:.1f}"
                     f"→{entry['load_after']:.1f} | | | | | | | | | | | | | | | |")
        if entry.get("repeats"):
            pairs = second_question_ratios(entry)
            median = statistics.median(ratio for _, _, ratio in pairs)
            lines.append(f"| | 2nd question against cold in {len(pairs)} processes: cold TTFT "
                         f"{' / '.join(f'{c}' for c, _, _ in pairs)} s, 2nd "
                         f"{' / '.join(f'{q}' for _, q, _ in pairs)} s, ratios "
                         f"{' / '.join(f'{r:.1f}×' for _, _, r in pairs)} (median {median:.1f}×) | | | | | | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def second_question_ratios(entry: dict) -> list[tuple[float, float, float]]:
    """(cold TTFT, 2nd question's TTFT, their ratio) of each process that asked both: the first
    (`same_process`) and each of `repeats`."""
    runs = [entry["same_process"], *entry.get("repeats", [])]
    return [(rows[0]["ttft_seconds"], rows[1]["ttft_seconds"], rows[0]["ttft_seconds"] / rows[1]["ttft_seconds"])
            for rows in runs]


def _chunking(row: dict) -> str:
    """Seconds the call spent chunking its context and whether the engine's memo had it; '–' in
    results written before time to first token counted chunking (the rows' TTFT omits it)."""
    if "chunk_seconds" not in row:
        return "–"
    return f"{row['chunk_seconds']} ({'yes' if row['reused_documents'] else 'no'})"


def _bound(row: dict, entry: dict) -> str:
    """Seconds the row's FLOPs take at the GEMM rate measured before the run; '–' in results
    written before reused questions carried their phase-2 FLOPs."""
    return f"{row['flops'] / (entry['gemm_gflops'] * 1e9):.2f}" if row["flops"] else "–"


def _ratio(row: dict, entry: dict) -> str:
    return f"{row['prefill_seconds'] * entry['gemm_gflops'] * 1e9 / row['flops']:.2f}×" if row["flops"] else "–"


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
