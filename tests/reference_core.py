"""Independent reference computations for the core runtime: plain full forwards with the model's
default positions, no ParallelComp code involved except the prompt token ids."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .reference import _cache_kwarg


@torch.inference_mode()
def single_prompt_forward(model, ids: list[int]):
    """Logits (T, V) and per-layer KV of one ordinary forward over `ids`."""
    out = model(torch.tensor([ids], device=model.device), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # `cache` from transformers 5.24
    return out.logits[0].float(), [(layer.keys, layer.values) for layer in cache.layers]


def question_nll(model, prefix: list[int], chunk: list[int], question: list[int]) -> torch.Tensor:
    """Per-token NLL of `question` in one forward over prefix + chunk + question."""
    logits, _ = single_prompt_forward(model, prefix + chunk + question)
    start = len(prefix) + len(chunk) - 1
    logprobs = torch.log_softmax(logits[start : start + len(question)], dim=-1)
    return -logprobs.gather(-1, torch.tensor(question, device=logprobs.device)[:, None])[:, 0]


@torch.inference_mode()
def pcw_greedy(model, prefix: list[int], kept_chunks: list[list[int]], question: list[int], n: int, eos: set[int]):
    """Greedy decode over separately encoded chunks merged PCW-style (method.md §1.6-1.7):
    each chunk encoded in its own full forward after the prefix, KV concatenated in order,
    question at p0 = len(prefix) + longest chunk."""
    p = len(prefix)
    layers = None
    for chunk in kept_chunks:
        _, kv = single_prompt_forward(model, prefix + chunk)
        if layers is None:
            layers = [([k[:, :, :p]], [v[:, :, :p]]) for k, v in kv]
        for (ks, vs), (k, v) in zip(layers, kv):
            ks.append(k[:, :, p:])
            vs.append(v[:, :, p:])
    cache = DynamicCache(ddp_cache_data=[(torch.cat(ks, 2), torch.cat(vs, 2)) for ks, vs in layers])
    pos = p + max(len(c) for c in kept_chunks)
    ids = torch.tensor([question], device=model.device)
    positions = torch.arange(pos, pos + len(question), device=model.device)[None]
    out_ids = []
    for _ in range(n):
        logits = model(ids, position_ids=positions, use_cache=True, **{_cache_kwarg(model): cache}).logits
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        out_ids.append(token)
        ids = torch.tensor([[token]], device=model.device)
        positions = positions[:, -1:] + 1
    return out_ids
