"""What grammar-constrained decoding (parallelcomp/grammar.py, llguidance) costs per token.

    python -m benchmarks grammar [--repeats 3] [--max-new-tokens 64]

The embedded SmolLM2-135M answers the same question three ways: unconstrained, under a JSON
schema (`json_schema=`) and under a forced tool call (`tools=`, tool_choice="required"). Decode
time per token is `stats.decode_seconds / stats.new_tokens` (the question prefill excluded),
the best of `repeats` runs. Then each constrained run's tokens are replayed through a fresh
`GrammarProcessor` to time its two steps per token apart: the mask fill (llguidance's
`compute_mask`) and the mask's application to a logits row (numpy). The machine is shared:
the load average (`os.getloadavg`) before and after is recorded next to the numbers.
Writes grammar.json and grammar.md under benchmarks/results/grammar/ and prints the table.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from parallelcomp import ParallelComp
from parallelcomp.grammar import GrammarProcessor, schema_grammar, tool_grammar

from .machine import describe

QUESTION = "Describe the weather in Paris today: city, temperature in Celsius, sky and a short note."
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "celsius": {"type": "integer", "minimum": -60, "maximum": 60},
        "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
        "note": {"type": "string", "maxLength": 60},
    },
    "required": ["city", "celsius", "sky", "note"],
}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
MODES = {  # name → (settings, the grammar they decode under)
    "unconstrained": ({}, lambda tokenizer: None),
    "json_schema": ({"json_schema": SCHEMA}, lambda tokenizer: schema_grammar(SCHEMA)),
    "tool_call": ({"tools": [TOOL], "tool_choice": "required"}, lambda tokenizer: tool_grammar([TOOL], "required", tokenizer)),
}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def replay(engine: ParallelComp, grammar: str, token_ids: list[int]) -> dict:
    """Mask fill and apply times (µs) per step for `token_ids` under `grammar`."""
    width = engine.model.get_output_embeddings().weight.shape[0]
    proc = GrammarProcessor(engine.tokenizer, grammar, width, engine.eos_ids, prompt_tokens=0)
    row = torch.zeros(1, width)
    fill, apply = [], []
    for i in range(len(token_ids) + 1):
        proc.advance(token_ids[i - 1 : i] if i else [])
        start = time.perf_counter()
        proc.matcher.unsafe_compute_mask_ptr(proc.bits.ctypes.data, proc.bits.nbytes)
        mid = time.perf_counter()
        allowed = np.unpackbits(proc.bits.view(np.uint8), bitorder="little")[:width].view(bool)
        row.numpy()[0, ~allowed] = -np.inf
        end = time.perf_counter()
        fill.append((mid - start) * 1e6)
        apply.append((end - mid) * 1e6)
    return {"fill_us_p50": _percentile(fill, 50), "fill_us_p95": _percentile(fill, 95),
            "apply_us_p50": _percentile(apply, 50), "apply_us_p95": _percentile(apply, 95)}


def run(repeats: int, max_new_tokens: int, out: Path) -> str:
    load_before = os.getloadavg()
    engine = ParallelComp.from_pretrained()
    engine.generate("Warm up.", max_new_tokens=4, json_schema={"enum": ["yes", "no"]})  # builds llguidance's tokenizer
    rows = []
    for mode, (settings, grammar_of) in MODES.items():
        runs = [engine.generate(QUESTION, max_new_tokens=max_new_tokens, **settings) for _ in range(repeats)]
        per_token = [r.stats.decode_seconds / r.stats.new_tokens * 1e3 for r in runs]
        row = {"mode": mode, "new_tokens": runs[0].stats.new_tokens, "decode_ms_per_token_best": min(per_token),
               "decode_ms_per_token_median": statistics.median(per_token), "text": runs[0].text}
        grammar = grammar_of(engine.tokenizer)
        if grammar is not None:
            row.update(replay(engine, grammar, runs[0].token_ids))
        rows.append(row)
    result = {"machine": describe(str(engine.model.dtype).removeprefix("torch.")),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "repeats": repeats, "max_new_tokens": max_new_tokens, "rows": rows}
    table = markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("grammar.json", json.dumps(result, indent=1) + "\n"), ("grammar.md", table)):
        (out / name).write_text(text)
    return table


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Grammar overhead: {m['cpu']}, {m['torch_threads']} torch threads, {m['dtype']}",
        "",
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in result['loadavg_before'])}, "
        f"after {tuple(round(x, 2) for x in result['loadavg_after'])}; best/median of {result['repeats']} runs.",
        "",
        "| mode | new tokens | decode ms/token best | median | mask fill µs p50 / p95 | mask apply µs p50 / p95 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fill = f"{r['fill_us_p50']:.0f} / {r['fill_us_p95']:.0f}" if "fill_us_p50" in r else "-"
        apply = f"{r['apply_us_p50']:.0f} / {r['apply_us_p95']:.0f}" if "apply_us_p50" in r else "-"
        lines.append(f"| {r['mode']} | {r['new_tokens']} | {r['decode_ms_per_token_best']:.1f} | "
                     f"{r['decode_ms_per_token_median']:.1f} | {fill} | {apply} |")
    lines += ["", "Outputs:", ""] + [f"- {r['mode']}: `{r['text'][:160]!r}`" for r in result["rows"]]
    return "\n".join(lines) + "\n"
