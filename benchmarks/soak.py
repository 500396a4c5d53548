"""Soak benchmark (issue #13; not a test): does the engine stay healthy over many mixed requests?

1. 500 sequential requests on a tiny random Llama (the embedded SmolLM2 tokenizer, 3 layers,
   hidden 64), about a third of them invalid (bad types, lone surrogates, dict/set documents,
   unbounded max_new_tokens, tiny memory budgets) and a sixth abandoned streams; the process RSS
   is sampled after every request. Verdict: after a 100-request warm-up, the RSS stays within
   5% of its post-warm-up level, and each valid request's output is the same every time.
2. 8 concurrent callers, as threads and as asyncio tasks (`pc_integrations.common.aiter_in_thread`),
   each asking its own question: every answer equals the same question asked serially.

    PYTHONPATH=core:. python -m benchmarks.soak      # a few minutes on 2 shared CPU cores

Writes benchmarks/results/soak/results.json and results.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from parallelcomp import ParallelComp, ParallelCompConfig, ParallelCompError
from parallelcomp.default_model import embedded_model_dir
from pc_integrations.common import aiter_in_thread

from .machine import describe

OUT = Path(__file__).parent / "results" / "soak"
REQUESTS, WARMUP, TOLERANCE = 500, 100, 0.05
DOCS = [f"Note {i}: the {c} river passes stone {i} on its way to the {c} sea." for i, c in
        enumerate(["red", "green", "blue", "grey", "white", "black", "amber", "violet"])]
QUESTIONS = [f"Which river passes stone {i}?" for i in range(8)]
INVALID = [
    dict(question=42),
    dict(question="Q\ud800?"),
    dict(documents={"a": 1}),
    dict(documents={"a", "b"}),
    dict(documents=5),
    dict(documents=["ok", "bad \udfff"]),
    dict(max_new_tokens=2**63),
    dict(max_new_tokens=10**9),
    dict(temperature="hot"),
    dict(top_p=float("nan")),
    dict(stop=["x"] * 40),
    dict(seed=True),
]


def tiny_engine(config: ParallelCompConfig | None = None) -> ParallelComp:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    ))
    return ParallelComp(model.eval(), tokenizer, config or ParallelCompConfig(keep_chunks=2, chunk_tokens=48))


def request(pc: ParallelComp, kind: str, q: int, rng: random.Random) -> str:
    """Run one request of `kind` about question `q`; return the error class, or the output."""
    args = dict(question=QUESTIONS[q], documents=DOCS, max_new_tokens=6)
    try:
        if kind == "valid":
            return pc.generate(**args).text
        if kind == "score":
            return f"{pc.score(DOCS[q], documents=DOCS).nll:.6f}"
        if kind == "abandoned":
            stream = pc.stream(**{**args, "max_new_tokens": 60})
            for _ in zip(range(rng.randrange(3)), stream):
                pass
            del stream
            return "abandoned"
        if kind == "budget":
            small = ParallelComp(pc.model, pc.tokenizer, pc.config.replace(memory_budget_bytes=10**6))
            return small.generate(**args).text
        return pc.generate(**{**args, **rng.choice(INVALID)}).text
    except ParallelCompError as err:
        return type(err).__name__


def sequential(pc: ParallelComp) -> dict:
    rng = random.Random(0)
    kinds = rng.choices(["valid", "score", "abandoned", "invalid", "budget"], weights=[40, 10, 15, 30, 5], k=REQUESTS)
    proc = psutil.Process()
    rss, outcomes, answers = [], Counter(), {}
    start = time.perf_counter()
    for i, kind in enumerate(kinds):
        q = rng.randrange(len(QUESTIONS))
        result = request(pc, kind, q, rng)
        rss.append(proc.memory_info().rss)
        outcomes[kind if kind in ("valid", "score", "abandoned") else f"{kind}: {result}"] += 1
        if kind in ("valid", "score"):
            answers.setdefault((kind, q), set()).add(result)
    seconds = time.perf_counter() - start
    settled = statistics.median(rss[WARMUP : WARMUP + 50])
    after = rss[WARMUP:]
    drift = max(abs(r - settled) for r in after) / settled
    return {
        "requests": REQUESTS,
        "seconds": round(seconds, 1),
        "outcomes": dict(sorted(outcomes.items())),
        "rss_mib": {
            "first": round(rss[0] / 2**20, 1),
            "after_warmup_median": round(settled / 2**20, 1),
            "max_after_warmup": round(max(after) / 2**20, 1),
            "last": round(rss[-1] / 2**20, 1),
            "samples_every_10": [round(r / 2**20, 1) for r in rss[::10]],
        },
        "max_drift_after_warmup": round(drift, 4),
        "rss_flat": drift <= TOLERANCE,
        "valid_outputs_stable": all(len(v) == 1 for v in answers.values()),
    }


def concurrent(pc: ParallelComp) -> dict:
    def ask(q: int) -> str:
        return pc.generate(QUESTIONS[q], documents=DOCS, max_new_tokens=8).text

    serial = [ask(q) for q in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threads = list(pool.map(ask, range(8)))

    async def streamed(q: int) -> str:
        deltas = aiter_in_thread(lambda: pc.stream(QUESTIONS[q], documents=DOCS, max_new_tokens=8))
        return "".join([d async for d in deltas])

    async def gather() -> list[str]:
        return await asyncio.gather(*(streamed(q) for q in range(8)))

    tasks = asyncio.run(gather())
    return {
        "callers": 8,
        "threads_equal_serial": threads == serial,
        "asyncio_equal_serial": tasks == serial,
        "distinct_answers": len(set(serial)),
    }


def table(result: dict) -> str:
    s, c = result["sequential"], result["concurrent"]
    rss = s["rss_mib"]
    rows = [
        ("sequential requests", f"{s['requests']} in {s['seconds']} s"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in s["outcomes"].items())),
        ("RSS first / after warm-up (median) / max after / last",
         f"{rss['first']} / {rss['after_warmup_median']} / {rss['max_after_warmup']} / {rss['last']} MiB"),
        (f"max drift after {WARMUP}-request warm-up", f"{s['max_drift_after_warmup']:.2%} (limit {TOLERANCE:.0%})"),
        ("RSS flat", "yes" if s["rss_flat"] else "NO"),
        ("valid outputs identical on every repeat", "yes" if s["valid_outputs_stable"] else "NO"),
        ("8 threads = serial", "yes" if c["threads_equal_serial"] else "NO"),
        ("8 asyncio tasks = serial", "yes" if c["asyncio_equal_serial"] else "NO"),
        ("distinct answers among the 8", str(c["distinct_answers"])),
    ]
    lines = ["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "# Soak benchmark\n\n" + "\n".join(lines) + f"\n\nMachine: {result['machine']['cpu']}, " \
        f"{result['machine']['cores']} cores (shared), torch {result['machine']['torch']}.\n"


def main() -> int:
    torch.set_num_threads(1)  # the machine is shared: more threads only oversubscribe its cores
    pc = tiny_engine()
    result = {"machine": describe("float32"), "sequential": sequential(pc), "concurrent": concurrent(pc)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "results.md").write_text(table(result))
    print(table(result))
    s, c = result["sequential"], result["concurrent"]
    ok = s["rss_flat"] and s["valid_outputs_stable"] and c["threads_equal_serial"] and c["asyncio_equal_serial"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
