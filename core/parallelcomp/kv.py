"""The only module that touches KV tensors: build caches, slice, select and merge them.

A layer's KV is a `(keys, values)` pair of shape (B, H_kv, T, D), never expanded to the query
heads (GQA-native, unlike the official code's post-`repeat_kv` cache, method.md §7 item 13).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

LayerKV = tuple[torch.Tensor, torch.Tensor]


def to_cache(kv: list[LayerKV]) -> DynamicCache:
    """A DynamicCache holding exactly these tensors (plain layers, nothing dropped)."""
    return DynamicCache(ddp_cache_data=kv)


def from_cache(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def set_layer(cache: DynamicCache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace one layer's KV; the cache length follows the tensors (transformers5.md §5.3)."""
    layer = cache.layers[layer_idx]
    layer.keys, layer.values = keys, values


def expand_batch(kv: list[LayerKV], batch: int) -> list[LayerKV]:
    """Copy a batch-1 KV (the shared prefix) to `batch` rows that later forwards can append to."""
    return [(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()) for k, v in kv]


def slice_tokens(kv: list[LayerKV], row: int, start: int, end: int) -> list[LayerKV]:
    """Tokens [start, end) of one batch row, as an owned batch-1 copy."""
    return [(k[row : row + 1, :, start:end].clone(), v[row : row + 1, :, start:end].clone()) for k, v in kv]


def pad_and_stack(prefix: list[LayerKV], chunks: list[list[LayerKV]]) -> list[LayerKV]:
    """Per layer: [prefix ‖ chunk_i right-padded with zeros to the longest chunk] for each row i."""
    longest = max(c[0][0].shape[-2] for c in chunks)
    out = []
    for layer_idx, (pk, pv) in enumerate(prefix):
        keys, values = [], []
        for chunk in chunks:
            ck, cv = chunk[layer_idx]
            pad = longest - ck.shape[-2]
            keys.append(torch.cat([pk, ck, ck.new_zeros(*ck.shape[:2], pad, ck.shape[-1])], dim=-2))
            values.append(torch.cat([pv, cv, cv.new_zeros(*cv.shape[:2], pad, cv.shape[-1])], dim=-2))
        out.append((torch.cat(keys), torch.cat(values)))
    return out


def gather_tokens(kv: list[LayerKV], indices: list[torch.Tensor]) -> list[LayerKV]:
    """Keep per layer and per KV head the token indices `indices[l]` of shape (1, H_kv, n)."""
    out = []
    for (k, v), idx in zip(kv, indices):
        index = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        out.append((k.gather(2, index), v.gather(2, index)))
    return out


def concat(parts: list[list[LayerKV]]) -> list[LayerKV]:
    """Concatenate several batch-1 KVs along the token axis, layer by layer."""
    return [
        (torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2))
        for i in range(len(parts[0]))
    ]


def layout(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's cache, from its config."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def n_tokens(kv: list[LayerKV]) -> int:
    return kv[0][0].shape[-2] if kv else 0


def n_bytes(kv: list[LayerKV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def layer_keys(cache: DynamicCache, layer_idx: int) -> torch.Tensor:
    """(B, H_kv, T, D) keys of one cache layer, read-only (already rotated)."""
    return cache.layers[layer_idx].keys
