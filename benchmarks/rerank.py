"""`python -m benchmarks rerank`: a finished cell's gold kept under other ranking settings, from
the NLLs the run recorded.

Selection keeps the K chunks with the lowest NLL − λ·match (docs/lexical-prior.md). The NLL
needs phase 1 over every chunk (minutes per sample at 64K on a laptop CPU); the match needs only
the tokenizer. Every parallelcomp sample of `run` records its chunks' NLLs (worker.py, `chunks`),
so this command rebuilds each sample's chunks and question with the engine's own code, computes
the match under each variant (`field=value,...` over the cell's preset, fields limited to
`RANKING`), ranks with the recorded NLLs, and counts the samples whose kept chunks hold every gold
span. The cell's own settings run first and must reproduce the kept chunks the run recorded,
sample for sample, or the command stops.
"""

from __future__ import annotations

import json
from pathlib import Path

from parallelcomp import lexical
from parallelcomp.eviction import TopK

from .runner import model_dir
from .tasks import make_samples
from .worker import engine, load, preset_config

RANKING = {"lexical_weight", "lexical_fold_case", "keep_chunks"}
"""The settings that change which chunks are kept but not any chunk's NLL."""


def kept(nll: list[float], match: list[float], weight: float, k: int) -> set[int]:
    """The chunks the engine's own top-K (eviction.TopK over lexical.rank) keeps."""
    top = TopK[int](k)
    for i, (n, m) in enumerate(zip(nll, match)):
        top.offer(lexical.rank(n, m, weight), i, i)
    return top.kept_indices()


def rerank(results: Path, key: str, variants: list[str]) -> dict:
    cell = json.loads(results.read_text())["cells"][key]
    model_name, task, method, length = key.split("|")
    preset = method.split(":", 1)[1]
    recs = cell["samples"]
    if not recs or "chunks" not in recs[0]:
        raise SystemExit(f"{key}: no per-chunk records (run before they were recorded); run the cell again")
    model, tokenizer = load(model_dir(model_name), "float32")  # no forward runs: any dtype chunks alike
    samples = {s.id: s for s in make_samples(task, tokenizer, int(length), len(recs))}
    rows = []
    recorded = preset_config(preset).model_dump()
    for variant in [preset, *(f"{preset},{v}" for v in variants)]:
        config = preset_config(variant)
        changed = {field for field, value in config.model_dump().items() if recorded[field] != value}
        if changed - RANKING:
            raise SystemExit(f"{variant}: only {sorted(RANKING)} change the ranking without changing the NLLs")
        hits, moved, kept_by_id = 0, [], {}
        for rec in recs:
            sample = samples[rec["id"]]
            pc = engine(model, tokenizer, variant, sample.instruction, None)  # as the run built it
            parts = pc.prompt_parts(sample.question, with_documents=True)
            # chunking only (no phase 1), of the documents or the one context, as the run's generate call
            chunks = list(pc._corpus(parts, sample.documents, sample.context, None, True).chunks)
            if len(chunks) != len(rec["chunks"]):
                raise SystemExit(f"{rec['id']}: {len(chunks)} chunks now, {len(rec['chunks'])} in the run")
            match = pc.lexical_matches(parts, chunks, {c.index: None for c in chunks})
            top = kept([c[0] for c in rec["chunks"]], [match[c.index] for c in chunks],
                       config.lexical_weight, config.keep_chunks)
            ran = {i for i, c in enumerate(rec["chunks"]) if c[2]}
            if variant == preset and top != ran:
                raise SystemExit(f"{rec['id']}: re-ranking with the run's own settings keeps {sorted(top)}, "
                                 f"the run kept {sorted(ran)}")
            kept_by_id[rec["id"]] = sorted(top)
            held = {g for i in top for g in rec["chunks"][i][3]}
            hit = held == set(range(len(sample.gold)))
            hits += hit
            if hit != rec["gold_kept"]:
                moved.append(f"{rec['id']}: {'kept' if hit else 'lost'}")
        rows.append({"variant": variant, "gold_kept": hits, "n": len(recs), "changed": moved, "kept": kept_by_id})
    return {"cell": key, "rows": rows}


def table(out: dict) -> str:
    lines = [f"Re-ranked from the NLLs recorded by `{out['cell']}` (`python -m benchmarks rerank`).", "",
             "| ranking | gold kept | samples that differ from the run |", "|---|---:|---|"]
    lines += [f"| `{r['variant']}` | {r['gold_kept']}/{r['n']} | {', '.join(r['changed']) or '—'} |"
              for r in out["rows"]]
    return "\n".join(lines) + "\n"


def main(results: str, cell: str, variants: list[str], out: str) -> Path:
    res = rerank(Path(results) / "results.json", cell, variants)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    stem = cell.replace("|", "-").replace(":", "-").replace(",", "-").replace("=", "")
    (path / f"rerank-{stem}.json").write_text(json.dumps(res, indent=1))
    (path / f"rerank-{stem}.md").write_text(table(res))
    print(table(res))
    return path
