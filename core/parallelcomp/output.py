"""What a ParallelComp call returns: the answer, a report per chunk, and run statistics.

Plain dataclasses; no torch. Everything cut or evicted is listed here, never dropped silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DocumentSpan:
    """The part of one input document that a chunk holds (character offsets into it)."""

    document: int
    start: int
    end: int
    complete: bool
    """True when the whole document sits in this chunk; False for a piece of a split document."""


@dataclass(frozen=True)
class ChunkReport:
    index: int
    spans: tuple[DocumentSpan, ...]
    n_tokens: int
    score: float
    """Mean NLL of the question given this chunk (Eq. 3); lower is more relevant."""
    kept: bool
    kv_tokens: int = 0
    """Context tokens this chunk contributes to the merged KV per layer and KV head (0 if evicted)."""
    lexical: float = 0.0
    """The question's BM25 match with this chunk ÷ the corpus's best, in [0, 1]; 0 unless
    `lexical_weight` > 0. The top-K ranks by `score − lexical_weight × lexical` (lexical.py)."""

    @property
    def documents(self) -> tuple[int, ...]:
        """Indices of the input documents this chunk holds (whole or in part)."""
        return tuple(dict.fromkeys(s.document for s in self.spans))


@dataclass
class ReuseStats:
    """What the chunk KV store (store.py) did during one call; part of every RunStats."""

    encoded_chunks: int = 0
    """Chunks whose phase 1 ran in this call."""
    reused_chunks: int = 0
    """Chunks whose phase-1 KV came from the chunk KV store (memory or disk tier)."""
    reused_tokens: int = 0
    reuse_seconds_saved: float = 0.0
    """Phase-1 time the reused chunks took when they were encoded."""
    reused_prefix_tokens: int = 0
    """Prompt-prefix tokens whose KV was kept from the engine's previous call (0: encoded), summed
    over the engines that needed it (a distributed run: the driver and each scoring worker)."""
    reused_documents: int = 0
    """Documents whose chunking (tokens and cut points) the engine's memo held (chunking.DocumentMemo:
    chunked by an earlier call, or earlier in this one) or read from the disk tier: their text was
    not tokenized again."""
    store_disk_documents: int = 0
    """Of the reused documents, those whose chunking was read from the disk tier (an earlier process's)."""
    reused_head_tokens: int = 0
    """Question-suffix tokens before the question text (the template's, a conversation's earlier
    turns; prefill.Head) whose KV behind a chunk came from the memory tier, summed over chunks:
    phase 2 did not run them."""
    store_disk_hits: int = 0
    """Of the reused chunks, those read from the disk tier."""
    store_rejected: dict[str, int] = field(default_factory=dict)
    """Disk-tier files (chunk KV or documents' chunking) found damaged, foreign or stale, by
    reason: deleted and recomputed. "abandoned write" counts temporary files a killed writer left
    (store.ABANDONED_WRITE_SECONDS), deleted when the tier is scanned."""
    store_write_errors: int = 0
    """Disk-tier files (chunk KV or documents' chunking) that could not be written."""
    store_write_seconds: float = 0.0
    """Time spent writing chunk KV and documents' chunking to the disk tier. The tier is written behind (store.py):
    mostly after the last token, so it counts in neither `prefill_seconds` nor `decode_seconds`."""
    store_evicted: int = 0
    """Entries the memory tier dropped during this call to stay within kv_store_bytes."""
    store_disk_evicted: int = 0
    """Files the disk tier deleted during this call to stay within its budget (kv_store_disk_bytes)."""

    def add(self, other: ReuseStats) -> None:
        """Count `other`'s work in this report too (a distributed run sums its workers')."""
        for name, value in asdict(other).items():
            if isinstance(value, dict):
                mine = getattr(self, name)
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass
class SpreadStats:
    """How a distributed run (parallelcomp.distributed, docs/distributed.md) spread its work over
    workers; empty in one process. Part of every RunStats."""

    workers: int = 0
    """Workers that answered (0: the run was not distributed)."""
    worker_chunks: dict[str, int] = field(default_factory=dict)
    """Worker → chunks it scored (phase 1 from its store or encoded, then phase 2)."""
    worker_seconds: dict[str, float] = field(default_factory=dict)
    """Worker → seconds its phase 1 and phase 2 took (they run at the same time)."""
    transfer_bytes: int = 0
    """Bytes of kept chunk KV moved from the workers to the driver (scores are a few bytes each)."""
    failed_workers: list[str] = field(default_factory=list)
    """Workers lost during this call; their chunks went to the next worker in rendezvous order."""
    reassigned_chunks: int = 0
    """Chunks scored again on another worker because theirs was lost."""


@dataclass
class RunStats(SpreadStats, ReuseStats):
    tokens_in: int = 0
    """Context tokens over all chunks (prefix and question excluded)."""
    prefix_tokens: int = 0
    question_tokens: int = 0
    question_scored: tuple[int, int] = (0, 0)
    """[start, end) of the question tokens whose NLL scores a chunk (`score_tokens`). Phase 2 runs
    the question up to `end` (all of it when compression observes it)."""
    n_documents: int = 0
    n_chunks: int = 0
    n_kept: int = 0
    chunk_tokens: int = 0
    """The chunk budget in force for this call."""
    split_documents: list[int] = field(default_factory=list)
    """Documents longer than the chunk budget, split at paragraph/sentence boundaries."""
    evicted_documents: list[int] = field(default_factory=list)
    """Documents none of whose chunks were kept."""
    p0: int = 0
    """Position of the first question token: prefix + longest kept chunk (PCW rule)."""
    kv_tokens: int = 0
    """Tokens in the merged KV handed to decoding (prefix + kept chunks, per layer and head)."""
    kv_bytes: int = 0
    """Bytes of that merged KV (keys and values, all layers), after compression/calibration."""
    kv_bytes_uncompressed: int = 0
    """Bytes the same kept chunks would take without per-chunk compression."""
    calibration_evicted: dict[int, int] = field(default_factory=dict)
    """Layer index → tokens per KV head removed by attention-bias calibration (outliers + fill)."""
    calibration_evicted_by_rule: dict[str, dict[int, int]] = field(default_factory=dict)
    """Rule label ("#0 middle layers 0-7") → layer → outliers that rule flagged per KV head (the
    most over heads). Every layer of every rule is listed, so a rule that never fires shows zeros."""
    new_tokens: int = 0
    finish_reason: str = ""
    """"stop" (EOS or stop string) or "length" (max_new_tokens reached)."""
    exceeds_window: bool = False
    """True when p0 + question + max_new_tokens exceeds the model's trained window."""
    store_bytes: int = 0
    """Bytes held by the memory tier after this call."""
    dtype: str = ""
    """The model's compute dtype (float32, bfloat16, ...), chosen per machine unless given."""
    attention_kernel: str = ""
    """How phases 1 and 2 attended: "sdpa" (torch's fused kernel), "matmul", "amx", "avx512", or the model's own
    backend ("eager", "flash_attention_2"); ParallelCompConfig.attention_kernel."""
    layer_kernel: str = ""
    """How the model's RMSNorms and SwiGLU gates ran: "c-avx512" (layer_kernel.py) or "torch";
    ParallelCompConfig.layer_kernel."""
    decode_kernel: str = ""
    """How one-token decode steps attended: "c-avx2" (decode_kernel.py) or "torch";
    ParallelCompConfig.decode_kernel."""
    packed_weight_bytes: int = 0
    """Bytes of the second copy of the linear weights, packed for oneDNN (packed_linear.py,
    ParallelCompConfig.pack_weights); 0 where they ran plain."""
    kernel_steps: int = 0
    """One-token steps that ran whole in one C call (decode_kernel.DecodeStep: a Llama-family
    model on the C kernels); the others ran through the model's modules."""
    step_head_tokens: int = 0
    """Question-suffix tokens the question step did not run: with one kept chunk, uncompressed and
    no calibration, their KV is what phase 2 ran behind that chunk at the same positions (a
    conversation's earlier turns, the template's "Question:", the question up to its last token)."""
    threads: int = 0
    """torch intra-op threads the run used."""
    chunk_seconds: float = 0.0
    """Splitting documents/context into chunks (tokenizing those not in the engine's memo,
    `reused_documents`) and keying them; 0 with corpus=. An engine's first call with documents
    also fingerprints the model for the keys here (store.model_identity: 0.12 s for SmolLM2-135M
    on a 2-core CPU)."""
    prefill_seconds: float = 0.0
    """Prefill (phase 1 or store hits, phase 2), scoring, eviction and compression of the chunks."""
    first_token_seconds: float = 0.0
    """The question's forward over the merged KV until the first new token (`ttft_seconds`);
    included in decode_seconds."""
    decode_seconds: float = 0.0

    @property
    def ttft_seconds(self) -> float:
        """Time to first token: from the call to the first new token, chunking included."""
        return self.chunk_seconds + self.prefill_seconds + self.first_token_seconds

    def to_dict(self) -> dict:
        """Every field, and `ttft_seconds` (the CLI's --json, the wrappers' stats)."""
        return {**asdict(self), "ttft_seconds": self.ttft_seconds}


@dataclass
class GenerationOutput:
    text: str
    chunks: list[ChunkReport]
    stats: RunStats
    token_ids: list[int] = field(default_factory=list)

    @property
    def kept_chunks(self) -> list[ChunkReport]:
        return [c for c in self.chunks if c.kept]

    def document_scores(self) -> dict[int, tuple[float, bool]]:
        """Per input document: (best score of a chunk holding it, whether any such chunk was kept)."""
        out: dict[int, tuple[float, bool]] = {}
        for chunk in self.chunks:
            for doc in chunk.documents:
                best, kept = out.get(doc, (float("inf"), False))
                out[doc] = (min(best, chunk.score), kept or chunk.kept)
        return out


@dataclass
class ScoreOutput:
    """Teacher-forced NLL of a target text given the kept chunks (`ParallelComp.score`)."""

    nll: float
    """Mean NLL per target token (perplexity = exp(nll))."""
    n_tokens: int
    token_nlls: list[float]
    chunks: list[ChunkReport]
    stats: RunStats
