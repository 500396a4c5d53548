"""The only module that touches KV tensors: build caches, slice, select and merge them.

A layer's KV is a `(keys, values)` pair of shape (B, H_kv, T, D), never expanded to the query
heads (GQA-native, unlike the official code's post-`repeat_kv` cache, method.md §7 item 13). A
chunk the AMX kernel reads in phase 2 may be kept `Tiled` instead (docs/store.md, "Chunks kept in
the kernel's layout"); `plain` gives its pairs back.

Two cache kinds: `to_cache` (a plain DynamicCache, for prefill and scoring, where each forward
appends once) and `decode_cache` (preallocated layers for token-by-token decoding, docs/decode.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from . import attention_kernel

LayerKV = tuple[torch.Tensor, torch.Tensor]


class Tiled(NamedTuple):
    """One layer of a chunk's KV (batch 1) in the layout the AMX kernel's tiles load
    (attention_kernel.tile): `tokens` keys and values, rounded up to whole blocks of 64 with zeros."""

    key: torch.Tensor
    value: torch.Tensor
    tokens: int


def tiled(key: torch.Tensor, value: torch.Tensor) -> Tiled:
    """A batch-1 layer's keys and values (1, H_kv, T, ·) as `Tiled` (a copy)."""
    return Tiled(*attention_kernel.tile(key, value), key.shape[-2])


def plain(layer: LayerKV | Tiled) -> LayerKV:
    """A layer's (keys, values) in the model's layout: a `Tiled` one untiled (a copy), else as it is."""
    return attention_kernel.untile(*layer) if isinstance(layer, Tiled) else layer


def to_cache(kv: list[LayerKV]) -> DynamicCache:
    """A DynamicCache holding exactly these tensors (plain layers, nothing dropped)."""
    return DynamicCache(ddp_cache_data=kv)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose tokens live at the front of buffers allocated once.

    `DynamicLayer.update` concatenates, which copies the layer's whole cache at every decoded
    token; here `update` writes the new tokens into the free slots after the n held ones and
    advances n. `keys`/`values` are the views [:, :, :n], so n = `get_seq_length()` and the
    masks, positions and attention read them exactly as they read a DynamicLayer's tensors.
    """

    def __init__(self, keys_buffer: torch.Tensor, values_buffer: torch.Tensor, n: int):
        """Over (B, H_kv, capacity, D) buffers whose first n token slots are already filled."""
        super().__init__()
        self._keys, self._values = keys_buffer, values_buffer
        self.device, self.is_initialized = keys_buffer.device, True
        self.keys, self.values = keys_buffer[:, :, :n], values_buffer[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> LayerKV:
        self._write(self.keys.shape[-2], key_states, value_states)
        return self.keys, self.values

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these tokens from now on (e.g. a layer after eviction), compacted to the front."""
        self._write(0, keys, values)

    def advance(self, n: int) -> None:
        """Hold the first n slots, after a kernel wrote the new tokens into the buffers itself
        (decode_kernel.DecodeStep)."""
        self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

    def _write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end, capacity = start + keys.shape[-2], self._keys.shape[-2]
        if end > capacity:
            msg = f"decode cache full: {end} tokens do not fit its {capacity} slots; reserve more extra_tokens"
            raise RuntimeError(msg)
        self._keys[:, :, start:end].copy_(keys)
        self._values[:, :, start:end].copy_(values)
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]


def decode_cache(parts: list[list[LayerKV | Tiled]], extra_tokens: int) -> Cache:
    """The merged KV for decoding: `parts` (the prefix, then each kept chunk) written once, back to
    back, into buffers with room for `extra_tokens` more per layer (question + answer). A `Tiled`
    layer is untiled straight into its place (no copy in the model's layout first)."""
    layers = []
    for layer_idx in range(len(parts[0])):
        pieces = [part[layer_idx] for part in parts]
        held = sum(n_tokens([piece]) for piece in pieces)
        k, v = pieces[0]
        keys = k.new_empty(*k.shape[:2], held + extra_tokens, k.shape[-1])
        values = v.new_empty(*v.shape[:2], held + extra_tokens, v.shape[-1])
        at = 0
        for piece in pieces:
            n = n_tokens([piece])
            span = (keys[:, :, at : at + n], values[:, :, at : at + n])
            if isinstance(piece, Tiled):
                attention_kernel.untile(piece.key, piece.value, n, out=span)
            else:
                span[0].copy_(piece[0])
                span[1].copy_(piece[1])
            at += n
        layers.append(PreallocatedLayer(keys, values, held))
    return Cache(layers=layers)


def from_cache(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def set_layer(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace one layer's KV; the cache length follows the tensors (transformers5.md §5.3)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, PreallocatedLayer):
        layer.replace(keys, values)
    else:
        layer.keys, layer.values = keys, values


def split_rows(cache: DynamicCache, spans: list[tuple[int, int]], tiles: bool = False) -> list[list[LayerKV]]:
    """Row i's tokens [start_i, end_i) of a batch cache, as owned batch-1 copies (`tiles`: `Tiled`
    ones). The cache is emptied layer by layer as it is copied, so the batch and its copies
    overlap by one layer, not the whole KV (phase 1's peak memory)."""
    rows: list[list[LayerKV]] = [[] for _ in spans]
    while cache.layers:
        layer = cache.layers.pop(0)
        for row, (start, end) in enumerate(spans):
            key, value = layer.keys[row : row + 1, :, start:end], layer.values[row : row + 1, :, start:end]
            rows[row].append(tiled(key, value) if tiles else (key.clone(), value.clone()))
    return rows


def gather_tokens(kv: list[LayerKV], indices: list[torch.Tensor]) -> list[LayerKV]:
    """Keep per layer and per KV head the token indices `indices[l]` of shape (1, H_kv, n) (of a
    `Tiled` layer: of its tokens, untiled)."""
    out = []
    for layer, idx in zip(kv, indices):
        k, v = plain(layer)
        index = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        out.append((k.gather(2, index), v.gather(2, index)))
    return out


def concat(parts: list[list[LayerKV | Tiled]]) -> list[LayerKV]:
    """Concatenate several batch-1 KVs along the token axis, layer by layer (a `Tiled` layer untiled)."""
    out = []
    for i in range(len(parts[0])):
        layers = [plain(p[i]) for p in parts]
        out.append((torch.cat([k for k, _ in layers], dim=-2), torch.cat([v for _, v in layers], dim=-2)))
    return out


def layout(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's cache, from its config."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def n_tokens(kv: list[LayerKV]) -> int:
    if kv and isinstance(kv[0], Tiled):
        return kv[0].tokens
    return kv[0][0].shape[-2] if kv else 0


def n_bytes(kv: list[LayerKV]) -> int:
    """The bytes the tensors hold (a `Tiled` layer's padding to whole blocks included)."""
    return sum(layer[0].numel() * layer[0].element_size() + layer[1].numel() * layer[1].element_size() for layer in kv)


def token_bytes(kv: list[LayerKV]) -> int:
    """The bytes of the tokens' KV in the model's layout: `n_bytes` without a `Tiled` layer's padding."""
    return sum(n_tokens([layer]) * (layer[0].shape[1] * layer[0].shape[3] + layer[1].shape[1] * layer[1].shape[3])
               * layer[0].element_size() for layer in kv)
