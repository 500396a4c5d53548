"""`ParallelComp`: the runtime. Orchestration only; each stage lives in its own module and the
flow reads like method.md §0:

    chunk the documents                    chunking.py              (a Corpus, corpus.py)
    encode the shared prefix once          prefill.encode_prefix     (kept for the next call)
    per micro-batch of chunks:
        phase 1: chunk KV (PCW positions)  prefill.encode_chunks     (or a hit in store.py)
    per question batch of chunks:
        phase 2: question NLL per chunk    prefill.question_nll      (+ nll.py, KV scores: compression.py)
        keep the K lowest-NLL chunks       eviction.TopK             (+ a BM25 prior, lexical.py)
    merge kept KV in document order        kv.concat
    question at p0, then decode            decode.generate_tokens    (+ calibration.py)

`encode(documents)` runs only the first three lines; `generate(question, corpus=...)` then finds
every chunk's phase-1 KV in the chunk store, so a question costs phase 2 onwards.

The two stages that touch every chunk are methods a subclass may run elsewhere: `fill_store`
(phase 1 into the store) and `score_chunks` (phase 1 or a hit, phase 2, compression, top-K);
`parallelcomp.distributed` runs them on Ray workers, each over its share of the chunks, and
keeps everything else here (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import (
    attention,
    attention_kernel,
    calibration,
    compression,
    decode_kernel,
    grammar,
    guard,
    hardware,
    layer_kernel,
    lexical,
    native,
    packed_linear,
)
from . import kv as kvops
from .attention import attention_modules
from .chunking import Chunk, DocumentMemo, check_question, check_text, validate_documents
from .compat import forward
from .config import DTYPE_NAMES, MIN_CHUNK_TOKENS, ParallelCompConfig
from .corpus import Corpus
from .decode import Sampling, TextAssembler, generate_tokens
from .errors import ConfigError, InputError, ModelLoadError, ModelNotSupportedError
from .eviction import TopK
from .output import ChunkReport, GenerationOutput, ReuseStats, RunStats, ScoreOutput, SpreadStats
from .nll import plain_head
from .prefill import EncodedChunk, Head, encode_chunks, encode_prefix, micro_batches, question_nll, question_rows
from .prompts import PromptParts, build_continuation, build_prompt, end_of_turn_ids
from .settings import GenerationSettings
from .store import ChunkStore, Entry, chunk_key, identity_digest, model_identity

MEMO_TOKENS = 1 << 21
"""Tokens of recently chunked documents an engine remembers (chunking.DocumentMemo): 8 MiB, a
128K-token corpus 16 times over."""
_PLACEHOLDER_QUESTION = "?"
"""`encode` builds the prompt prefix with this question: the prefix (template head + instruction)
does not depend on it, and a question whose prefix differs simply misses the store."""
_NO_CORPUS = Corpus("", (), (), (), 0, 0)


@dataclass
class Scored:
    """What `ParallelComp.score_chunks` returns for a set of chunks."""

    scores: dict[int, float]
    """Chunk index → mean question NLL (Eq. 3)."""
    raw_bytes: dict[int, int]
    """Chunk index → its KV bytes before compression."""
    kept: list[tuple[Chunk, list[kvops.LayerKV]]]
    """The K best-ranked chunks (lowest NLL, lexical.rank) in document order, with their (compressed) KV."""
    store_bytes: int
    """Bytes the chunk store's memory tier holds afterwards."""
    spread: SpreadStats = field(default_factory=SpreadStats)
    head: Head | None = None
    """The question head phase 2 ran (or read) behind the one kept chunk, when exactly one chunk
    is kept with its whole KV: the question step starts after it (`_Context.head`)."""


@dataclass
class _Context:
    """The kept KV, ready for the question: the prefix, then each kept chunk in document order."""

    kv_parts: list[list[kvops.LayerKV]]
    p0: int
    reports: list[ChunkReport]
    stats: RunStats
    head: Head | None = None
    """KV of the first question tokens behind the one kept chunk, at the positions from p0 on
    (Scored.head): with one kept chunk the question step attends to the same KV as that chunk's
    phase 2, so it need not run them again."""


class _Result:
    """Where a run's generator writes its output. The generator refers to this, never to its
    TextStream, so the two form no reference cycle: dropping an unfinished stream frees the
    generator at once, whose finalizer closes it (releasing the model lock and restoring the
    attention implementation) without waiting for a garbage-collection pass."""

    __slots__ = ("output",)

    def __init__(self) -> None:
        self.output: GenerationOutput | None = None


class TextStream:
    """Iterate for text deltas; afterwards `.output` holds the full `GenerationOutput`.

    Stopping early (`break`, `close()`, or dropping the stream) ends the run and frees the model.
    """

    def __init__(self, deltas: Iterator[str], result: _Result):
        self._deltas = deltas
        self._result = result

    @property
    def output(self) -> GenerationOutput | None:
        return self._result.output

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def close(self) -> None:
        self._deltas.close()


class ParallelComp:
    """A causal LM answering over inputs far longer than its trained window, without training."""

    def __init__(self, model, tokenizer, config: ParallelCompConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = _check_config(config)
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
        self.attention_kernel = _attention_kernel(model, self.config.attention_kernel)
        self.tiles = _keeps_tiles(model, self.attention_kernel, self.config)
        self.decode_kernel = _decode_kernel(model, self.config.decode_kernel)
        self._fused_layers = layer_kernel.modules(model) if self.config.layer_kernel == "auto" else []
        self.layer_kernel = layer_kernel.NAME if self._fused_layers else "torch"
        packs = []
        if self.attention_kernel == "amx":  # the AMX library's linear for few rows (attention_kernel.linear)
            self._fused_layers += attention_kernel.linear_modules(model)
        elif self.config.pack_weights:
            packs = packed_linear.modules(model)
            self._fused_layers += packs
        self.packed_weight_bytes = packed_linear.nbytes(packs)
        self._lock = guard.run_lock(model)  # one run at a time per model, shared by its engines
        memory = self.config.kv_store_bytes
        self.store = ChunkStore(guard.total_bytes(model.device) // 3 if memory is None else memory,
                                self.config.kv_store_dir, self.config.kv_store_disk_bytes)
        self._identity: tuple[dict, str] | None = None
        self._prefix: tuple[tuple[int, ...], list[kvops.LayerKV]] = ((), [])  # the last prompt prefix and its KV
        self._folded = lexical.FoldedTerms(tokenizer)
        self._documents = DocumentMemo(MEMO_TOKENS, self.store if self.store.disk_dir is not None else None)

    def __deepcopy__(self, memo: dict) -> ParallelComp:
        """The engine itself: a deep copy of what holds it (a wrapper's `copy.deepcopy` or
        `model_copy(deep=True)`) shares it, as it would share a client; weights are never copied."""
        return self

    def __copy__(self) -> ParallelComp:
        twin = object.__new__(type(self))  # what copy.copy does by default, which __reduce__ below would stop
        twin.__dict__.update(self.__dict__)
        return twin

    def __reduce__(self):
        msg = ("a ParallelComp engine holds a loaded model and cannot be pickled: load one in each process "
               "(ParallelComp.from_pretrained), or spread chunks over processes with RayParallelComp")
        raise ConfigError(msg)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        config: ParallelCompConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
    ) -> ParallelComp:
        """Load a local HF directory (or a hub id when online); None → the embedded SmolLM2-135M.

        dtype None picks per machine (hardware.py): bfloat16 on CUDA and on CPUs with native,
        faster bf16; float32 otherwise. threads None sets torch's intra-op threads to the physical
        cores available to this process (unless OMP_NUM_THREADS is set). Like the threads, glibc's
        allocator is tuned for the process (hardware.configure_allocator) unless MALLOC_*_ says otherwise.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = _check_config(config)
        path = _resolve_model(model)
        device = _check_device(device)
        hardware.configure_threads(_check_threads(threads))
        hardware.configure_allocator()
        dtype = _check_dtype(dtype) or hardware.default_dtype(device)
        if Path(path).is_dir():
            guard.check_weight_files(path)
        try:  # never run a repository's code, never prompt on stdin about it
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            hf_model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=config.attn_implementation or _default_attention(device),
                use_safetensors=True,
                trust_remote_code=False,
            )
        except Exception as err:  # noqa: BLE001 - any loader failure is a ModelLoadError naming the files
            files = sorted(p.name for p in Path(path).glob("*.json") if p.name.startswith(("config", "tokenizer")))
            files += sorted(p.name for p in Path(path).glob("*.safetensors"))
            where = f"{path!s} ({', '.join(files)})" if files else str(path)
            raise ModelLoadError(f"could not load model {where}: {type(err).__name__}: {err}") from err
        return cls(hf_model.to(device), tokenizer, config)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "name_or_path", "") or type(self.model).__name__)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (no template, no special tokens)."""
        if not isinstance(text, str):
            raise InputError(f"count_tokens takes one string, got {type(text).__name__}")
        check_text(text, "the text")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ public calls

    def layers(self):
        """A block in which the model's RMSNorms and SwiGLU gates run on this engine's layer kernel
        (ParallelCompConfig.layer_kernel), and on "amx" its linear layers of few rows on the tiles
        (attention_kernel.linear_modules); its modules' own forwards again after it."""
        return layer_kernel.fused(self._fused_layers)

    def _model_identity(self) -> tuple[dict, str]:
        """What every chunk's KV depends on besides its tokens (store.model_identity) and its
        digest; computed once, on the first call that has documents."""
        if self._identity is None:
            attend, layers = self.attention_kernel, self.layer_kernel
            if attend in attention_kernel.KERNELS:
                attend += "@" + native.source_digest(attention_kernel.SOURCE)
            if layers == layer_kernel.NAME:
                layers += "@" + native.source_digest(layer_kernel.SOURCE)
            identity = model_identity(self.model, attend, layers, self.tiles)
            self._identity = (identity, identity_digest(identity))
        return self._identity

    def prefix_kv(self, prefix_ids: list[int], report: ReuseStats) -> list[kvops.LayerKV]:
        """The prompt prefix's KV. The last one is kept: calls over one corpus share their prefix
        (template head, system message, instruction), and it is read-only downstream."""
        ids = tuple(prefix_ids)
        if self._prefix[0] == ids and self._prefix[1]:
            report.reused_prefix_tokens += len(ids)
        else:
            self._prefix = (ids, encode_prefix(self.model, prefix_ids, self.attention_kernel))
        return self._prefix[1]

    def encode(self, documents=None, context=None, *, history=(), progress: bool = False, **unknown) -> Corpus:
        """Chunk `documents` (or one long `context` string) and run phase 1 on every chunk once,
        keeping the KV in the chunk store; `generate/stream/score(..., corpus=corpus)` then run only
        the question-dependent stages, with output identical to passing the same `documents=`.

        `history`: the chat the questions will be asked in, for the part of it that sits before
        the chunks, a system message (prompts.documents_turn): a call whose prompt prefix differs
        from the corpus's encodes its chunks again behind its own (`stats.encoded_chunks`)."""
        _refuse(unknown, "encode", "it takes documents or context, history and progress; answer settings go to "
                                   "generate")
        documents = validate_documents(documents, context)
        progress = GenerationSettings.of(progress=progress).progress
        parts = self.prompt_parts(_PLACEHOLDER_QUESTION, True, history)
        with self._lock, self.layers():
            start = time.perf_counter()
            corpus = self._chunk(documents, parts.prefix_ids)
            report = ReuseStats()
            bar = tqdm(total=len(corpus.chunks), desc="encode", unit="chunk", disable=not progress, file=sys.stderr)
            keys = dict(zip((c.index for c in corpus.chunks), corpus.keys))
            held = self.fill_store(list(corpus.chunks), keys, parts.prefix_ids, report, bar)
            bar.close()
            self.store.flush(report)  # a corpus is on disk (where there is a disk tier) when encode returns
            self._documents.flush(report)
            return replace(corpus, encode_seconds=time.perf_counter() - start, bytes_held=held,
                           encoding=report)

    def generate(self, question: str, documents=None, context=None, *, corpus: Corpus | None = None,
                 **settings) -> GenerationOutput:
        """Answer `question` over `documents` (one string each), one long `context` string, or a
        `corpus` from `encode`.

        Keyword arguments are `GenerationSettings` (settings.py): max_new_tokens=256, stop=None
        (str or list of str), temperature=0.0 (greedy), top_p=1.0, top_k=0, seed=None,
        repetition_penalty=1.0, progress=False (a tqdm bar on stderr), json_schema=None (a
        grammar makes the answer JSON matching it), tools=None, tool_choice="auto" and
        parallel_tool_calls=True (tool calls in `<tool_call>` blocks; grammar.py).
        """
        stream = self.stream(question, documents, context, corpus=corpus, **settings)
        for _ in stream:
            pass
        return stream.output

    def stream(self, question: str, documents=None, context=None, *, corpus: Corpus | None = None, history=(),
               role: str = "user", **settings) -> TextStream:
        """Like `generate`, but yields text deltas as they are decoded.

        With neither `documents`, `context` nor `corpus`, the question is answered from the model
        alone (a plain chat turn; `out.chunks` is empty). An empty `documents` list is an error.
        `history`: chat messages ({"role", "content"}) before the question's turn (prompts.py);
        `role`: that turn's chat role ("tool" for an agent's tool result to go on from).
        """
        s = GenerationSettings.of(**settings)
        sampling = Sampling(s.temperature, s.top_p, s.top_k, s.seed, s.repetition_penalty)
        parts = self.prompt_parts(question, corpus is not None or documents is not None or context is not None, history,
                                  s.tools, role)
        corpus = self._corpus(parts, documents, context, corpus, required=False,
                              need=len(parts.question_ids) + s.max_new_tokens)
        result = _Result()
        constraint = self._grammar(s)
        stops = [] if constraint else list(s.stop)  # the grammar decides where constrained output ends
        deltas = self._answer(result, parts, corpus, s.max_new_tokens, stops, sampling, s.progress, constraint)
        return TextStream(deltas, result)

    def score(self, target: str, documents=None, context=None, *, corpus: Corpus | None = None,
              progress: bool = False, **unknown) -> ScoreOutput:
        """Teacher-forced NLL of `target` continuing the kept chunks (plain text, no template).

        Chunks are ranked by the NLL of `target` itself (the paper's perplexity setting, §6.3).
        The first target token only conditions; the NLL averages over the remaining tokens.
        Attention calibration is not applied here: it picks evictions with the last target token,
        which would leak later tokens into the NLL of earlier ones. Compression is applied.
        A `corpus` from `encode` keeps its chunks; their KV is reused only where the store holds
        it behind this call's prefix (BOS only, no template), else encoded again.
        """
        _refuse(unknown, "score", "it decodes nothing: it takes documents, context or corpus, and progress")
        check_question(target, what="target")
        progress = GenerationSettings.of(progress=progress).progress
        parts = build_continuation(self.tokenizer, target)
        if len(parts.question_ids) < 2:
            raise InputError("target must be at least two tokens long to be scored")
        corpus = self._corpus(parts, documents, context, corpus, required=True, need=len(parts.question_ids))
        with self._lock, self.layers():
            ctx = self._prefill(parts, corpus, reserve=0, progress=progress)
            cache = kvops.to_cache(kvops.concat(ctx.kv_parts))
            ids = torch.tensor([parts.question_ids], device=self.model.device)
            positions = ctx.p0 + torch.arange(ids.shape[1], device=self.model.device)[None]
            with torch.inference_mode():
                logits = forward(self.model, ids, cache, positions, logits_to_keep=ids.shape[1])
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            nlls = -logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            self.write_behind(ctx.stats)
        return ScoreOutput(float(nlls.mean()), len(nlls), nlls.tolist(), ctx.reports, ctx.stats)

    # ------------------------------------------------------------------ stages

    def _grammar(self, s: GenerationSettings) -> str | None:
        """The llguidance grammar of the call's constrained output, or None (grammar.py)."""
        if s.tools:
            return grammar.tool_grammar(s.tools, s.tool_choice, self.tokenizer, s.parallel_tool_calls, s.json_schema)
        return grammar.schema_grammar(s.json_schema) if s.json_schema is not None else None

    def _answer(self, result, parts, corpus, max_new_tokens, stops, sampling, progress, constraint) -> Iterator[str]:
        with self._lock, self.layers(), ExitStack() as scope:  # unwound on close(), break or drop (see _Result)
            if guard.cancelled():  # cancelled while queued for the lock: do no work
                return
            calibrator = calibration.Calibrator.for_run(self.config, self.num_layers, len(parts.question_ids))
            held = self.store.chunk_bytes
            ctx = self._prefill(parts, corpus, reserve=max_new_tokens, progress=progress)
            start = time.perf_counter()
            assembler = TextAssembler(self.tokenizer, stops)
            mask = (grammar.GrammarProcessor(self.tokenizer, constraint, self._vocab_size(), self.eos_ids,
                                             len(parts.question_ids)) if constraint else None)
            # with one kept chunk, its question head (phase 2's) is this step's first tokens at the same
            # positions; not with calibration, which evicts by the whole question's attention
            carried = ctx.head.length if ctx.head is not None and calibrator is None else 0
            cache = kvops.decode_cache(ctx.kv_parts + ([ctx.head.kv] if carried else []),
                                       extra_tokens=len(parts.question_ids) - carried + max_new_tokens)
            kernel = self.decode_kernel == decode_kernel.NAME
            causal = self.attention_kernel if self.attention_kernel in attention.CAUSAL_KERNELS else ""
            step = (calibrator.enter(scope, self.model, cache, ctx.reports, ctx.stats.prefix_tokens, kernel, causal)
                    if calibrator else None)  # attention calibration at the question step (§4)
            whole = decode_kernel.DecodeStep.for_model(self.model, cache) if kernel else None
            tokens = scope.enter_context(closing(generate_tokens(  # closed before the lock is released: decode's
                self.model, cache, parts.question_ids, ctx.p0, max_new_tokens, self.eos_ids, sampling, step, mask,
                kernel, whole, causal, carried)))  # attention switch is undone first
            for token_id in tokens:
                if not assembler.ids:
                    ctx.stats.first_token_seconds = time.perf_counter() - start
                delta = assembler.add(token_id)
                if delta:
                    yield delta
                    self._lock.advanced()  # resumed, maybe in another thread (guard.RunLock)
                if assembler.stopped:
                    break
                if guard.cancelled():  # the caller's task was cancelled: stop at this token
                    return
            if mask:
                mask.finish(assembler.ids)  # StructuredOutputError unless the grammar is complete
            tail = assembler.finish()
            if tail:
                yield tail
            if calibrator:
                calibrator.report(ctx.stats)
            ctx.stats.new_tokens = len(assembler.ids)
            ctx.stats.kernel_steps = whole.steps if whole else 0
            ctx.stats.step_head_tokens = carried
            ctx.stats.finish_reason = "length" if len(assembler.ids) == max_new_tokens and not assembler.stopped else "stop"
            ctx.stats.decode_seconds = time.perf_counter() - start
            self.write_behind(ctx.stats)
            if not ctx.stats.encoded_chunks and not ctx.stats.store_evicted and self.store.chunk_bytes == held:
                self._lock.keep_heap()  # a question over the tier's chunks as they were (its question heads
                # replace the last question's): its freed pages serve the next
            result.output = GenerationOutput(assembler.text, ctx.reports, ctx.stats, list(assembler.ids))

    def write_behind(self, stats: ReuseStats) -> None:
        """Write the chunks encoded, and the documents tokenized, since the last write to the disk
        tier, and count that in `stats`. A call does this once its output is complete (the tier is
        written behind, store.py and docs/store.md); a stream closed before its end leaves them to
        the next call, and a caller interrupted mid-call (the CLI's Ctrl-C) keeps its work by
        calling this."""
        writes = ReuseStats()
        self.store.flush(writes)
        self._documents.flush(writes)  # after the chunks: the newest files, the last the disk budget deletes
        stats.add(writes)

    def prompt_parts(self, question: str, with_documents: bool, history=(), tools=None, role: str = "user"
                     ) -> PromptParts:
        """The token spans (prefix, question suffix) this engine builds for a question (prompts.py);
        InputError for a question that is not usable text."""
        check_question(question)
        return build_prompt(self.tokenizer, self.config.instruction, question, self.config.use_chat_template,
                            with_documents, history, restate_instruction=self.config.restate_instruction,
                            tools=tools, role=role, history_after_documents=self.config.history_after_documents)

    def _vocab_size(self) -> int:
        """Width of the model's logits (may exceed the tokenizer's vocabulary, as in Qwen2.5)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def _corpus(self, parts: PromptParts, documents, context, corpus: Corpus | None, required: bool,
                need: int = 0) -> Corpus:
        """The call's corpus: the one given, or `documents`/`context` chunked (not yet encoded)
        so that `need` tokens (the question suffix and the answer) fit after the chunks (`_chunk`)."""
        if corpus is None:
            documents = validate_documents(documents, context, required=required)
            return self._chunk(documents, parts.prefix_ids, need) if documents else _NO_CORPUS
        if documents is not None or context is not None:
            raise InputError("pass either corpus=... or documents/context, not both")
        if not isinstance(corpus, Corpus):
            raise InputError(f"corpus must be a Corpus from ParallelComp.encode, got {type(corpus).__name__}")
        if not corpus.chunks:
            raise InputError("the corpus is empty: encode at least one non-empty document")
        if corpus.identity != self._model_identity()[1]:
            raise InputError("this corpus was encoded by an engine with another model, dtype, device or attention "
                             "implementation; encode the documents with this engine")
        if corpus.documents and not self.config.chunk_tokens:
            if not self._fits(corpus.chunks, len(parts.prefix_ids), need):  # cut as `documents=` would cut them
                return self._chunk(list(corpus.documents), parts.prefix_ids, need)
        return replace(corpus, chunk_seconds=0.0, chunking=ReuseStats())  # this call chunked nothing

    def _chunk(self, documents: list[str], prefix_ids: list[int], need: int = 0) -> Corpus:
        """Chunk `documents` with the first budget of `_chunk_budgets` whose chunks leave `need`
        tokens of the window after the longest (or with the last)."""
        start = time.perf_counter()
        rejected: dict[str, int] = {}  # disk files rejected by every try; documents reused as the last try found them
        for budget in self._chunk_budgets(len(prefix_ids), documents):
            found = ReuseStats(store_rejected=rejected)
            chunks = self._documents.make_chunks(self.tokenizer, documents, budget, self.config.document_separator,
                                                 found, self.config.pack_documents)
            if self._fits(chunks, len(prefix_ids), need):
                break
        digest = self._model_identity()[1]
        keys = tuple(chunk_key(digest, prefix_ids, c.token_ids) for c in chunks)
        return Corpus(digest, tuple(prefix_ids), tuple(chunks), keys, len(documents), budget,
                      chunk_seconds=time.perf_counter() - start, chunking=found, documents=tuple(documents))

    def _fits(self, chunks, prefix_tokens: int, need: int) -> bool:
        """Whether `need` tokens after the prefix and the longest of `chunks` end inside the window."""
        return guard.fits_window(self.window, prefix_tokens + max((len(c.token_ids) for c in chunks), default=0),
                                 need, 0)

    # ------------------------------------------------------------------ stages over chunks

    def fill_store(self, chunks: list[Chunk], keys: dict[int, str], prefix_ids: list[int], report: ReuseStats,
                   bar=None) -> int:
        """Phase 1 of `chunks` into the chunk store (hits are left as they are); `keys` maps each
        chunk index to its store key behind `prefix_ids`. Returns the bytes the memory tier holds
        for these chunks."""
        for batch in micro_batches(chunks, self.config.prefill_batch_tokens):
            self.phase1(batch, keys, prefix_ids, report)
            if bar is not None:
                bar.update(len(batch))
        return sum(self.store.bytes_of(keys[c.index]) for c in chunks)

    def score_chunks(self, parts: PromptParts, chunks: list[Chunk], keys: dict[int, str],
                     prefix: list[kvops.LayerKV], report: ReuseStats, matches: dict[int, float], bar=None) -> Scored:
        """Phase 1 (or a store hit) per micro-batch, then phase 2 (question NLL over the prefix
        KV `prefix`), per-chunk compression and the online top-K (method.md §0) per question batch,
        ranked with each chunk's lexical match in `matches` (`lexical_matches`; lexical.rank).

        Phase 2 reads each chunk's KV where it is, so its rows wait for more micro-batches while
        the memory tier holds every one of them (a reused corpus: one forward for all its chunks,
        up to `question_rows`); a chunk the tier does not hold is scored before the next
        micro-batch, so at most one micro-batch of KV is alive outside the store."""
        top = TopK[EncodedChunk](self.config.keep_chunks)
        scores: dict[int, float] = {}
        raw_bytes: dict[int, int] = {}  # chunk index → KV bytes before compression
        scored = parts.scored(self.config.score_tokens)
        rows = question_rows(self.config.prefill_batch_tokens, len(parts.question_ids),
                             plain_head(self.model) is not None)
        pending: list[EncodedChunk] = []

        def phase2(group: list[EncodedChunk]) -> None:
            comp = compression.BatchCompressor.for_batch(
                self.config, kvops.n_tokens(prefix), group, len(parts.question_ids), parts.question_span
            )
            if comp is None:
                nll = self.question_nll(parts, scored, group, keys, prefix, report)
            else:
                nll = question_nll(self.model, prefix, group, parts.question_ids, scored, comp.observe,
                                   self.attention_kernel)
            raw_bytes.update({e.chunk.index: kvops.token_bytes(e.kv) for e in group})
            for enc, chunk_nll in zip(comp.apply(group) if comp else group, nll.mean(dim=1).tolist()):
                scores[enc.chunk.index] = chunk_nll
                top.offer(lexical.rank(chunk_nll, matches[enc.chunk.index], self.config.lexical_weight),
                          enc.chunk.index, enc)
            if bar is not None:
                bar.update(len(group))

        for batch in micro_batches(chunks, self.config.prefill_batch_tokens):
            pending.extend(self.phase1(batch, keys, parts.prefix_ids, report))
            while len(pending) >= rows:
                phase2(pending[:rows])
                del pending[:rows]
            if pending and not all(self.store.holds(keys[e.chunk.index]) for e in pending):
                phase2(pending)
                pending.clear()
        if pending:
            phase2(pending)
        best = top.kept()
        kept = [(e.chunk, e.kv) for e in best]  # a `Tiled` one is untiled where it is merged (kv.py)
        head = best[0].head if len(best) == 1 and not self.config.compresses else None
        return Scored(scores, raw_bytes, kept, self.store.bytes_held, head=head)

    def question_nll(self, parts: PromptParts, scored: slice, group: list[EncodedChunk], keys: dict[int, str],
                     prefix: list[kvops.LayerKV], report: ReuseStats) -> torch.Tensor:
        """Phase 2 of `group` without compression, reusing each chunk's question head: the suffix
        tokens before the first scored one (the template's "\n\nQuestion:", a restated
        instruction, a conversation's earlier turns), which every question with that head shares.
        A chunk runs from the first head token the memory tier does not hold for it (the first
        scored token when it holds the whole head; store.head), in one forward per such start,
        and leaves with it in the store every question token that forward ran or carried, up to
        the last scored one: the next turn of a conversation begins with them. Returns the
        (len(group), n) NLL in group order."""
        head, end, _ = scored.indices(len(parts.question_ids))
        if not head:
            return question_nll(self.model, prefix, group, parts.question_ids, scored, None, self.attention_kernel)
        head_ids, ran_ids = parts.question_ids[:head], parts.question_ids[: end - 1]
        for e in group:
            e.head = self.store.head(keys[e.chunk.index], head_ids)
        starts = [0 if e.head is None else e.head.length for e in group]
        nll = torch.empty(len(group), end - head, device=self.model.device)
        for start in sorted(set(starts)):
            rows = [i for i, s in enumerate(starts) if s == start]
            nll[rows] = question_nll(self.model, prefix, [group[i] for i in rows], parts.question_ids, scored,
                                     None, self.attention_kernel, head)
        for i, start in enumerate(starts):
            if start < len(ran_ids):
                self.store.keep_head(keys[group[i].chunk.index], ran_ids, group[i].head, report)
        report.reused_head_tokens += sum(starts)
        return nll

    def phase1(self, batch: list[Chunk], keys: dict[int, str], prefix_ids: list[int], report: ReuseStats):
        """Phase-1 results of one micro-batch: store hits as they are, the misses encoded (one
        forward each, so a miss gives what any other run stores for it) and stored. A chunk whose
        tokens occur twice in the batch (a repeated document, boilerplate) is encoded once and
        counted as reused the second time."""
        identity = self._model_identity()[0]
        shape = kvops.layout(self.model)
        entries, first = {}, {}  # first: store key → index of the batch's first chunk with it

        def reused(c: Chunk, entry: Entry) -> None:
            entries[c.index] = entry
            report.reused_tokens += len(c.token_ids)
            report.reuse_seconds_saved += entry.seconds

        for c in batch:
            if first.setdefault(keys[c.index], c.index) != c.index:
                continue
            entry = self.store.get(keys[c.index], identity, prefix_ids, c.token_ids, report, shape,
                                   self.model.device)
            if entry is not None:  # the store counted it in report.reused_chunks
                reused(c, entry)
        missing = [c for c in batch if first[keys[c.index]] == c.index and c.index not in entries]
        if missing:
            start = time.perf_counter()
            encoded = encode_chunks(self.model, prefix_ids, missing, self.attention_kernel, self.tiles)
            share = (time.perf_counter() - start) / sum(len(c.token_ids) for c in missing)
            for enc in encoded:
                entry = Entry(enc.kv, enc.last_logprobs, share * enc.length)
                self.store.put(keys[enc.chunk.index], entry, identity, prefix_ids, enc.chunk.token_ids, report)
                entries[enc.chunk.index] = entry
        for c in batch:
            if c.index not in entries:  # a repeat of an earlier chunk of this batch
                report.reused_chunks += 1
                reused(c, entries[first[keys[c.index]]])
        return [EncodedChunk(c, entries[c.index].kv, entries[c.index].last_logprobs) for c in batch]

    def lexical_matches(self, parts: PromptParts, chunks: list[Chunk], keys: dict[int, str]) -> dict[int, float]:
        """Chunk index → the scored question tokens' BM25 match with it over all `chunks`, in
        [0, 1] (lexical.py); all 0 when `lexical_weight` is 0. `keys`: the chunks' store keys,
        under which their case-folded terms are remembered (`lexical_fold_case`)."""
        if not self.config.lexical_weight:
            return {c.index: 0.0 for c in chunks}
        query = parts.question_ids[parts.scored(self.config.score_tokens)]
        terms = [c.token_ids for c in chunks]
        if self.config.lexical_fold_case:
            query = self._folded(query)
            terms = [self._folded(c.token_ids, keys[c.index]) for c in chunks]
        return dict(zip((c.index for c in chunks), lexical.match(terms, query)))

    @staticmethod
    def _keys(corpus: Corpus, prefix_ids: list[int]) -> dict[int, str]:
        """Chunk index → store key behind `prefix_ids` (the corpus's own keys when it is its prefix)."""
        if tuple(prefix_ids) == corpus.prefix_ids:
            return dict(zip((c.index for c in corpus.chunks), corpus.keys))
        return {c.index: chunk_key(corpus.identity, prefix_ids, c.token_ids) for c in corpus.chunks}

    def _prefill(self, parts: PromptParts, corpus: Corpus, reserve: int, progress: bool) -> _Context:
        """Phase 1 (or store hits), phase 2, top-K and compression per micro-batch; return the
        kept KV (merged only where the question needs it: once, into the decode cache)."""
        start = time.perf_counter()
        guard.check_run(self.model, self.config, self.window, len(parts.prefix_ids), list(corpus.chunks),
                        len(parts.question_ids), reserve, self.store.room)  # window and memory, before any work
        if self.config.compresses:
            compression.observation_rows(self.config, len(parts.question_ids), parts.question_span)
        report = ReuseStats()
        report.add(corpus.chunking)
        prefix = self.prefix_kv(parts.prefix_ids, report)
        bar = tqdm(total=len(corpus.chunks), desc="prefill", unit="chunk", disable=not progress, file=sys.stderr)
        keys = self._keys(corpus, parts.prefix_ids)
        matches = self.lexical_matches(parts, list(corpus.chunks), keys)
        scored = self.score_chunks(parts, list(corpus.chunks), keys, prefix, report, matches, bar)
        bar.close()
        kv_parts = [prefix] + [kv for _, kv in scored.kept]
        p0 = len(parts.prefix_ids) + max((len(c.token_ids) for c, _ in scored.kept), default=0)
        kv_tokens = {c.index: kvops.n_tokens(kv) for c, kv in scored.kept}
        reports = [
            ChunkReport(c.index, c.spans, len(c.token_ids), scored.scores[c.index], c.index in kv_tokens,
                        kv_tokens.get(c.index, 0), matches[c.index])
            for c in corpus.chunks
        ]
        stats = self._stats(parts, corpus, reports, kv_parts, p0, reserve, report, scored)
        stats.kv_bytes_uncompressed = kvops.n_bytes(prefix) + sum(scored.raw_bytes[i] for i in kv_tokens)
        stats.prefill_seconds = time.perf_counter() - start
        return _Context(kv_parts, p0, reports, stats, scored.head)

    def _chunk_budgets(self, prefix_tokens: int, documents: list[str]) -> Iterator[int]:
        """Tokens per chunk, in the order `_chunk` tries them: `chunk_tokens`, or the window less
        the prefix and a reserve of `reserve_tokens` (default min(512, window/8)), then of twice,
        four times ... that, up to half the window.

        The first fits an ordinary question, so its chunks, and their store keys, are those of every
        other question; a conversation whose turns follow the documents (prompts.documents_turn)
        needs the next steps as it grows, and each step chunks the corpus afresh once (docs/store.md,
        "Chunking must not depend on the question")."""
        size = sum(len(d) for d in documents)
        if size > self.config.max_input_chars:
            msg = (
                f"the input has {size:,} characters, above max_input_chars={self.config.max_input_chars:,}; "
                "raise it in ParallelCompConfig if you really mean to prefill that much"
            )
            raise InputError(msg)
        if self.config.chunk_tokens:
            yield self.config.chunk_tokens
            return
        reserve = self.config.reserve_tokens or min(512, self.window // 8)
        budget = self.window - prefix_tokens - reserve
        if budget < MIN_CHUNK_TOKENS:
            msg = (
                f"the prompt prefix ({prefix_tokens} tokens) and reserve_tokens={reserve} leave "
                f"{budget} of the model's {self.window}-token window for each chunk; lower reserve_tokens or "
                "set chunk_tokens"
            )
            raise ConfigError(msg)
        yield budget
        while reserve < self.window // 2:
            reserve = min(2 * reserve, self.window // 2)
            if self.window - prefix_tokens - reserve < MIN_CHUNK_TOKENS:
                return
            yield self.window - prefix_tokens - reserve

    def _stats(self, parts, corpus: Corpus, reports, kv_parts, p0, reserve, report: ReuseStats,
               scored: Scored) -> RunStats:
        """The one place a run's statistics are assembled."""
        kept_docs = {d for r in reports if r.kept for d in r.documents}
        split = sorted({s.document for c in corpus.chunks for s in c.spans if not s.complete})
        exceeds = p0 + len(parts.question_ids) + reserve > self.window
        if exceeds:
            warnings.warn(
                f"p0 ({p0}) + question ({len(parts.question_ids)}) + max_new_tokens ({reserve}) exceeds the "
                f"model's {self.window}-token window: late tokens sit at untrained positions; shorten the "
                "question or the chat turns after the documents, or lower max_new_tokens or chunk_tokens",
                stacklevel=5,
            )
        return RunStats(
            tokens_in=corpus.n_tokens,
            prefix_tokens=len(parts.prefix_ids),
            question_tokens=len(parts.question_ids),
            question_scored=parts.scored(self.config.score_tokens).indices(len(parts.question_ids))[:2],
            n_documents=corpus.n_documents,
            n_chunks=len(corpus.chunks),
            n_kept=sum(r.kept for r in reports),
            chunk_tokens=corpus.chunk_tokens,
            split_documents=split,
            evicted_documents=sorted(set(range(corpus.n_documents)) - kept_docs),
            p0=p0,
            kv_tokens=sum(kvops.n_tokens(part) for part in kv_parts),
            kv_bytes=sum(kvops.token_bytes(part) for part in kv_parts),
            exceeds_window=exceeds,
            **asdict(report),
            **asdict(scored.spread),
            store_bytes=scored.store_bytes,
            chunk_seconds=corpus.chunk_seconds,
            dtype=str(self.model.dtype).removeprefix("torch."),
            attention_kernel=self.attention_kernel,
            layer_kernel=self.layer_kernel,
            decode_kernel=self.decode_kernel,
            packed_weight_bytes=self.packed_weight_bytes,
            threads=torch.get_num_threads(),
        )


# ---------------------------------------------------------------------- helpers


def _resolve_model(model) -> str:
    if model is None:
        from .default_model import embedded_model_dir

        return str(embedded_model_dir())
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be a local directory path (str or os.PathLike) or None, "
                          f"got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        msg = f"{model!s} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); pass a local path"
        raise ModelLoadError(msg)
    return str(model)


def _attention_kernel(model, choice: str) -> str:
    """The kernel phases 1 and 2 attend with (ParallelCompConfig.attention_kernel): "sdpa",
    "matmul", "amx" or "avx512" for an sdpa model, else the model's own backend, which both phases
    then use. "auto" takes attention_kernel.py's kernel wherever it runs (a bf16 model on a CPU
    with AVX-512 BF16, head sizes it takes; the "amx" build where the CPU has AMX); asked for
    explicitly where it cannot run, ConfigError says why."""
    backend = attention.backend(model)
    if backend != "sdpa" or choice == "fused":
        return backend
    _, _, head_dim = kvops.layout(model)
    heads = attention_kernel.takes_heads(model.device, model.dtype, head_dim, head_dim)
    if choice in attention_kernel.KERNELS and not (heads and attention_kernel.name() == choice):
        why = attention_kernel.unavailable_reason(choice) if heads else (
            f"it takes bf16 models on CPU with a head size that is a multiple of 64 up to 256, not a "
            f"{model.dtype} model on {model.device.type} with head size {head_dim}")
        raise ConfigError(f'attention_kernel="{choice}" cannot run here: {why}; use "auto" or "fused"')
    if choice in attention_kernel.KERNELS or (choice == "auto" and heads and attention_kernel.available()):
        attention_modules(model)  # ModelNotSupportedError for layers the kernel cannot reach
        return attention_kernel.name()
    if choice == "auto" and not hardware.matmul_attention(model.device, model.dtype):
        return backend
    attention_modules(model)  # ModelNotSupportedError for layers the matmul kernel cannot reach
    return "matmul"


def _keeps_tiles(model, kernel: str, config: ParallelCompConfig) -> bool:
    """Whether chunks are kept `Tiled` (kv.py; docs/store.md, "Chunks kept in the kernel's layout"):
    where phase 2 attends on attention_kernel.py's kernel (either build) in every layer, that is
    without compression (which observes phase 2's probabilities in torch) and without a sliding
    window (which the kernel does not take). Elsewhere phase 2 would have to untile every chunk it
    reads."""
    return (kernel in attention_kernel.KERNELS and not config.compresses
            and all(getattr(m, "sliding_window", None) is None for m in attention_modules(model)))


def _decode_kernel(model, choice: str) -> str:
    """What one-token decode steps run on (ParallelCompConfig.decode_kernel): the C kernels where
    an sdpa model on CPU, whose attention layers attention.packed_decode reaches, has a dtype and
    heads they take and they build; else "torch"."""
    if (choice != "auto" or model.device.type != "cpu" or attention.backend(model) != "sdpa"
            or model.dtype not in (torch.float32, torch.bfloat16)):
        return "torch"
    try:
        attention_modules(model)
    except ModelNotSupportedError:
        return "torch"
    _, kv_heads, head_dim = kvops.layout(model)
    groups = model.config.get_text_config().num_attention_heads // kv_heads
    return decode_kernel.NAME if decode_kernel.takes(groups, head_dim) and decode_kernel.available() else "torch"


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


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def _check_dtype(dtype) -> torch.dtype | None:
    """None (choose per machine), a torch dtype or its name among DTYPES."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or None to choose per machine), got {dtype!r}")


def _check_device(device) -> torch.device:
    """None (CUDA when torch sees a GPU, else the CPU), or a device this torch build can run on."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0', a torch.device or None, got {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        msg = f"device {device!r} is not a torch device name (such as 'cpu', 'cuda' or 'cuda:1'): {err}"
        raise ConfigError(msg) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise ConfigError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    if not backend.is_available():
        no_cuda = device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None
        why = "was built without CUDA" if no_cuda else f"sees no {device.type} device"
        raise ConfigError(f"device {str(device)!r} is not available: torch {torch.__version__} {why}; use device='cpu' "
                          "(CLI: --device cpu) or leave it unset to pick one")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {str(device)!r} does not exist: torch sees {count} {device.type} device(s)")
    return device


def _check_config(config) -> ParallelCompConfig:
    if config is None:
        return ParallelCompConfig()
    if not isinstance(config, ParallelCompConfig):
        raise ConfigError(f"config must be a ParallelCompConfig, got {type(config).__name__}; build one with "
                          "ParallelCompConfig(**settings) or ParallelCompConfig.preset(name)")
    return config


def _check_threads(threads) -> int | None:
    """None, or from 1 to this machine's logical CPUs: torch starts every thread asked for
    (a million of them hung a test process while loading)."""
    cpus = os.cpu_count() or 1
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= cpus):
        return threads
    raise ConfigError(f"threads must be an integer from 1 to this machine's {cpus} logical CPUs "
                      f"(or None for the available cores), got {threads!r}")


def _refuse(unknown: dict, call: str, takes: str) -> None:
    """InputError for keyword arguments `call` does not take, instead of Python's TypeError."""
    if unknown:
        raise InputError(f"{call}() has no argument {', '.join(sorted(unknown))}; {takes}")

