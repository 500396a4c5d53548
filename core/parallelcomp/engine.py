"""`ParallelComp`: the runtime. Orchestration only; each stage lives in its own module and the
flow reads like method.md §0:

    chunk the documents                    chunking.py
    encode the shared prefix once          prefill.encode_prefix
    per micro-batch of chunks:
        phase 1: chunk KV (PCW positions)  prefill.encode_chunks
        phase 2: question NLL per chunk    prefill.question_nll      (+ KV scores, compression.py)
        keep the K lowest-NLL chunks       eviction.TopK
    merge kept KV in document order        kv.concat
    question at p0, then decode            decode.generate_tokens    (+ calibration.py)
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import calibration, compression
from . import kv as kvops
from .chunking import make_chunks, validate_documents
from .compat import forward
from .config import ParallelCompConfig
from .decode import Sampling, TextAssembler, generate_tokens
from .errors import ConfigError, InputError, ModelLoadError, ModelNotSupportedError
from .eviction import TopK
from .output import ChunkReport, GenerationOutput, RunStats, ScoreOutput
from .prefill import EncodedChunk, encode_chunks, encode_prefix, micro_batches, question_nll
from .prompts import PromptParts, build_continuation, build_prompt, end_of_turn_ids

MIN_CHUNK_TOKENS = 16


@dataclass
class _Context:
    """The merged KV of the kept chunks, ready for the question."""

    kv: list[kvops.LayerKV]
    p0: int
    reports: list[ChunkReport]
    stats: RunStats


class TextStream:
    """Iterate for text deltas; afterwards `.output` holds the full `GenerationOutput`."""

    def __init__(self, deltas: Iterator[str]):
        self._deltas = deltas
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def close(self) -> None:
        self._deltas.close()


class ParallelComp:
    """A causal LM answering over inputs far longer than its trained window, without training."""

    def __init__(self, model, tokenizer, config: ParallelCompConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or ParallelCompConfig()
        text_config = model.config.get_text_config()
        self.window = getattr(text_config, "max_position_embeddings", None)
        if not self.window:
            raise ModelNotSupportedError(f"{type(model).__name__} has no max_position_embeddings (no RoPE window)")
        if self.config.chunk_tokens is not None and self.config.chunk_tokens > self.window:
            msg = f"chunk_tokens={self.config.chunk_tokens} exceeds the model's trained window of {self.window} tokens"
            raise ConfigError(msg)
        self.num_layers = text_config.num_hidden_layers
        calibration.layer_plan(self.config.calibration_rules, self.num_layers)  # rules must fit the depth
        self.eos_ids = _eos_ids(model, tokenizer)
        self._lock = threading.Lock()  # one run at a time per engine; concurrent callers queue

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        config: ParallelCompConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> ParallelComp:
        """Load a local HF directory (or a hub id when online); None → the embedded SmolLM2-135M."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or ParallelCompConfig()
        path = _resolve_model(model)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            hf_model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=config.attn_implementation or _default_attention(device),
                use_safetensors=True,
                trust_remote_code=False,
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load model {path!s}: {err}") from err
        return cls(hf_model.to(device), tokenizer, config)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "name_or_path", "") or type(self.model).__name__)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ public calls

    def generate(self, question: str, documents=None, context=None, **kwargs) -> GenerationOutput:
        """Answer `question` over `documents` (one string each) or one long `context` string.

        Keyword arguments: max_new_tokens=256, stop=None (str or list of str), temperature=0.0
        (greedy), top_p=1.0, top_k=0, seed=None, repetition_penalty=1.0, progress=False (a tqdm
        bar on stderr).
        """
        stream = self.stream(question, documents, context, **kwargs)
        for _ in stream:
            pass
        return stream.output

    def stream(
        self,
        question: str,
        documents=None,
        context=None,
        *,
        max_new_tokens: int = 256,
        stop: str | list[str] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        progress: bool = False,
    ) -> TextStream:
        """Like `generate`, but yields text deltas as they are decoded.

        With neither `documents` nor `context`, the question is answered from the model alone
        (a plain chat turn; `out.chunks` is empty). An empty `documents` list is an error.
        """
        _check_question(question)
        documents = validate_documents(documents, context, required=False)
        stops = _check_stop(stop)
        _check_generation(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        sampling = Sampling(temperature, top_p, top_k, seed, repetition_penalty)
        parts = build_prompt(
            self.tokenizer, self.config.instruction, question, self.config.use_chat_template, bool(documents),
            self.config.restate_instruction,
        )
        stream = TextStream(iter(()))
        stream._deltas = self._answer(stream, parts, documents, max_new_tokens, stops, sampling, progress)
        return stream

    def score(self, target: str, documents=None, context=None, *, progress: bool = False) -> ScoreOutput:
        """Teacher-forced NLL of `target` continuing the kept chunks (plain text, no template).

        Chunks are ranked by the NLL of `target` itself (the paper's perplexity setting, §6.3).
        The first target token only conditions; the NLL averages over the remaining tokens.
        Attention calibration is not applied here: it picks evictions with the last target token,
        which would leak later tokens into the NLL of earlier ones. Compression is applied.
        """
        _check_question(target, what="target")
        documents = validate_documents(documents, context)
        parts = build_continuation(self.tokenizer, target)
        if len(parts.question_ids) < 2:
            raise InputError("target must be at least two tokens long to be scored")
        with self._lock:
            ctx = self._prefill(parts, documents, reserve=0, progress=progress)
            cache = kvops.to_cache(ctx.kv)
            ids = torch.tensor([parts.question_ids], device=self.model.device)
            positions = ctx.p0 + torch.arange(ids.shape[1], device=self.model.device)[None]
            with torch.inference_mode():
                logits = forward(self.model, ids, cache, positions, logits_to_keep=ids.shape[1])
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            nlls = -logprobs.gather(-1, ids[0, 1:, None])[:, 0]
        return ScoreOutput(float(nlls.mean()), len(nlls), nlls.tolist(), ctx.reports, ctx.stats)

    # ------------------------------------------------------------------ stages

    def _answer(self, stream, parts, documents, max_new_tokens, stops, sampling, progress) -> Iterator[str]:
        with self._lock, ExitStack() as scope:
            calibrator = calibration.Calibrator.for_run(self.config, self.num_layers, len(parts.question_ids))
            ctx = self._prefill(parts, documents, reserve=max_new_tokens, progress=progress)
            start = time.perf_counter()
            assembler = TextAssembler(self.tokenizer, stops)
            cache = kvops.to_cache(ctx.kv)
            step = (calibrator.enter(scope, self.model, cache, ctx.reports, ctx.stats.prefix_tokens)
                    if calibrator else None)  # attention calibration at the question step (§4)
            tokens = generate_tokens(
                self.model, cache, parts.question_ids, ctx.p0, max_new_tokens, self.eos_ids, sampling, step
            )
            for token_id in tokens:
                if not assembler.ids:
                    ctx.stats.first_token_seconds = time.perf_counter() - start
                delta = assembler.add(token_id)
                if delta:
                    yield delta
                if assembler.stopped:
                    break
            tail = assembler.finish()
            if tail:
                yield tail
            if calibrator:
                calibrator.report(ctx.stats)
            ctx.stats.new_tokens = len(assembler.ids)
            ctx.stats.finish_reason = "length" if len(assembler.ids) == max_new_tokens and not assembler.stopped else "stop"
            ctx.stats.decode_seconds = time.perf_counter() - start
            stream.output = GenerationOutput(assembler.text, ctx.reports, ctx.stats, list(assembler.ids))

    def _prefill(self, parts: PromptParts, documents: list[str], reserve: int, progress: bool) -> _Context:
        """Chunk, prefill, score and evict; return the merged KV of the kept chunks."""
        start = time.perf_counter()
        budget = self._chunk_budget(parts, reserve, documents)
        if self.config.compresses:
            compression.observation_rows(self.config, len(parts.question_ids), parts.question_span)
        chunks = make_chunks(self.tokenizer, documents, budget, self.config.document_separator) if documents else []
        prefix = encode_prefix(self.model, parts.prefix_ids)
        top = TopK[EncodedChunk](self.config.keep_chunks)
        scores: dict[int, float] = {}
        raw_bytes: dict[int, int] = {}  # chunk index → KV bytes before compression
        bar = tqdm(total=len(chunks), desc="prefill", unit="chunk", disable=not progress, file=sys.stderr)
        for batch in micro_batches(chunks, self.config.prefill_batch_tokens):
            encoded = encode_chunks(self.model, parts.prefix_ids, batch)
            comp = compression.BatchCompressor.for_batch(
                self.model, self.config, kvops.n_tokens(prefix), encoded, len(parts.question_ids), parts.question_span
            )
            nll = question_nll(self.model, prefix, encoded, parts.question_ids, comp.observe() if comp else None)
            raw_bytes.update({e.chunk.index: kvops.n_bytes(e.kv) for e in encoded})
            encoded = comp.apply(encoded) if comp else encoded
            for enc, chunk_nll in zip(encoded, nll[:, parts.scored(self.config.score_tokens)].mean(dim=1).tolist()):
                scores[enc.chunk.index] = chunk_nll
                top.offer(chunk_nll, enc.chunk.index, enc)
            bar.update(len(batch))
        bar.close()
        kept = top.kept()
        merged = kvops.concat([prefix] + [e.kv for e in kept])
        p0 = len(parts.prefix_ids) + max((e.length for e in kept), default=0)
        kv_tokens = {e.chunk.index: kvops.n_tokens(e.kv) for e in kept}
        reports = [
            ChunkReport(c.index, c.spans, len(c.token_ids), scores[c.index], c.index in kv_tokens,
                        kv_tokens.get(c.index, 0))
            for c in chunks
        ]
        stats = self._stats(parts, documents, chunks, reports, merged, p0, budget, reserve)
        stats.kv_bytes_uncompressed = kvops.n_bytes(prefix) + sum(raw_bytes[i] for i in kv_tokens)
        stats.prefill_seconds = time.perf_counter() - start
        return _Context(merged, p0, reports, stats)

    def _chunk_budget(self, parts: PromptParts, reserve: int, documents: list[str]) -> int:
        size = sum(len(d) for d in documents)
        if size > self.config.max_input_chars:
            msg = (
                f"the input has {size:,} characters, above max_input_chars={self.config.max_input_chars:,}; "
                "raise it in ParallelCompConfig if you really mean to prefill that much"
            )
            raise InputError(msg)
        room = self.window - len(parts.prefix_ids) - len(parts.question_ids) - reserve
        budget = self.config.chunk_tokens or room
        if budget < MIN_CHUNK_TOKENS or len(parts.question_ids) > budget:
            msg = (
                f"the question ({len(parts.question_ids)} tokens with its template), the prompt prefix "
                f"({len(parts.prefix_ids)}) and max_new_tokens ({reserve}) leave {room} of the model's "
                f"{self.window}-token window for each chunk (budget {budget}); shorten the question or "
                "lower max_new_tokens"
            )
            raise InputError(msg)
        return budget

    def _stats(self, parts, documents, chunks, reports, merged, p0, budget, reserve) -> RunStats:
        kept_docs = {d for r in reports if r.kept for d in r.documents}
        split = sorted({s.document for c in chunks for s in c.spans if not s.complete})
        exceeds = p0 + len(parts.question_ids) + reserve > self.window
        if exceeds:
            warnings.warn(
                f"p0 ({p0}) + question ({len(parts.question_ids)}) + max_new_tokens ({reserve}) exceeds the "
                f"model's {self.window}-token window: late tokens sit at untrained positions; lower chunk_tokens",
                stacklevel=4,
            )
        return RunStats(
            tokens_in=sum(len(c.token_ids) for c in chunks),
            prefix_tokens=len(parts.prefix_ids),
            question_tokens=len(parts.question_ids),
            n_documents=len(documents),
            n_chunks=len(chunks),
            n_kept=sum(r.kept for r in reports),
            chunk_tokens=budget,
            split_documents=split,
            evicted_documents=sorted(set(range(len(documents))) - kept_docs),
            p0=p0,
            kv_tokens=kvops.n_tokens(merged),
            kv_bytes=kvops.n_bytes(merged),
            exceeds_window=exceeds,
        )


# ---------------------------------------------------------------------- helpers


def _resolve_model(model) -> str:
    if model is None:
        from .default_model import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        msg = f"{model!s} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); pass a local path"
        raise ModelLoadError(msg)
    return str(model)


def _default_attention(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set(end_of_turn_ids(tokenizer))
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else ({value} if value is not None else set())
    return ids


def _check_question(question, what: str = "question") -> None:
    if not isinstance(question, str):
        raise InputError(f"{what} must be a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError(f"{what} is empty")


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise InputError(f"stop must be a string or a list of strings, got {stop!r}")


def _check_generation(max_new_tokens, temperature, top_p, top_k, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise InputError(f"top_k must be a non-negative integer, got {top_k!r}")
    if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
        raise InputError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty!r}")
