"""Decode speed over a merged KV: the old path, the new one, and the memory-bandwidth bound.

    python -m benchmarks decode [--kv-tokens 8192 24576 98304] [--tokens 6 4 3] [--threads N]

The embedded SmolLM2-135M, in this machine's default dtype (`hardware.default_dtype`: bf16 where
the CPU has native bf16, fp32 otherwise), decodes one token at a time over a merged KV of each size,
five ways in the same process: the old path (a DynamicCache, whose `update` concatenates, and
transformers' sdpa, which calls SDPA with `enable_gqa=True` when there is no mask), the
preallocated cache alone (`kv.decode_cache`), the preallocated cache with packed one-query
attention in torch's SDPA split into key ranges and torch's GEMV ("torch",
`decode_kernel="torch"`), and the new path, where that attention and the projections run the C
kernels of decode_kernel.py ("kernel"), as `decode.generate_tokens` runs them
(`decode.one_token_steps`) for models other than the Llama family, and the whole step in one C call
("step", `decode_kernel.DecodeStep`, the default for SmolLM2 and the other Llama-family models).

The merged KV is random (normal, the model's dtype) of the real shape: timing depends only on shapes, and
random KV avoids minutes of prefill per size. The bound is the time to read every weight and
the whole KV once per token at the read bandwidth measured just before (a large fp32 `sum`, in
wall time, same thread count). Writes `decode_speed.json` and `decode_speed.md` under
benchmarks/results/decode/ and prints the table. docs/decode.md explains the layout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from parallelcomp import ParallelComp
from parallelcomp import decode_kernel
from parallelcomp import kv as kvops
from parallelcomp.decode import one_token_steps
from parallelcomp.compat import forward
from parallelcomp.default_model import DEFAULT_MODEL

from .machine import describe


PATHS = {  # name → (cache builder, attention scope, whole step in one C call)
    "old": (lambda kv, extra: kvops.to_cache(kv), lambda model: nullcontext(), False),
    "preallocated": (lambda kv, extra: kvops.decode_cache([kv], extra), lambda model: nullcontext(), False),
    "torch": (lambda kv, extra: kvops.decode_cache([kv], extra), lambda model: one_token_steps(model, kernel=False),
              False),
    "kernel": (lambda kv, extra: kvops.decode_cache([kv], extra), lambda model: one_token_steps(model, kernel=True),
               False),
    "step": (lambda kv, extra: kvops.decode_cache([kv], extra), lambda model: one_token_steps(model, kernel=True),
             True),
}


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes/s of the fastest of `repeats` sums over a `gib` GiB fp32 tensor (read-only traffic)
    with torch's threads, in wall time: CPU time would add up every thread's seconds and, with
    two threads, halve the bandwidth (and so inflate "new / bound"). The best of the repeats
    keeps a passing load from lowering it much; the run records the load."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def gemv_bandwidth(model, threads: int, repeats: int = 3, product=torch.nn.functional.linear) -> float:
    """Bytes/s at which a one-row `product` (torch's `F.linear`, or the C kernel's
    `decode_kernel.linear`) reads the model's own weight matrices (every Linear, the LM head
    included: a decoded token's matmuls), with `threads` torch threads, in wall time, best of
    `repeats`. Set against `read_bandwidth`, it shows what each GEMV reaches here."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights}
    before, best = torch.get_num_threads(), float("inf")
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                for w in weights:
                    product(rows[w.shape[1]], w)
                best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return sum(w.numel() * w.element_size() for w in weights) / best


def random_kv(model, tokens: int) -> list[kvops.LayerKV]:
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, tokens, cfg.hidden_size // cfg.num_attention_heads)
    return [(torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype))
            for _ in range(cfg.num_hidden_layers)]


@torch.inference_mode()
def time_decode(model, kv, path: str, tokens: int) -> dict:
    """Wall and CPU seconds of each one-token step after a warm-up step, and the greedy tokens."""
    build, scope, whole = PATHS[path]
    cache = build(kv, tokens + 1)
    one_call = decode_kernel.DecodeStep.for_model(model, cache) if whole else None
    if whole and one_call is None:
        raise SystemExit("the whole-step kernel declined this model and cache (decode_kernel.DecodeStep.for_model)")
    token, p0 = torch.tensor([[1]]), kvops.n_tokens(kv)
    wall, cpu, ids = [], [], []
    with scope(model):
        for step in range(tokens + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            if one_call is not None:
                logits = one_call(int(token), p0 + step)
            else:
                logits = forward(model, token, cache, torch.tensor([[p0 + step]]))
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            ids.append(int(token))
    return {"wall_seconds": wall[1:], "cpu_seconds": cpu[1:], "ids": ids}


def run(kv_sizes: list[int], tokens: list[int], threads: int | None, out: Path) -> str:
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = time.perf_counter()
    engine = ParallelComp.from_pretrained(None)
    model = engine.model
    if not decode_kernel.available():
        raise SystemExit(f"the C decode kernels are unavailable here: {decode_kernel.unavailable_reason()}")
    dtype = str(model.dtype).removeprefix("torch.")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth()
    gemv = {n: gemv_bandwidth(model, n) for n in sorted({1, torch.get_num_threads()})}
    kernel_gemv = {n: gemv_bandwidth(model, n, product=decode_kernel.linear) for n in gemv}
    rows = []
    for size, n in zip(kv_sizes, tokens):
        kv = random_kv(model, size)
        kv_bytes = kvops.n_bytes(kv)
        bound = (weight_bytes + kv_bytes) / bandwidth
        row = {"kv_tokens": size, "kv_mib": kv_bytes / 2**20, "timed_tokens": n, "bound_tok_s": 1 / bound}
        for path in PATHS:
            row[path] = timed = time_decode(model, kv, path, n)
            timed["tok_s"] = 1 / statistics.median(timed["wall_seconds"])
            timed["tok_per_cpu_s"] = 1 / statistics.median(timed["cpu_seconds"])
        rows.append(row)
        del kv
    result = {
        "machine": describe(dtype),
        "model": DEFAULT_MODEL,
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "gemv_gb_s": {str(n): rate / 1e9 for n, rate in gemv.items()},
        "kernel_gemv_gb_s": {str(n): rate / 1e9 for n, rate in kernel_gemv.items()},
        "uptime_before": uptime,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "decode_speed.md").write_text(table)
    return table


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Decode speed over a merged KV",
        "",
        f"SmolLM2-135M-Instruct, {m['dtype']}, {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"transformers {m['transformers']}. Random KV of the real shape (timing depends only on shapes). "
        "tok/s = 1 / median wall seconds per one-token step (after one warm-up step); per CPU-s = 1 / median "
        "CPU seconds of this process per step (with one thread: the speed while scheduled, which a loaded "
        "machine does not lower).",
        "",
        f"Read bandwidth measured in the run: {result['read_bandwidth_gb_s']:.1f} GB/s (fp32 sum, wall time, best of 3); "
        f"weights {result['weight_bytes'] / 1e6:.0f} MB. Bound = bandwidth / (weight bytes + KV bytes), per token.",
        "One-row `F.linear` over the model's own weight matrices (a token's matmuls) reads them at "
        + _rates(result["gemv_gb_s"]) + ", the C kernel's `decode_kernel.linear` at "
        + _rates(result["kernel_gemv_gb_s"]) + " (wall time, best of 3).",
        f"Load: `{result['uptime_before']}` before, 1-min load {result['load_after'][0]:.2f} after "
        f"({result['wall_seconds']:.0f} s run).",
        "",
        "Greedy tokens over random KV: the preallocated cache reproduces the old path bit for bit; packed "
        "attention rounds in another order, so over junk context (near-tied logits) the tokens may part "
        "after a few steps. Exactness is the tests' job (tests/test_decode.py and tests/test_decode_kernel.py).",
        "",
        "Columns: old; the preallocated cache alone; torch = preallocated + packed split SDPA + torch's GEMV; "
        "C kernels = the same steps through the model's modules with the C attention and GEMV; C step = the "
        "whole step in one C call (`decode_kernel.DecodeStep`, the default for Llama-family models).",
        "",
        "| KV tokens | KV MiB | old tok/s | preallocated only | torch | C kernels | C step | step / torch "
        "| bound tok/s | C kernels / bound | **C step / bound** | step per CPU-s / bound "
        "| same tokens as old (prealloc., torch, kernels, step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--:|",
    ]
    for r in result["rows"]:
        old, pre, split, new, step, bound = (r["old"], r["preallocated"], r["torch"], r["kernel"], r["step"],
                                             r["bound_tok_s"])
        same = ", ".join("yes" if r[p]["ids"] == old["ids"] else "no"
                         for p in ("preallocated", "torch", "kernel", "step"))
        lines.append(
            f"| {r['kv_tokens']:,} | {r['kv_mib']:,.0f} | {old['tok_s']:.2f} | {pre['tok_s']:.2f} "
            f"| {split['tok_s']:.2f} | {new['tok_s']:.2f} | {step['tok_s']:.2f} | {step['tok_s'] / split['tok_s']:.2f}× "
            f"| {bound:.2f} | {new['tok_s'] / bound:.0%} | **{step['tok_s'] / bound:.0%}** "
            f"| {step['tok_per_cpu_s'] / bound:.0%} | {same} |"
        )
    return "\n".join(lines) + "\n"


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{rate:.1f} GB/s with {n} thread{'s' if n != '1' else ''}" for n, rate in rates.items())
