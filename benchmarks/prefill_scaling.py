"""`python -m benchmarks prefill-scaling`: a cold prefill at growing context lengths, next to its
FLOP bound, and the peak RSS with each tier of the chunk store.

Per length, store, `--batch-tokens` value (`prefill_batch_tokens`), `--attention-kernels`
value (`attention_kernel`), `--layer-kernels` value (`layer_kernel`) and `--pack-weights` value
(`pack_weights`; side by side when given several): one fresh process (so its
peak RSS is its own) loads the embedded model in the machine's default dtype, measures the GEMM
rate (`main_job.GEMM`), builds the repeat-query haystack of that length and answers its first
question with the settings `make ask` uses, then measures the GEMM rate again: the bound uses the
rate before, and the rate after shows how far a shared host drifted during the prefill. The
store is either the memory tier (the default budget) or the disk tier alone (`kv_store_bytes=0`,
a temporary `kv_store_dir`): the chunk KV then leaves memory as each micro-batch is scored.

Then a second question over the same haystack, every chunk reused from the store's tier, times
phase 2 alone (after the peak RSS is read, so the peak is the cold question's).

`--repeats N` runs each cell in N fresh processes, each against its own GEMM measurement: a
shared host's load moves a single run by several per cent either way (docs/performance.md), so
the row is the process with the median ratio to its bound, and the table lists every process's
ratio beside it. The cells of one length take turns, so a drift of the host meets them alike.

Reported: prefill seconds, FLOPs of the work (`main_job.prefill_flops`), the bound (FLOPs ÷ GEMM
rate) and the ratio, tokens/s, RSS after loading the model, peak RSS, the weights' bytes, and
whether the answer holds the needle's value.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

from . import machine
from .main_job import GEMM, phase2_work, prefill_flops
from .memory_estimate import _status_kib
from .repeat_query import CONFIG, MAX_NEW_TOKENS, haystack, spawn


def worker(spec: dict) -> dict:
    """Inside a subprocess: one cold question over a haystack of spec["length"] tokens."""
    from transformers import AutoTokenizer

    from parallelcomp import ParallelComp, ParallelCompConfig
    from parallelcomp.hardware import measure_gflops

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    context, questions, values = haystack(tokenizer, spec["length"])
    with tempfile.TemporaryDirectory(prefix="pc-scaling-") as store:
        tier = {"kv_store_bytes": 0, "kv_store_dir": store} if spec["store"] == "disk" else {}
        config = ParallelCompConfig(**CONFIG, **tier, prefill_batch_tokens=spec["batch_tokens"],
                                    attention_kernel=spec["kernel"], layer_kernel=spec["layers"],
                                    pack_weights=spec.get("pack", True))
        pc = ParallelComp.from_pretrained(spec["model_dir"], config)
        loaded_mb = _status_kib("VmRSS") / 1024
        gflops = measure_gflops(pc.model.dtype, GEMM, seconds=1.0)
        load = os.getloadavg()[0]
        out = pc.generate(questions[0], context=context, max_new_tokens=MAX_NEW_TOKENS)
        peak_mb = _status_kib("VmHWM") / 1024
        gflops_after = measure_gflops(pc.model.dtype, GEMM, seconds=1.0)  # how the host drifted meanwhile
        again = pc.generate(questions[1], context=context, max_new_tokens=1).stats  # every chunk reused
    s = out.stats
    run_tokens, logit_rows = phase2_work(s.question_scored)
    flops = prefill_flops(pc.model.config.to_dict(), s.prefix_tokens, run_tokens, [c.n_tokens for c in out.chunks],
                          logit_rows)
    weights = sum(p.numel() * p.element_size() for p in pc.model.parameters())
    return {
        "length": spec["length"], "store": spec["store"], "batch_tokens": spec["batch_tokens"],
        "kernel": spec["kernel"], "attention_kernel": s.attention_kernel, "layers": spec["layers"],
        "layer_kernel": s.layer_kernel, "pack": spec.get("pack", True), "packed_weight_bytes": s.packed_weight_bytes,
        "tokens_in": s.tokens_in, "n_chunks": s.n_chunks,
        "dtype": s.dtype, "threads": s.threads, "gemm_gflops": round(gflops, 1),
        "gemm_gflops_after": round(gflops_after, 1), "flops": flops,
        "prefill_seconds": round(s.prefill_seconds, 2), "bound_seconds": round(flops / (gflops * 1e9), 2),
        "tokens_per_second": round(s.tokens_in / s.prefill_seconds, 1),
        "weights_mb": round(weights / 2**20), "loaded_rss_mb": round(loaded_mb),
        "peak_rss_mb": round(peak_mb), "store_bytes": s.store_bytes,
        "reused_prefill_seconds": round(again.prefill_seconds, 2), "reused_chunks": again.reused_chunks,
        "correct": values[0] in out.text, "load_before": load, "load_after": os.getloadavg()[0],
    }


def run(lengths: list[int], stores: list[str], batch_tokens: list[int] | None, out: Path,
        kernels: list[str] = ("auto",), layers: list[str] = ("auto",), repeats: int = 1,
        packs: list[bool] = (True,)) -> Path:
    """Measure every (length, store, prefill_batch_tokens, attention_kernel, layer_kernel, pack_weights) in `repeats`
    fresh processes (`median`): the cells of one length take turns, in the opposite order each
    round, so that the host's drift falls on them alike. Rows of other cells already in `out` are
    kept if they were measured in the same dtype (one file never mixes dtypes)."""
    from parallelcomp import ParallelCompConfig
    from parallelcomp.default_model import embedded_model_dir

    model_dir = str(embedded_model_dir(progress=False))
    batch_tokens = batch_tokens or [ParallelCompConfig().prefill_batch_tokens]
    previous = out / "results.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else []
    for length in lengths:
        specs = [{"model_dir": model_dir, "length": length, "store": store, "batch_tokens": batch, "kernel": kernel,
                  "layers": layer, "pack": pack}
                 for store, batch, kernel, layer, pack in itertools.product(stores, batch_tokens, kernels, layers, packs)]
        processes: list[list[dict]] = [[] for _ in specs]
        for round_ in range(repeats):
            for i in range(len(specs))[:: -1 if round_ % 2 else 1]:
                processes[i].append(spawn("prefill_scaling", specs[i]))
                row = median(processes[i])
                rows = sorted([r for r in rows if _cell(r) != _cell(row) and r["dtype"] == row["dtype"]] + [row],
                              key=_cell)
                out.mkdir(parents=True, exist_ok=True)
                results = {"machine": machine.describe(row["dtype"]), "config": CONFIG, "rows": rows}
                (out / "results.json").write_text(json.dumps(results, indent=1))
                (out / "results.md").write_text(table(rows))
    return out / "results.md"


def ratio(row: dict) -> float:
    """A process's prefill ÷ its FLOP bound (at the GEMM rate that process measured)."""
    return row["prefill_seconds"] * row["gemm_gflops"] * 1e9 / row["flops"]


def median(rows: list[dict]) -> dict:
    """The process whose `ratio` is the median of `rows` (the lower of the middle two for an even
    count), with every process's prefill seconds, GEMM rate, ratio, load and answer under "runs";
    "correct" only where every process answered correctly."""
    chosen = sorted(rows, key=ratio)[(len(rows) - 1) // 2]
    runs = [{"prefill_seconds": r["prefill_seconds"], "gemm_gflops": r["gemm_gflops"],
             "gemm_gflops_after": r.get("gemm_gflops_after"), "ratio": round(ratio(r), 3),
             "load_before": r["load_before"], "load_after": r["load_after"], "correct": r["correct"]} for r in rows]
    return chosen | {"runs": runs, "correct": all(r["correct"] for r in rows)}


def _cell(row: dict) -> tuple[int, str, int, str, str, bool]:
    """A row's settings; rows written before a kernel choice existed ran torch's fused attention,
    torch's layers and plain linear weights."""
    return (row["length"], row["store"], row["batch_tokens"], row.get("kernel", "fused"), row.get("layers", "torch"),
            row.get("pack", False))



def table(rows: list[dict]) -> str:
    lines = ["| context | store tier | batch tokens | attention | layers | chunks | prefill s | TFLOP | GEMM GFLOP/s (before → after) | bound s | prefill ÷ bound | tokens/s | "
             "weights MB | RSS loaded MB | peak RSS MB | peak − loaded MB | correct | 2nd question prefill s | load 1-min | "
             "each process's prefill ÷ bound |",
             "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['tokens_in']:,} | {r['store']} | {r['batch_tokens']:,} | {r.get('attention_kernel', 'sdpa')} | {_layers(r)} | {r['n_chunks']} | {r['prefill_seconds']} | {r['flops'] / 1e12:.2f} | "
            f"{r['gemm_gflops']}{_after(r)} | {r['bound_seconds']} | {ratio(r):.2f}× | "
            f"{r['tokens_per_second']:,} | {r['weights_mb']:,} | {r['loaded_rss_mb']:,} | {r['peak_rss_mb']:,} | "
            f"{r['peak_rss_mb'] - r['loaded_rss_mb']:,} | {'yes' if r['correct'] else 'no'} | "
            f"{r.get('reused_prefill_seconds', '–')} | "
            f"{r['load_before']:.1f}→{r['load_after']:.1f} | {_runs(r)} |")
    return "\n".join(lines) + "\n"


def _layers(row: dict) -> str:
    """The layers cell: the layer kernel, and "+ packed linear" where the weights ran packed."""
    return row.get("layer_kernel", "torch") + (" + packed linear" if row.get("packed_weight_bytes") else "")


def _after(row: dict) -> str:
    """The GEMM cell's " → rate after the prefill" ("" for rows measured before it was)."""
    return f" → {row['gemm_gflops_after']}" if row.get("gemm_gflops_after") else ""


def _runs(row: dict) -> str:
    """Every process's ratio, in the order they ran ("–" for rows measured before `--repeats`)."""
    runs = row.get("runs", [])
    return " / ".join(f"{r['ratio']:.2f}×" for r in runs) if len(runs) > 1 else "–"


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
