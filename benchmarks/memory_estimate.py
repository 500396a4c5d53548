"""`python -m benchmarks memory`: the resource guard's estimate (guard.estimate) next to the
measured peak RSS growth of the same run, on the embedded SmolLM2 model.

Per case, in its own process (freed memory stays with the allocator, so cases must not share
one): load the model, warm up on a short text, reset the kernel's peak-RSS mark
(`/proc/self/clear_refs` ← 5, Linux), run one `generate`, and compare VmHWM − VmRSS(before)
with the estimate for that run (including what the chunk store's memory tier keeps from it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import machine

LICENCES = Path("/usr/share/common-licenses")
CASES = (("GPL-3", 2048, 8192), ("Apache-2.0", 1024, 2048))  # file, chunk_tokens, prefill_batch_tokens
QUESTION = "What does the licence say about warranty?"
NEW_TOKENS = 16


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(case: int, dtype: str = "auto") -> dict:
    """One case, in this process, in `dtype` ("auto": the machine's default)."""
    from parallelcomp import ParallelComp, ParallelCompConfig, guard

    name, chunk_tokens, batch_tokens = CASES[case]
    text = (LICENCES / name).read_text()
    config = ParallelCompConfig(chunk_tokens=chunk_tokens, prefill_batch_tokens=batch_tokens)
    pc = ParallelComp.from_pretrained(None, config, dtype=None if dtype == "auto" else dtype)
    pc.generate("Warm up?", documents=["A short text to warm up the kernels."], max_new_tokens=2)
    parts = pc.prompt_parts(QUESTION, True)
    chunks = list(pc._chunk([text], parts.prefix_ids).chunks)
    est = guard.estimate(guard.ModelShape.of(pc.model), config, len(parts.prefix_ids), chunks,
                         len(parts.question_ids), NEW_TOKENS, pc.store.room)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    out = pc.generate(QUESTION, documents=[text], max_new_tokens=NEW_TOKENS)
    growth = (_status_kib("VmHWM") - before) * 1024
    return {"file": name, "tokens_in": out.stats.tokens_in, "chunks": len(chunks), "chunk_tokens": chunk_tokens,
            "prefill_batch_tokens": batch_tokens, "measured_mib": round(growth / 2**20, 1),
            "estimate_mib": round(est.peak / 2**20, 1),
            "parts_mib": {k: round(getattr(est, k) / 2**20, 1) for k in ("kept_kv", "stored", "batch", "decode")},
            "ratio": round(est.peak / growth, 2), "dtype": out.stats.dtype}


def run(out: Path, dtype: str = "auto") -> Path:
    rows = []
    for case in range(len(CASES)):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_estimate", str(case), dtype], capture_output=True,
                              text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"machine": machine.describe(rows[0]["dtype"]), "load": os.getloadavg()[0], "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| file | tokens | chunks × chunk_tokens | prefill_batch_tokens | measured peak growth MiB | "
             "estimate MiB (kept / stored / batch / decode) | estimate ÷ measured |", "|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        p = r["parts_mib"]
        lines.append(f"| {r['file']} | {r['tokens_in']:,} | {r['chunks']} × {r['chunk_tokens']:,} | "
                     f"{r['prefill_batch_tokens']:,} | {r['measured_mib']:,} | {r['estimate_mib']:,} "
                     f"({p['kept_kv']} / {p['stored']} / {p['batch']} / {p['decode']}) | {r['ratio']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.md"


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), sys.argv[2])))
