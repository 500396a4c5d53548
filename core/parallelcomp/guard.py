"""What protects a run before and while it works (docs/hardening.md):

* `check_weight_files`: a model directory holds a config and every `*.safetensors` file is complete;
* `check_run`: one call after chunking, before any model work: the question and the answer fit
  the model's window, and the estimated peak memory of the run fits the memory budget;
* `run_lock(model)`: one lock per model, shared by every engine on it (hooks and the attention
  switch are per model), which refuses a same-thread re-entry instead of deadlocking (unless
  another thread advances the open stream), and hands the heap's free pages back to the OS as a
  run ends;
* `cancel_scope` / `cancelled`: a caller's thread can ask the run it drives to stop at its next
  token (the async wrappers' worker thread sets it when the awaiting task is cancelled).

The character limit (`max_input_chars`) stays where it is, the cheap first check before tokenizing;
the text rule (no lone surrogates) is `chunking.check_text`.
"""

from __future__ import annotations

import gc
import json
import struct
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import torch

from . import attention, hardware
from .errors import InputError, ModelLoadError, ResourceError
from .nll import SLICE, plain_head
from .prefill import micro_batches, question_rows

# ---------------------------------------------------------------------- model files


def check_weight_files(directory: str) -> None:
    """ModelLoadError for a directory without a model config, or naming the first
    `*.safetensors` file whose header or length is wrong."""
    if not (Path(directory) / "config.json").is_file():
        raise ModelLoadError(f"{directory} holds no config.json, so it is not a Hugging Face model directory; pass "
                             "the directory with config.json, the tokenizer files and *.safetensors")
    for path in sorted(Path(directory).glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise ModelLoadError(f"{path}: {problem}; re-download or re-save the model")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated safetensors file ({size} bytes, no header)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"truncated safetensors file (header of {header_len:,} bytes, file of {size:,})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError):
            return "corrupt safetensors header (not JSON)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated safetensors file ({size:,} bytes; its header describes {expected:,})"
    if size > expected:
        return f"safetensors file longer than its header describes ({size:,} bytes, not {expected:,})"
    return None


# ---------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ModelShape:
    """The sizes that the memory estimate needs, read from a transformers model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    eager: bool
    """Eager attention materialises (rows, heads, T, T) scores; sdpa/flash do not."""
    sliced_head: bool = False
    """Phase 2 runs the LM head in vocabulary slices (nll.plain_head), so its logits are nll.SLICE wide."""

    @classmethod
    def of(cls, model) -> ModelShape:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        return cls(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size,
            dtype_bytes=model.dtype.itemsize,
            eager=attention.backend(model) == "eager",
            sliced_head=plain_head(model) is not None,
        )

    @property
    def kv_token_bytes(self) -> int:
        """KV bytes of one token over all layers and KV heads."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def activation_bytes(self, rows: int, length: int) -> int:
        """Live intermediates of one decoder layer for `rows` × `length` tokens (one layer at a
        time under inference_mode): residual, norm, q/k/v, attention output, o_proj and the MLP's
        gate, up and product; plus the (rows, heads, T, T) scores under eager attention."""
        per_token = 4 * self.hidden + 2 * (self.heads + self.kv_heads) * self.head_dim + 3 * self.intermediate
        scores = rows * self.heads * length * length * (self.dtype_bytes + 4) if self.eager else 0
        return rows * length * per_token * self.dtype_bytes + scores

    def logits_bytes(self, positions: int, sliced: bool = False) -> int:
        """Logits of `positions` rows in the model dtype, their fp32 copy and log-softmax; `sliced`:
        one vocabulary slice of them (nll.token_nll)."""
        return positions * (min(SLICE, self.vocab) if sliced else self.vocab) * (self.dtype_bytes + 8)


@dataclass(frozen=True)
class Estimate:
    kept_kv: int
    """The kept chunks' KV (compressed size) and the prefix, alive from prefill to the end."""
    batch: int
    """The larger of phase 1's largest micro-batch (batch cache, sliced copies, activations) and a
    phase-2 forward (chunk KV waiting outside the store, activations, logits)."""
    decode: int
    """Merged cache copy + question and answer tokens' KV + the question step."""
    stored: int = 0
    """Chunk KV the store's memory tier may keep from this call (at most its free room)."""

    @property
    def peak(self) -> int:
        """Prefill and decode do not overlap; the kept and stored KV span both. Compared with the
        measured peak RSS growth by `python -m benchmarks memory` (docs/hardening.md)."""
        return self.kept_kv + self.stored + max(self.batch, self.decode)


def estimate(shape: ModelShape, config, prefix: int, chunks: list, question: int, new_tokens: int,
             store_room: int = 0) -> Estimate:
    """Bytes a run adds on top of the loaded model, per phase (docs/hardening.md derives each term).
    `store_room`: bytes the chunk store's memory tier may still fill."""
    kv = shape.kv_token_bytes
    kept_lengths = sorted((min(len(c.token_ids), config.kv_budget_for(len(c.token_ids))) for c in chunks),
                          reverse=True)
    kept = (prefix + sum(kept_lengths[: config.keep_chunks])) * kv
    batch = copies = 0
    for rows in micro_batches(chunks, config.prefill_batch_tokens):
        length = prefix + max(len(c.token_ids) for c in rows)
        # phase 1, one chunk per forward: the micro-batch's copies, and the forward's cache and activations
        copies = max(copies, length * len(rows) * kv)
        batch = max(batch, length * (len(rows) + 1) * kv + shape.activation_bytes(1, length)
                    + shape.logits_bytes(1))
    # phase 2 reads chunk KV in place; outside the memory tier, at most two micro-batches of it
    # wait for their question forward (engine.score_chunks), which runs `question_rows` chunks
    q_rows = min(len(chunks), question_rows(config.prefill_batch_tokens, question, shape.sliced_head))
    phase2 = (2 * copies + shape.activation_bytes(q_rows, question)
              + shape.logits_bytes(q_rows * question, shape.sliced_head))
    batch = max(batch, phase2)
    growth = (question + new_tokens) * kv
    decode = kept + growth + shape.activation_bytes(1, question) + shape.logits_bytes(question)
    stored = min(sum(len(c.token_ids) for c in chunks) * kv, store_room)
    return Estimate(kept, batch, decode, stored)


def available_bytes(device: torch.device) -> int:
    """Free memory where the run allocates: the CUDA device's, else the machine's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def total_bytes(device: torch.device) -> int:
    """All memory where the run's KV lives: the CUDA device's, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def fits_window(window: int, prefix: int, question: int, new_tokens: int) -> bool:
    """Whether a prompt (prefix + question; the prefix may include the chunks before the question)
    and its answer fit the window as they are."""
    return prefix + question + new_tokens <= window


def check_run(model, config, window: int, prefix: int, chunks: list, question: int, new_tokens: int,
              store_room: int = 0) -> None:
    """Refuse a run that cannot fit, before any model work.

    Rules: the prefix, the question and at least one new token fit the window; `question +
    new_tokens <= window` (the decode cache stays bounded by the window); and the estimated peak ≤
    `config.memory_budget_bytes` (None: the free memory now).
    """
    if not fits_window(window, prefix, question, min(new_tokens, 1)):
        msg = (
            f"the question ({question} tokens with its template) and the prompt prefix ({prefix}) leave no "
            f"room in the model's {window}-token window; shorten the question"
        )
        raise InputError(msg)
    if question + new_tokens > window:
        msg = (
            f"max_new_tokens={new_tokens:,} is too large: the question ({question} tokens with its template) "
            f"and the answer must fit the model's {window}-token window, so max_new_tokens can be at most "
            f"{max(window - question, 0)}"
        )
        raise InputError(msg)
    est = estimate(ModelShape.of(model), config, prefix, chunks, question, new_tokens, store_room)
    budget = config.memory_budget_bytes
    budget = budget if budget is not None else available_bytes(model.device)
    if est.peak > budget:
        raise ResourceError(_too_big(est, budget, config.memory_budget_bytes is None))


def _too_big(est: Estimate, budget: int, derived: bool) -> str:
    parts = {
        "kept KV (lower keep_chunks or chunk_tokens, or set kv_budget_ratio)": est.kept_kv,
        "one prefill micro-batch (lower prefill_batch_tokens or chunk_tokens)": est.batch,
        "the question step and decode cache (lower max_new_tokens or shorten the question)": est.decode - est.kept_kv,
        "chunk KV kept for reuse (lower kv_store_bytes)": est.stored,
    }
    largest = max(parts, key=parts.get)
    source = "the free memory now" if derived else "memory_budget_bytes"
    terms = ", ".join(f"{name.split(' (')[0]} {_size(v)}" for name, v in parts.items())
    return (
        f"this run needs about {_size(est.peak)} ({terms}), above {source} "
        f"({_size(budget)}); the largest part is {largest}; or raise memory_budget_bytes in ParallelCompConfig"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------- one run at a time per model


HANDOFF_S = 5.0
"""How long a thread that holds an open stream waits for another thread to advance that stream
before its new call is refused as a self-deadlock (RunLock)."""
COLLECT_S = 2.0
"""A call waiting for the model runs the garbage collector when the run holding it has not
advanced for this long, and no call of the lock ran it in this time (RunLock)."""


class RunLock:
    """A plain lock (releasable from another thread, e.g. by a stream's finalizer) that raises
    instead of blocking forever when the thread holding it asks again.

    The holder is the thread that last advanced the run's stream (`advanced`), as a thread object,
    not its ident: the OS reuses a finished thread's ident. A call from the holder waits up to
    `HANDOFF_S` for the stream to move on to another thread: a server that iterates a sync stream
    in a thread pool (Starlette's `iterate_in_threadpool`, used by FastAPI's StreamingResponse) runs
    each step in whichever pool thread is free, so a new request can start in the thread that ran
    the open stream's last step while the next step runs in another. A stream that does not move on
    is the caller's own, left unfinished in this thread: that call is refused.

    A stream dropped inside a reference cycle holds the lock until the garbage collector
    finalizes it, and in an idle server the collector may not run for minutes. Starlette's
    StreamingResponse drops its stream that way when the client disconnects (a CancelledError's
    traceback holds the frame that holds the stream). So a waiting call runs the collector once
    the run has not advanced for `COLLECT_S`, at most once per `COLLECT_S` for all the lock's
    waiters: a full collection takes about 0.2 s with LangChain and LlamaIndex loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._moved = threading.Condition()  # notified when the holder changes
        self._owner: threading.Thread | None = None
        self._advanced_at = self._collected_at = 0.0  # time.monotonic()
        self._release = True  # give the freed heap back at the end of the run (keep_heap: not)

    def __enter__(self) -> RunLock:
        me = threading.current_thread()
        self._collect_dropped()
        if self._owner is me and not self._handed_on(me):
            msg = (
                "a stream on this model is still open in this thread and no other thread advanced it "
                f"within {HANDOFF_S:g} s; iterate it to the end or call its close() before starting "
                "another call on the same model"
            )
            raise InputError(msg)
        while not self._lock.acquire(timeout=COLLECT_S):
            self._collect_dropped()
        self._hold(me)
        self._release = True
        return self

    def _handed_on(self, me: threading.Thread) -> bool:
        deadline = time.monotonic() + HANDOFF_S
        while True:
            with self._moved:
                left = deadline - time.monotonic()
                if self._moved.wait_for(lambda: self._owner is not me, timeout=max(min(left, COLLECT_S), 0)):
                    return True
            if time.monotonic() >= deadline:
                return False
            self._collect_dropped()

    def _collect_dropped(self) -> None:
        """Run the garbage collector if the run holding the lock may be a dropped stream."""
        now = time.monotonic()
        if self._lock.locked() and min(now - self._advanced_at, now - self._collected_at) >= COLLECT_S:
            self._collected_at = now
            gc.collect()  # finalizing the stream closes its run, which releases the lock

    def _hold(self, owner: threading.Thread | None) -> None:
        with self._moved:
            self._owner = owner
            self._advanced_at = time.monotonic()
            self._moved.notify_all()

    def advanced(self) -> None:
        """The run's stream resumed in the current thread, which now holds the run."""
        me = threading.current_thread()
        self._advanced_at = time.monotonic()
        if self._owner is not me:
            self._hold(me)

    def keep_heap(self) -> None:
        """Skip the release at the end of this run: a question that left the chunk store's memory
        tier as it found it freed only its own transients, which the next question allocates again;
        kept, they are not faulted in afresh (docs/store.md, "Memory between runs")."""
        self._release = False

    def __exit__(self, *exc) -> None:
        try:
            if self._release:
                hardware.release_free_heap()  # the run's freed tensors and evicted chunks, back to the OS
        finally:
            self._hold(None)
            self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def run_lock(model) -> RunLock:
    """The one RunLock of `model`, shared by every engine built on it."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = RunLock()
        return lock


# ---------------------------------------------------------------------- cancellation

_scope = threading.local()


@contextmanager
def cancel_scope(event: threading.Event) -> Iterator[None]:
    """Runs driven from this thread inside the block stop at their next token once `event` is set."""
    previous = getattr(_scope, "event", None)
    _scope.event = event
    try:
        yield
    finally:
        _scope.event = previous


def cancelled() -> bool:
    event = getattr(_scope, "event", None)
    return event is not None and event.is_set()
