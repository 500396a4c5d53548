"""Slow, obvious reference implementations, used only by tests.

They share no code with the package: attention probabilities come from an eager model run with
`output_attentions=True` (transformers5.md §5.2 Route 3) on plain sequences, and the selection
rules are written out with Python lists and loops, straight from method.md §3 and §4.
"""

from __future__ import annotations

import inspect

import torch


def _cache_kwarg(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def eager_run(model, ids: list[int], cache=None, positions: list[int] | None = None):
    """One eager forward of `ids` (optionally after `cache`, at explicit positions).

    Returns (per-layer attention probabilities (H, q, kv) of the batch row, the cache after it).
    """
    assert model.config._attn_implementation == "eager", "the oracle needs an eager model"
    kwargs = {_cache_kwarg(model): cache} if cache is not None else {}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions], device=model.device)
    out = model(input_ids=torch.tensor([ids], device=model.device), output_attentions=True, use_cache=True, **kwargs)
    new_cache = getattr(out, "cache", None) or out.past_key_values
    return [a[0] for a in out.attentions], new_cache


def _pool(values: list[float], kernel: int, pooling: str) -> list[float]:
    half, n = kernel // 2, len(values)
    out = []
    for j in range(n):
        window = values[max(0, j - half) : min(n, j + half + 1)]
        out.append(max(window) if pooling == "max" else sum(window) / kernel)  # avg: zero padding counted
    return out


def _reduce(rows: list[list[float]], how: str) -> list[float]:
    return [sum(col) / len(col) if how == "mean" else max(col) for col in zip(*rows)]


def snapkv_scores(attention: torch.Tensor, start: int, length: int, rows: list[int], kernel: int,
                  num_kv_heads: int, pooling: str = "max", gqa_reduce: str = "mean") -> list[list[float]]:
    """Per KV head, the score of chunk tokens [start, start+length) (method.md §3 steps 1-4) by
    the attention rows `rows` (absolute positions, e.g. the last 8 or the question's tokens).

    attention: (H, T, T) eager probabilities of one layer over prefix + chunk + question.
    """
    probs = attention.tolist()
    heads = len(probs)
    group = heads // num_kv_heads
    per_head = []
    for h in range(heads):
        observed = [probs[h][r] for r in rows]
        summed = [sum(row[start + j] for row in observed) for j in range(length)]
        per_head.append(_pool(summed, kernel, pooling))
    # query head h uses KV head h // group (transformers' repeat_kv layout)
    return [_reduce(per_head[g * group : (g + 1) * group], gqa_reduce) for g in range(num_kv_heads)]


def top_indices(scores: list[float], budget: int) -> list[int]:
    """The `budget` best tokens, earlier first on ties, returned in ascending order."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:budget])


def calibration_evictions(attention: torch.Tensor, rows: int, num_kv_heads: int, gqa_reduce: str,
                          context: int, candidates: list[int], region: list[int],
                          threshold: float) -> tuple[list[list[int]], list[list[float]]]:
    """Tokens each KV head evicts (method.md §4), with the reduced attention `a` per head.

    attention: (H, q, context + q) eager probabilities of the question step for one layer;
    candidates: evictable token indices (chunk tokens); region ⊆ candidates.
    """
    probs = attention.tolist()
    heads = len(probs)
    group = heads // num_kv_heads
    per_head = [[sum(col) / rows for col in zip(*probs[h][-rows:])] for h in range(heads)]
    a = [_reduce(per_head[g * group : (g + 1) * group], gqa_reduce)[:context] for g in range(num_kv_heads)]
    outliers = [[j for j in region if a[g][j] > threshold] for g in range(num_kv_heads)]
    m = max(len(o) for o in outliers)
    evicted = []
    for g, out in enumerate(outliers):
        rest = sorted((j for j in candidates if j not in out), key=lambda j: (a[g][j], j))
        evicted.append(sorted(out + rest[: m - len(out)]))
    return evicted, a
