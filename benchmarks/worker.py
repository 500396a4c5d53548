"""One benchmark cell in its own process (so peak RSS is the cell's own): `parallelcomp:<preset>`,
`full`, `truncate` or `topk` on the samples of the spec (see `runner.cell_spec`)."""

from __future__ import annotations

import gc
import json
import math
from functools import lru_cache

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from parallelcomp import ParallelComp, ParallelCompConfig
from parallelcomp.prompts import end_of_turn_ids

from . import cellio
from .hf_loop import greedy_generate, peak_rss_mb, reset_peak_rss, rss_mb, target_nll
from .prompting import generation_input, ppl_input
from .scoring import spans_kept
from .tasks import Sample


@lru_cache(maxsize=1)  # `--inline` runs many cells in one process
def load(model_dir: str, dtype: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id} | end_of_turn_ids(tokenizer)


def preset_config(preset: str, **extra) -> ParallelCompConfig:
    """`NAME[,field=value...]`, e.g. `paper,keep_chunks=1`: a named preset with overrides (values
    parsed as JSON when they can be, else kept as strings)."""
    name, *pairs = preset.split(",")
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return ParallelCompConfig.preset(name, **overrides, **extra)


_ENGINES: dict[tuple, ParallelComp] = {}


def engine(model, tokenizer, preset: str, instruction: str, kv_store_dir: str | None) -> ParallelComp:
    """One engine per cell and instruction, as a user keeps one: its chunk store serves every
    sample, so a haystack shared by samples (passkey filler, the essays before a needle) is
    encoded once. Reuse is exact (tests/test_store.py), so scores do not depend on it; times do,
    and each record says how many chunks were reused. `kv_store_dir` adds a disk tier shared by
    the grid's cells (`--kv-store`)."""
    key = (id(model), preset, instruction, kv_store_dir)
    if any(k[0] != key[0] for k in _ENGINES):  # `--inline` moved on to another model
        _ENGINES.clear()
    if key not in _ENGINES:
        overrides = {"instruction": instruction} if instruction else {}
        if kv_store_dir:
            overrides["kv_store_dir"] = kv_store_dir
        _ENGINES[key] = ParallelComp(model, tokenizer, preset_config(preset, **overrides))
    return _ENGINES[key]


def run_parallelcomp(spec: dict, model, tokenizer, sample: Sample) -> dict:
    preset = spec["method"].split(":", 1)[1]
    pc = engine(model, tokenizer, preset, sample.instruction, spec.get("kv_store_dir"))
    if sample.task == "ppl":
        out = pc.score(sample.target, context=sample.context)
        rec = {"nll": out.nll, "n_target": out.n_tokens}
    else:
        out = pc.generate(sample.question, documents=sample.documents, context=sample.context,
                          max_new_tokens=spec["max_new_tokens"])
        kept = [(s.document, s.start, s.end) for c in out.chunks if c.kept for s in c.spans]
        rec = {"output": out.text, "gold_kept": spans_kept(sample.gold, kept),
               # per chunk, in order: NLL, lexical match, kept, and which gold spans it holds, so a
               # cell can be re-ranked offline (another λ) without running the model again
               "chunks": [[c.score, c.lexical, c.kept,
                           [i for i, g in enumerate(sample.gold)
                            if spans_kept([g], [(s.document, s.start, s.end) for s in c.spans])]]
                          for c in out.chunks]}
    st = out.stats
    return rec | {"tokens_in": st.tokens_in + st.prefix_tokens + st.question_tokens,
                  "prefill_seconds": st.prefill_seconds, "decode_seconds": st.decode_seconds,
                  "first_token_seconds": st.first_token_seconds,
                  "new_tokens": st.new_tokens, "kv_tokens": st.kv_tokens, "kv_bytes": st.kv_bytes,
                  "n_chunks": st.n_chunks, "n_kept": st.n_kept, "reused_chunks": st.reused_chunks}


def run_baseline(spec: dict, model, tokenizer, sample: Sample) -> dict:
    method, window = spec["method"], model.config.max_position_embeddings
    if sample.task == "ppl":
        ctx, target = ppl_input(method, tokenizer, sample, window)
        rec = target_nll(model, ctx, target)
        return rec | {"tokens_in": len(ctx) + len(target)}
    config = ParallelCompConfig()
    ids, kept = generation_input(method, tokenizer, sample, config, window, spec["max_new_tokens"])
    rec = greedy_generate(model, ids, spec["max_new_tokens"], eos_ids(model, tokenizer))
    text = tokenizer.decode(rec.pop("token_ids"), skip_special_tokens=True)
    return rec | {"output": text, "gold_kept": kept, "tokens_in": len(ids)}


def run_spec(spec: dict, emit) -> None:
    """Run every sample of `spec`, calling `emit(record)` after each."""
    torch.manual_seed(0)
    model, tokenizer = load(spec["model_dir"], spec["dtype"])
    run = run_parallelcomp if spec["method"].startswith("parallelcomp:") else run_baseline
    for raw in spec["samples"]:
        sample = Sample(**raw)
        gc.collect()
        reset_peak_rss()  # measure the run, not the model load (weights stay resident)
        loaded = rss_mb()
        rec = run(spec, model, tokenizer, sample)
        if "nll" in rec:
            rec["ppl"] = math.exp(rec["nll"])
        emit(rec | {"id": sample.id, "peak_rss_mb": peak_rss_mb(), "model_rss_mb": loaded})


if __name__ == "__main__":
    run_spec(cellio.read_spec(), cellio.emit)
