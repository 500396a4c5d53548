"""Scoped attention hooks: the only place that reaches into a model's attention layers.

Two routes (transformers5.md §5.2), both scoped to a `with` block and undone in `finally`:

* `forward_hooks(model, fn)` — Route 1: a forward hook on every `self_attn` module. It runs
  after the layer's attention, so it can read that layer's cache (which already holds this
  step's keys) without changing the forward. Used by per-chunk compression during phase 2.
* `attention_function(model, handler)` — Route 2: registers the attention function
  "parallelcomp" together with a mask function (without the mask the question would silently
  ignore the cache, transformers5.md §5.5), switches this model to it, and restores the previous
  implementation afterwards. `handler(module, query, key, value, mask)` may shrink key/value
  before the attention runs; the real attention is the model's previous backend (sdpa, eager or
  flash attention). Used by attention-bias calibration at the question step, and with no handler
  by `packed_decode`: on sdpa models, a one-token step with no mask runs `packed_one_query`.

Plus the GQA-native score helper both stages share: `last_rows_attention`. This module does not
decide what to evict (compression.py, calibration.py) and does not edit KV (kv.py).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from .errors import ModelNotSupportedError

NAME = "parallelcomp"
Handler = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

_lock = threading.Lock()
_users = 0  # scopes currently relying on the registered name (registered while > 0)
_handlers: dict[int, tuple[Handler | None, str]] = {}  # id(self_attn) → (handler, previous backend)


def attention_modules(model) -> list[torch.nn.Module]:
    """The `self_attn` module of every decoder layer, in layer order."""
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    if not modules or not all(hasattr(m, "q_proj") for m in modules):
        raise ModelNotSupportedError(f"{type(model).__name__}: no `self_attn` modules with q_proj/layer_idx found")
    return sorted(modules, key=lambda m: m.layer_idx)


# ---------------------------------------------------------------------- scores


def last_rows_attention(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, visible: torch.Tensor
) -> torch.Tensor:
    """Softmax attention (fp32) of some query rows over all keys, grouped per KV head.

    query (B, H, w, D) post-RoPE; keys (B, H_kv, T, D) from the cache (never expanded);
    visible (B, w, T) bool, which keys each row may see. Returns (B, H_kv, G, w, T), G = H / H_kv.
    """
    b, h, w, d = query.shape
    h_kv = keys.shape[1]
    q = query.float().view(b, h_kv, h // h_kv, w, d)  # (B, H_kv, G, w, D), head h ↔ KV head h // G
    logits = torch.einsum("bkgwd,bktd->bkgwt", q, keys.float()) * scaling
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def recompute_queries(module, hidden_states: torch.Tensor, position_embeddings, rows: int) -> torch.Tensor:
    """(B, H, rows, D): the layer's queries for its last `rows` input positions, as the layer
    computed them (q_proj, q_norm where the family has one, RoPE at the given positions)."""
    h = hidden_states[:, -rows:]
    q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim)  # (B, rows, H, D)
    if hasattr(module, "q_norm"):  # Qwen3-style per-head RMSNorm
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    q, _ = rope(q, q, cos[:, -rows:], sin[:, -rows:])
    return q


# ---------------------------------------------------------------------- Route 1


def hook_cache(kwargs: dict):
    """The cache a `self_attn` forward received (`cache` on 5.24, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


@contextmanager
def forward_hooks(model, fn: Callable) -> Iterator[None]:
    """Call `fn(module, kwargs)` after every `self_attn` forward while the block runs."""

    def hook(module, args, kwargs, output):
        if "hidden_states" not in kwargs and args:
            kwargs = {**kwargs, "hidden_states": args[0]}
        fn(module, kwargs)
        return None  # anything else would replace the layer's output

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------- Route 2

_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@contextmanager
def attention_function(model, handler: Handler) -> Iterator[None]:
    """Run the model's attention through "parallelcomp" (and `handler`) inside the block."""
    global _users
    previous = model.config._attn_implementation or "eager"
    if previous == NAME:
        raise RuntimeError("this model is already inside a parallelcomp attention scope")
    if previous not in _BACKENDS:
        msg = f"attention calibration supports the {_BACKENDS} backends, not {previous!r}; load the model with sdpa"
        raise ModelNotSupportedError(msg)
    modules = attention_modules(model)
    with _lock:
        if _users == 0:
            AttentionInterface.register(NAME, _dispatch)
            AttentionMaskInterface.register(NAME, sdpa_mask)  # bool masks; converted per backend below
        _users += 1
        for m in modules:
            _handlers[id(m)] = (handler, previous)
    try:
        model.set_attn_implementation(NAME)
        yield
    finally:
        try:
            model.set_attn_implementation(previous)
        finally:
            with _lock:
                for m in modules:
                    _handlers.pop(id(m), None)
                _users -= 1
                if _users == 0:  # leave transformers' registries as we found them
                    AttentionInterface._global_mapping.pop(NAME, None)
                    AttentionMaskInterface._global_mapping.pop(NAME, None)


@contextmanager
def packed_decode(model) -> Iterator[None]:
    """Inside the block, one-token steps of an sdpa model run `packed_one_query`.

    A no-op for other backends (eager keeps its own numerics; flash attention is unverified here),
    inside an `attention_function` scope (calibration), whose dispatch already packs, and for
    architectures `attention_modules` does not know, which then decode as before.
    """
    scope = nullcontext()
    if model.config._attn_implementation == "sdpa":
        try:
            attention_modules(model)
            scope = attention_function(model, None)
        except ModelNotSupportedError:
            pass
    with scope:
        yield


_SDPA_SPECIAL = {"position_bias", "softcap"}  # kwargs that sdpa_attention_forward must handle itself


def packed_one_query(module, query, key, value, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """SDPA for one query token, the G query heads of each KV head packed as G query rows.

    Equal to SDPA with `enable_gqa=True`, which transformers picks when there is no mask (every
    one-token step on an unpadded cache) and which is several times slower on CPU (docs/decode.md).
    No mask is needed: the one new token sees every cached key. query (B, H, 1, D), key and value
    (B, H_kv, T, D); returns ((B, 1, H, D), None) like the transformers attention functions.
    """
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    packed = query.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, G, D): head h ↔ KV head h // G, as repeat_kv
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, dropout_p=dropout, scale=scaling)
    return out.reshape(b, 1, h, value.shape[-1]), None


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    """The registered "parallelcomp" attention: optional handler, then the previous backend."""
    handler, previous = _handlers.get(id(module), (None, "sdpa"))
    if handler is not None:
        key, value, attention_mask = handler(module, query, key, value, attention_mask)
    if previous == "sdpa":
        if query.shape[2] == 1 and attention_mask is None and not _SDPA_SPECIAL.intersection(kwargs):
            return packed_one_query(module, query, key, value, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if previous == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, **kwargs)
    # flash attention: the merged cache has no padding, and its causal mask is bottom-right aligned
    return ALL_ATTENTION_FUNCTIONS[previous](module, query, key, value, None, **kwargs)
