"""Plain Hugging Face forward/decode loops shared by the baselines (also run inside the kvpress
virtual environment, so this module imports only torch and the standard library)."""

from __future__ import annotations

import contextlib
import inspect
import resource
import time

import torch


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux `clear_refs`), e.g. once the model is loaded."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), else since the process started."""
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    """Current resident set size (VmRSS)."""
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def kv_bytes(model, kv_tokens: int) -> int:
    """Bytes of a KV cache of `kv_tokens` tokens per layer and KV head (keys and values)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * kv_tokens * size


def _cache_kwarg(model) -> str:
    """The forward's cache keyword: `cache` since transformers 5.24, `past_key_values` before (the
    kvpress environment may run an older transformers); parallelcomp.compat, which this module may
    not import, detects it the same way, from the signature."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                    prefill_context=None) -> dict:
    """Greedy decoding with explicit positions, so a compressed cache (kvpress) stays correct.

    `prefill_context` (e.g. a kvpress press) is entered around the prompt forward only.
    """
    ids = torch.tensor([input_ids], device=model.device)
    start = time.perf_counter()
    with prefill_context or contextlib.nullcontext():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache = out["cache"] if "cache" in out else out.past_key_values
    kv_tokens = cache.get_seq_length()
    position = len(input_ids)
    tokens: list[int] = []
    start = time.perf_counter()
    token = out.logits[0, -1].argmax()
    while int(token) not in eos_ids and len(tokens) < max_new_tokens:
        tokens.append(int(token))
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=token.view(1, 1), use_cache=True, position_ids=torch.tensor([[position]], device=model.device),
                    **{_cache_kwarg(model): cache})
        position += 1
        token = out.logits[0, -1].argmax()
    return {"token_ids": tokens, "prefill_seconds": prefill,
            "decode_seconds": time.perf_counter() - start, "new_tokens": len(tokens),
            "kv_tokens": kv_tokens, "kv_bytes": kv_bytes(model, kv_tokens)}


@torch.inference_mode()
def target_nll(model, context_ids: list[int], target_ids: list[int]) -> dict:
    """Teacher-forced mean NLL of `target_ids[1:]` after `context_ids + target_ids[:1]`, in one
    forward pass (the first target token only conditions, as in `ParallelComp.score`)."""
    ids = torch.tensor([context_ids + target_ids], device=model.device)
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(target_ids)).logits
    nll = torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), torch.tensor(target_ids[1:], device=model.device)
    )
    return {"nll": float(nll), "n_target": len(target_ids) - 1,
            "prefill_seconds": time.perf_counter() - start,
            "kv_tokens": len(context_ids), "kv_bytes": kv_bytes(model, len(context_ids))}
