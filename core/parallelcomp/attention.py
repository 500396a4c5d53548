"""Scoped attention hooks: the only place that reaches into a model's attention layers.

Two scopes, each a `with` block undone in `finally`:

* `attention_function(model, handler)` — Route 2 of transformers5.md §5.2: registers the
  attention function "parallelcomp" together with a mask function (without the mask the question
  would silently ignore the cache, transformers5.md §5.5), switches this model to it, and
  restores the previous implementation afterwards. `handler(module, query, key, value, mask)` may shrink key/value
  before the attention runs; the real attention is the model's previous backend (sdpa, eager or
  flash attention). Used by attention-bias calibration at the question step, and with no handler
  by `packed_decode`: on sdpa models, a one-token step with no mask runs `packed_one_query`
  (on CPU, optionally the C kernel of decode_kernel.py), and a GQA layer's masked multi-token
  step (the question step) `packed_queries`, neither copying the KV heads, or where the engine
  attends on the AMX kernel and the mask hides only the question's own future, that kernel.
* `chunk_attention(model, prefix, contexts, observe)` — phase 2 (prefill.question_nll): the same
  registration, but the attention itself is `_attend_chunks`: batch row i's question
  attends to [prefix ‖ chunk i (‖ its question head) ‖ its own earlier tokens], reading the prefix
  and each chunk's KV where they are stored, with no padded batch copy and no `repeat_kv` expansion.
* `causal_kernel(model, kernel)` — phase 1 and the prompt prefix on the "matmul" or "amx" kernel
  (`ParallelCompConfig.attention_kernel`): an sdpa model's causal self-attention over a whole
  sequence runs `_causal_matmul`, blocks of bf16 matmuls, which on a CPU with native bf16 GEMMs
  but no AMX is about twice torch's fused kernel there, or attention_kernel.py's AMX tiles, about
  twice torch's fused kernel on a CPU with AMX (docs/hardware.md).

Plus the GQA-native score helper: `last_rows_attention`. This module does not decide what to
evict (compression.py, calibration.py) and does not edit KV (kv.py).
"""

from __future__ import annotations

import sys
import threading
import weakref
from contextlib import contextmanager, nullcontext
from functools import lru_cache, partial
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import attention_kernel, compat, decode_kernel
from .errors import ModelNotSupportedError
from .kv import LayerKV, Tiled, plain

NAME = "parallelcomp"
Handler = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
Observer = Callable[[int, int, torch.Tensor], None]  # (row, layer, probabilities)
Masks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a row's visible keys, hidden keys, additive mask
SPLIT_KEYS = 2048  # fewest keys per range of a split one-token attention (docs/decode.md)
CAUSAL_ROWS = 192  # packed query rows (G per position) per block of `_causal_matmul` (docs/hardware.md)
CAUSAL_KERNELS = ("matmul", *attention_kernel.KERNELS)  # kernels with a causal mode: phase 1, the question step

_lock = threading.Lock()
_users = 0  # scopes currently relying on the registered name (registered while > 0)
_attends: dict[int, Callable] = {}  # id(self_attn) → its attention while a scope is active
_outside: dict[int, str] = {}  # id(model) → its backend before the scope, while a scope is active


def backend(model) -> str:
    """The model's attention backend as loaded ("sdpa", "eager", ...), also while a run on it is
    inside a scope here (its `_attn_implementation` then reads "parallelcomp"): an engine built on
    a model whose stream is open must choose its kernels as one built while the model is idle."""
    with _lock:
        return _outside.get(id(model)) or str(model.config._attn_implementation)


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


# ---------------------------------------------------------------------- Route 2

_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@contextmanager
def attention_function(model, handler: Handler, kernel: bool = False, causal: str = "") -> Iterator[None]:
    """Run the model's attention through "parallelcomp" (and `handler`) inside the block;
    `kernel`: one-token steps may run the C kernel (packed_one_query); `causal` ("matmul", "amx"
    or "avx512"): a causal multi-token step may run on that kernel (`_causal_step`)."""
    previous = model.config._attn_implementation or "eager"
    if previous not in _BACKENDS and previous != NAME:
        msg = f"attention calibration supports the {_BACKENDS} backends, not {previous!r}; load the model with sdpa"
        raise ModelNotSupportedError(msg)
    with _scope(model, attention_modules(model),
                lambda module: partial(_through, handler, previous, kernel=kernel, causal=causal)):
        yield


@contextmanager
def chunk_attention(model, prefix: list[LayerKV], contexts: list[list[list[LayerKV]]],
                    observe: Observer | None = None, kernel: str = "sdpa",
                    kept: dict[int, LayerKV] | None = None, keep: int = 0) -> Iterator[None]:
    """Phase 2's attention inside the block: row i of the forward is the question behind
    `contexts[i]`, one or more batch-1 KV segments in order (a chunk, then its question head).

    `prefix` (batch-1 KV) and the segments are read in place. The forward must get no cache and a
    4D (1, 1, q, q) causal mask, which transformers passes through as it is. `observe(row, layer,
    probs)` receives each row's fp32 attention probabilities, (H_kv, G, q, P + L_i + q). `kernel`
    (ParallelComp.attention_kernel): "matmul" forms the scores with one matmul in the model's dtype, "amx"
    (or "avx512") attends over each row's chunk on attention_kernel.py's kernel; "sdpa" is torch's fused kernel.
    `kept`: filled with each layer's KV of the first `keep` question tokens, (B, H_kv, keep, D).
    """
    layers = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not layers:
        raise ModelNotSupportedError(f"{type(model).__name__}: no attention modules with a layer_idx found")
    masks: dict[tuple[int, int | None, int], Masks] = {}  # per forward, shared by its layers
    with _scope(model, layers, lambda module: partial(_attend_chunks, prefix, contexts, observe, kernel, masks,
                                                      kept, keep)):
        yield


@contextmanager
def causal_kernel(model, kernel: str) -> Iterator[None]:
    """Inside the block, each causal self-attention of an sdpa model over a whole sequence (query
    and key lengths equal, no mask: phase 1's micro-batches and the prompt prefix) runs on
    `kernel`: `_causal_matmul` ("matmul") or attention_kernel.attend ("amx", "avx512"); every other call
    goes to transformers' sdpa function as before. Any other kernel ("sdpa", or the model's own
    backend) changes nothing."""
    if kernel not in CAUSAL_KERNELS:
        yield
        return
    if model.config._attn_implementation != "sdpa":
        backend = model.config._attn_implementation
        raise ModelNotSupportedError(f"the {kernel} attention kernel replaces sdpa, not {backend!r}")
    with _scope(model, attention_modules(model), lambda module: partial(_causal_or_sdpa, kernel)):
        yield


@contextmanager
def _scope(model, modules: list[torch.nn.Module], attend_for: Callable[[torch.nn.Module], Callable]) -> Iterator[None]:
    """Switch `model` to the registered "parallelcomp" attention, with `attend_for(module)` as the
    attention of each of its attention `modules`, for the block."""
    global _users
    if model.config._attn_implementation == NAME:
        raise RuntimeError("this model is already inside a parallelcomp attention scope")
    previous = model.config._attn_implementation or "eager"
    with _lock:
        if _users == 0:
            AttentionInterface.register(NAME, _dispatch)
            AttentionMaskInterface.register(NAME, sdpa_mask)  # bool masks; converted per backend below
        _users += 1
        for m in modules:
            _attends[id(m)] = attend_for(m)
        _outside[id(model)] = previous
    try:
        model.set_attn_implementation(NAME)
        yield
    finally:
        try:
            model.set_attn_implementation(previous)
        finally:
            with _lock:
                for m in modules:
                    _attends.pop(id(m), None)
                _outside.pop(id(model), None)
                _users -= 1
                if _users == 0:  # leave transformers' registries as we found them
                    AttentionInterface._global_mapping.pop(NAME, None)
                    AttentionMaskInterface._global_mapping.pop(NAME, None)


@contextmanager
def packed_decode(model, kernel: bool = False, causal: str = "") -> Iterator[None]:
    """Inside the block, one-token steps of an sdpa model run `packed_one_query`; with `kernel`,
    on the C kernel (decode_kernel.py) wherever it takes the step's tensors. The question step's
    masked GQA attention runs `packed_queries`, or with `causal` on that kernel ("matmul":
    `_causal_matmul`, "amx": the AMX kernel) where its mask hides only each question token's
    future (`_causal_step`).

    A no-op for other backends (eager keeps its own numerics; flash attention is unverified here),
    inside an `attention_function` scope (calibration), whose dispatch already packs, and for
    architectures `attention_modules` does not know, which then decode as before.
    """
    scope = nullcontext()
    if model.config._attn_implementation == "sdpa":
        try:
            attention_modules(model)
            scope = attention_function(model, None, kernel, causal)
        except ModelNotSupportedError:
            pass
    with scope:
        yield


_SDPA_SPECIAL = {"position_bias", "softcap"}  # kwargs that sdpa_attention_forward must handle itself


def _plain_softmax(kwargs) -> bool:
    """Whether a call's attention is plain softmax attention: no soft-capping, position bias or
    attention sinks (`s_aux`), which only transformers' own functions handle."""
    return not _SDPA_SPECIAL.intersection(kwargs) and kwargs.get("s_aux") is None


def packed_one_query(module, query, key, value, dropout: float = 0.0, scaling: float | None = None,
                     kernel: bool = False, **kwargs):
    """SDPA for one query token, the G query heads of each KV head packed as G query rows.

    Equal to SDPA with `enable_gqa=True`, which transformers picks when there is no mask (every
    one-token step on an unpadded cache) and which is several times slower on CPU (docs/decode.md).
    No mask is needed: the one new token sees every cached key. query (B, H, 1, D), key and value
    (B, H_kv, T, D); returns ((B, 1, H, D), None) like the transformers attention functions.
    `kernel`: the C kernel (decode_kernel.attend) where it takes these tensors, else torch's.
    """
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    packed = query.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, G, D): head h ↔ KV head h // G, as repeat_kv
    splits = _key_splits(key) if dropout == 0.0 else 1
    if kernel and dropout == 0.0 and decode_kernel.supports(packed, key, value):
        out = decode_kernel.attend(packed, key, value, scaling)
    elif splits > 1:
        out = _split_key_attention(packed, key, value, splits, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, dropout_p=dropout, scale=scaling)
    return out.reshape(b, 1, h, value.shape[-1]), None


def packed_queries(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):
    """SDPA for several query tokens under a mask, the G query heads of each KV head packed as
    G·q query rows: the question step over the merged KV (q question tokens, a causal mask over
    their own keys).

    transformers' sdpa function gives torch a GQA model's keys and values copied G times
    (`repeat_kv`) whenever there is a mask; at the question step that copy took longer than the
    attention itself (docs/decode.md, "Measured"). query (B, H, q, D); key and value (B, H_kv, T, D);
    attention_mask (B or 1, 1, q, T), bool or additive, shared by the heads. Returns ((B, q, H, Dv),
    None) like the transformers attention functions.
    """
    b, h, q, d = query.shape
    h_kv = key.shape[1]
    rows = query.reshape(b, h_kv, (h // h_kv) * q, d)  # head h ↔ KV head h // G, its q rows consecutive
    mask = attention_mask.expand(b, 1, q, -1).repeat(1, 1, h // h_kv, 1)  # the same mask for each of the G heads
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None  # strided on CUDA


def _packs_queries(query, key, attention_mask, kwargs) -> bool:
    """Whether `packed_queries` computes this call: a GQA layer, several query tokens and a mask
    shared by the heads, plain softmax attention."""
    return (query.shape[2] > 1 and query.shape[1] != key.shape[1] and attention_mask is not None
            and attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and _plain_softmax(kwargs))


def _causal_step(query, key, value, attention_mask, kwargs, kernel: str) -> bool:
    """Whether causal attention on `kernel` (row m of q sees keys t <= T - q + m: "amx"
    attention_kernel.attend, "matmul" `_causal_matmul`) computes this call exactly: several query
    tokens after the cached ones (the question step), a bool mask that hides from each of them
    only the later question tokens, plain softmax attention, no dropout, and for "amx" tensors
    the kernel takes. Its output differs from torch's fused kernel's by rounding, as phases 1 and
    2 on it do."""
    q, t = query.shape[2], key.shape[2]
    if (q < 2 or t < q or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or attention_mask.shape[1:] != (1, q, t) or kwargs.get("dropout") or not _plain_softmax(kwargs)
            or (kernel in attention_kernel.KERNELS and not attention_kernel.takes(query, key, value))):
        return False
    return _hides_only_future(attention_mask, q, t)


_last_mask: tuple[weakref.ref, bool] | None = None  # (the mask, the answer): `_hides_only_future`


def _hides_only_future(attention_mask: torch.Tensor, q: int, t: int) -> bool:
    """Whether a (B, 1, q, t) bool mask shows every context key and hides from each question token
    only the later ones. Checked once per forward: transformers hands every layer the same mask
    tensor, and comparing a 7,511-token question's (q, t) mask in each of SmolLM2's 30 layers took
    0.90-0.95 s of its step, once per forward 0.10 s (ad hoc, 2026-12-06, docs/decode.md). Masks are built, never changed
    in place (inference tensors keep no version counter to check it)."""
    global _last_mask
    last = _last_mask
    if last is not None and last[0]() is attention_mask:
        return last[1]
    own = attention_mask[..., t - q :]  # the context keys must all be visible, the question's own causal
    answer = bool(attention_mask[..., : t - q].all()) and torch.equal(own, _causal(q, own.device).expand_as(own))
    _last_mask = (weakref.ref(attention_mask), answer)
    return answer


@lru_cache(maxsize=8)
def _causal(q: int, device: torch.device) -> torch.Tensor:
    """(q, q) bool, lower triangular: the question step's mask over its own keys (`_causal_step`),
    built once per length instead of a (q, T) mask in each of the step's layers: the check took
    2.4-3.0 ms of a 128K question step with it, 4.1-5.1 ms without (ad hoc, 2026-12-05)."""
    return torch.ones(q, q, dtype=torch.bool, device=device).tril()


def _key_splits(key: torch.Tensor) -> int:
    """Into how many key ranges a one-token step's attention is split: CPU only (CUDA kernels split
    by themselves), at least SPLIT_KEYS keys per range, at most 4 ranges per thread."""
    if key.device.type != "cpu" or compat.cpu_flash_attention is None:
        return 1
    return min(key.shape[2] // SPLIT_KEYS, 4 * torch.get_num_threads())


def _split_key_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, splits: int,
                         scale: float | None) -> torch.Tensor:
    """Split-key ("flash-decoding") attention of the packed query rows; returns (B·H_kv, G, Dv).

    torch's CPU flash attention shares out batch × heads × query blocks among threads: for one
    token of a GQA model that is B·H_kv items (3 for SmolLM2), so one of two threads streams two
    thirds of the KV while the other idles. Here the first `splits`·m keys become `splits` ranges
    of m keys, each range one more "head" (a view: the preallocated cache's gaps between heads
    stay where they are), and the last T mod splits keys one more call; each range's output is
    weighted by the softmax of the ranges' log-sum-exps, which is exact up to rounding. Measured
    in docs/decode.md. query (B, H_kv, G, D); key, value (B, H_kv, T, D).
    """
    n, m = key.shape[2], key.shape[2] // splits
    rows = query.flatten(0, 1).unsqueeze(1)  # (B·H_kv, 1, G, D)

    def attend(lo: int, hi: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:  # (output, log-sum-exp)
        k, v = (t[:, :, lo:hi].flatten(0, 1).unflatten(1, (parts, (hi - lo) // parts)) for t in (key, value))
        return compat.cpu_flash_attention(rows.expand(-1, parts, -1, -1), k, v, scale=scale)[:2]

    parts = [attend(0, m * splits, splits)] + ([attend(m * splits, n, 1)] if n > m * splits else [])
    out = torch.cat([o for o, _ in parts], dim=1)  # (B·H_kv, ranges, G, Dv)
    weights = torch.softmax(torch.cat([lse for _, lse in parts], dim=1), dim=1).unsqueeze(-1)
    return (out.float() * weights).sum(dim=1).to(query.dtype)


def _causal_or_sdpa(kernel: str, module, query, key, value, attention_mask, **kwargs):
    """`causal_kernel`'s attention: `kernel`'s where sdpa would take its causal kernel (no mask, as
    many queries as keys) and, for "amx", where attention_kernel.takes the tensors; else
    transformers' sdpa function."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if (query.shape[2] == key.shape[2] > 1 and attention_mask is None and causal and not kwargs.get("dropout")
            and _plain_softmax(kwargs)):
        if kernel == "matmul":
            return _causal_matmul(query, key, value, kwargs.get("scaling")), None
        if attention_kernel.takes(query, key, value):
            out, _ = attention_kernel.attend(query, key, value, kwargs.get("scaling"), causal=True)
            return out.transpose(1, 2), None
    return _through(None, "sdpa", module, query, key, value, attention_mask, **kwargs)


def _causal_matmul(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal softmax attention in blocks of query positions: per block, one matmul of its query
    rows with the keys up to its last position, a softmax, one matmul with those values. Keys
    before the queries' own (T > t: a question step after cached tokens) are seen by every row. That is
    the arithmetic of transformers' eager attention (scores in the model's dtype, the softmax
    accumulated in fp32), without the (T, T) score matrix or any key past a block. The G query
    heads of a KV head are packed as G·n rows (no `repeat_kv`), n = CAUSAL_ROWS // G positions
    per block, so that a block's scores stay in the core's cache. query (B, H, t, D), key and
    value (B, H_kv, T, D), T >= t; returns (B, t, H, Dv) like the transformers functions. Measured
    against torch's fused kernel in docs/hardware.md."""
    b, h, t, d = query.shape
    h_kv, g, cached = key.shape[1], h // key.shape[1], key.shape[2] - t
    n_max = max(1, CAUSAL_ROWS // g)
    rows = (query * (scale if scale is not None else d**-0.5)).view(b, h_kv, g, t, d)
    out = query.new_empty(b, t, h_kv, g, value.shape[-1])
    future = torch.ones(n_max, n_max, dtype=torch.bool, device=query.device).triu(1)
    full_block = future.repeat(g, 1)  # (G·n, n): position i of each head's rows sees keys ≤ i
    for lo in range(0, t, n_max):
        hi = min(t, lo + n_max)
        n = hi - lo
        seen = cached + hi
        scores = torch.matmul(rows[:, :, :, lo:hi].reshape(b, h_kv, g * n, d), key[:, :, :seen].transpose(-1, -2))
        scores[..., cached + lo:].masked_fill_(full_block if n == n_max else future[:n, :n].repeat(g, 1),
                                              float("-inf"))
        mixed = torch.matmul(torch.softmax(scores, dim=-1), value[:, :, :seen])  # (B, H_kv, G·n, Dv)
        out[:, lo:hi] = mixed.view(b, h_kv, g, n, -1).permute(0, 3, 1, 2, 4)
    return out.view(b, t, h, -1)


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    """The registered "parallelcomp" attention: whatever the active scope set for this layer."""
    attend = _attends.get(id(module)) or partial(_through, None, "sdpa")
    return attend(module, query, key, value, attention_mask, **kwargs)


def _through(handler: Handler | None, previous: str, module, query, key, value, attention_mask, *,
             kernel: bool = False, causal: str = "", **kwargs):
    """Route 2: the optional handler, then the previous backend (`kernel`: see packed_one_query;
    `amx`: see `_causal_step`)."""
    if handler is not None:
        key, value, attention_mask = handler(module, query, key, value, attention_mask)
    if previous == "sdpa":
        if query.shape[2] == 1 and attention_mask is None and not _SDPA_SPECIAL.intersection(kwargs):
            return packed_one_query(module, query, key, value, kernel=kernel, **kwargs)
        if causal and _causal_step(query, key, value, attention_mask, kwargs, causal):
            if causal == "matmul":
                return _causal_matmul(query, key, value, kwargs.get("scaling")), None
            out, _ = attention_kernel.attend(query, key, value, kwargs.get("scaling"), causal=True)
            return out.transpose(1, 2), None
        if _packs_queries(query, key, attention_mask, kwargs):
            return packed_queries(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if previous == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, **kwargs)
    # flash attention: the merged cache has no padding, and its causal mask is bottom-right aligned
    return ALL_ATTENTION_FUNCTIONS[previous](module, query, key, value, None, **kwargs)


def _attend_chunks(prefix: list[LayerKV], contexts: list[list[list[LayerKV]]], observe: Observer | None,
                   kernel: str, masks: dict[tuple[int, int | None, int], Masks],
                   kept: dict[int, LayerKV] | None, keep: int,
                   module, query, key, value, attention_mask, scaling: float | None = None, **kwargs):
    """Phase 2's attention: softmax(q·Kᵀ·scale)·V of row i's question over [prefix ‖ its context
    segments ‖ question] (`chunk_attention`),
    the G query heads of a KV head packed as G·q query rows (no `repeat_kv`).

    With no observer this is one SDPA call per row over the concatenated keys and values (torch's
    fused kernel: no (G·q, T) score matrix in memory), or on the "matmul" kernel one matmul for the
    scores, a softmax and one for the values (eager's arithmetic, as `_causal_matmul`; faster where
    the fused kernel does not use native bf16, docs/hardware.md), or on the "amx" kernel
    `_attend_on_tiles` (only the short rest concatenated); compression needs the probabilities, so with an
    observer the scores are formed segment by segment (only they are concatenated) with an fp32
    softmax. query (B, H, q, D) and the question's own key/value (B, H_kv, q, D), post-RoPE;
    attention_mask (1, 1, q, q) bool, causal, the same in every layer of the forward, so `masks`
    keeps each row's key mask, its negation and the additive mask that SDPA would otherwise build
    from the bool one at every call (0 or -inf in the query's dtype: the same numbers) by (context
    length, sliding window, G) for the forward's later layers. The matmul kernel scales the layer's
    queries once, not row by row (docs/store.md, "What a reused question costs").
    Returns ((B, q, H, D), None) like the transformers functions.
    """
    if not _plain_softmax(kwargs):
        raise ModelNotSupportedError(f"{type(module).__name__}: phase 2 supports softmax attention without "
                                     "soft-capping, position bias or attention sinks")
    layer = module.layer_idx
    b, h, q, d = query.shape
    h_kv, g = key.shape[1], h // key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    prefix_k, prefix_v = prefix[layer]
    if kept is not None:  # views: the caller copies each row's part once
        kept[layer] = key[:, :, :keep], value[:, :, :keep]
    if observe is None and kernel in attention_kernel.KERNELS and not kwargs.get("sliding_window"):
        tiled = _attend_on_tiles(prefix[layer], [[segment[layer] for segment in row] for row in contexts],
                                 query, key, value, scale)
        if tiled is not None:
            return tiled, None
    out = query.new_empty(b, q, h, value.shape[-1])
    scaled = query * scale if observe is None and kernel == "matmul" else None
    for i in range(b):
        segments = [plain(segment[layer]) for segment in contexts[i]]  # a Tiled chunk untiled: a copy
        keys = (prefix_k[0], *(k[0] for k, _ in segments), key[i])  # each (H_kv, n, D)
        values = (prefix_v[0], *(v[0] for _, v in segments), value[i])
        rows = (query if scaled is None else scaled)[i].reshape(h_kv, g * q, d)  # head h ↔ KV head h // G
        shape = (sum(k.shape[-2] for k in keys[:-1]), kwargs.get("sliding_window"), g)
        visible, hidden, additive = _masks(masks, attention_mask, shape, query.dtype)
        if scaled is not None:
            scores = torch.matmul(rows, torch.cat(keys, dim=-2).transpose(-1, -2))
            start = shape[0] if shape[1] is None else 0  # no sliding window: every context key is visible
            scores[..., start:].masked_fill_(hidden[:, start:], float("-inf"))
            mixed = torch.matmul(torch.softmax(scores, dim=-1), torch.cat(values, dim=-2))
        elif observe is None:
            mixed = torch.nn.functional.scaled_dot_product_attention(
                rows[None], torch.cat(keys, dim=-2)[None], torch.cat(values, dim=-2)[None],
                attn_mask=additive, scale=scale)[0]
        else:
            mixed = _observed(rows, keys, values, visible, scale, lambda p: observe(i, layer, p.view(h_kv, g, q, -1)))
        out[i] = mixed.reshape(h, q, -1).transpose(0, 1)  # reshape: CUDA's SDPA returns a strided result
    return out, None


def _attend_on_tiles(prefix: LayerKV, contexts: list[list[LayerKV]], query, key, value,
                     scale: float) -> torch.Tensor | None:
    """Phase 2's attention on the "amx" kernel, for one layer without a sliding window; None where
    the kernel does not take the tensors. All rows in one call (attention_kernel.attend_rows): each
    row's chunk (its first segment) is read where it is stored, unmasked (the question sees every
    chunk key), then the short rest (the prefix, any later segments such as the question head, and
    the question's own keys, the same length in every row, concatenated) as the row's tail under
    the question's causal mask, in the same softmax. query (B, H, q, D), key and value
    (B, H_kv, q, D); returns (B, q, H, Dv). The chunks are all `Tiled` (read as they are) or all not."""
    b, h, q, d = query.shape
    h_kv, g = key.shape[1], h // key.shape[1]
    rows = query.reshape(b, h_kv, g * q, d)  # head h ↔ KV head h // G; row m is question token m mod q
    tiles = all(isinstance(row[0], Tiled) for row in contexts)
    if not tiles and any(isinstance(row[0], Tiled) for row in contexts):
        return None
    chunks = [(row[0][0], row[0][1]) for row in contexts]
    short = [tuple(torch.cat(parts, dim=0) for parts in zip(*(row[j] for row in contexts))) for j in
             range(1, len(contexts[0]))]  # the later segments, (B, H_kv, n, D) each
    keys = torch.cat([prefix[0].expand(b, -1, -1, -1), *(k for k, _ in short), key], dim=-2)
    values = torch.cat([prefix[1].expand(b, -1, -1, -1), *(v for _, v in short), value], dim=-2)
    if not (attention_kernel.takes_rows(rows, chunks) and attention_kernel.takes(rows, keys, values)):
        return None
    tokens = [row[0].tokens for row in contexts] if tiles else None
    out = attention_kernel.attend_rows(rows, chunks, scale, tails=(keys, values), period=q, tokens=tokens)[0]
    # stored (B, G·q, H_kv, Dv): one copy into transformers' contiguous (B, q, H, Dv), head h = h_kv·G + g
    return out.transpose(1, 2).unflatten(1, (g, q)).permute(0, 2, 3, 1, 4).reshape(b, q, h, -1)


def _masks(masks: dict[tuple[int, int | None, int], Masks], attention_mask: torch.Tensor,
           shape: tuple[int, int | None, int], dtype: torch.dtype) -> Masks:
    """`masks[shape]` (a row's visible keys, hidden keys, additive mask for context length, sliding
    window, G), built on the forward's first layer."""
    if shape not in masks:
        visible = _visible(attention_mask, *shape)
        hidden = ~visible
        additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        additive.masked_fill_(hidden, float("-inf"))
        masks[shape] = visible, hidden, additive
    return masks[shape]


def _visible(attention_mask: torch.Tensor, n_context: int, window: int | None, g: int) -> torch.Tensor:
    """(G·q, n_context + q) bool: the keys each packed query row may attend to. Every context key,
    bar those out of a sliding window — key t is out of reach of question token j when
    (n_context + j) - t >= window — and the question's own keys under its causal mask."""
    q = attention_mask.shape[-1]
    visible = torch.ones(q, n_context + q, dtype=torch.bool, device=attention_mask.device)
    visible[:, n_context:] = attention_mask.reshape(q, q)
    if window:
        t = torch.arange(n_context, device=visible.device)
        j = torch.arange(q, device=visible.device)
        visible[:, :n_context] &= (n_context + j[:, None] - t[None]) < window
    return visible.repeat(g, 1)


def _observed(rows, keys, values, visible, scale: float, observe: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Attention of the packed rows (H_kv, G·q, D) over the key/value segments, handing the fp32
    probabilities (H_kv, G·q, T) to `observe` before they mix the values."""
    scores = torch.cat([torch.matmul(rows, k.transpose(-1, -2)) for k in keys], dim=-1).float() * scale
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    observe(probs)
    probs = probs.to(values[0].dtype)
    mixed, at = None, 0
    for v in values:
        part = torch.matmul(probs[..., at : at + v.shape[-2]], v)
        mixed = part if mixed is None else mixed.add_(part)
        at += v.shape[-2]
    return mixed
