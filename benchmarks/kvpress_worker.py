"""Runs inside the kvpress environment: kvpress's SnapKVPress on the full input.

The parent builds each sample's prompt ids with ParallelComp's wording and passes them in the
spec, so this process needs only torch, transformers and kvpress.
"""

from __future__ import annotations

import gc

import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import cellio
from .hf_loop import greedy_generate, peak_rss_mb, reset_peak_rss, rss_mb


def main() -> None:
    spec = cellio.read_spec()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=getattr(torch, spec["dtype"])
    ).eval()
    press = SnapKVPress(compression_ratio=spec["kvpress_ratio"])
    for sample in spec["samples"]:
        gc.collect()
        reset_peak_rss()  # measure the run, not the model load (weights stay resident)
        loaded = rss_mb()
        rec = greedy_generate(model, sample["input_ids"], spec["max_new_tokens"],
                              set(spec["eos_ids"]), prefill_context=press(model))
        text = tokenizer.decode(rec.pop("token_ids"), skip_special_tokens=True)
        cellio.emit(rec | {"output": text, "tokens_in": len(sample["input_ids"]), "gold_kept": None,
                           "id": sample["id"], "peak_rss_mb": peak_rss_mb(), "model_rss_mb": loaded})


if __name__ == "__main__":
    main()
