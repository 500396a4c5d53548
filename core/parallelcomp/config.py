"""`ParallelCompConfig`: every knob of the method, validated, with named presets.

Token budgets are in tokens of the model's own tokenizer. Defaults follow the paper and the
official code (method.md §5) unless a comment says otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .chunking import check_text
from .errors import ConfigError

Region = Literal["sink", "recent", "middle", "all"]
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Compute dtypes a model can be loaded in (`ParallelComp.from_pretrained(dtype=...)`, CLI --dtype)."""
MIN_CHUNK_TOKENS = 16
"""Fewest context tokens a chunk may hold, set (`chunk_tokens`) or derived from the window."""

DEFAULT_INSTRUCTION = (
    "Answer the question using only the documents below. Be brief and do not add explanations."
)


class CalibrationRule(BaseModel):
    """Evict attention-bias outliers in some layers at the question step (method.md §4, Eq. 8).

    Give the layers either as inclusive 0-based indices (`layers=(0, 7)`) or as a half-open
    fraction of depth (`depth=(0.0, 0.25)` → the first quarter of any model), so the paper's
    32-layer rules map onto any depth.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    region: Region
    layers: tuple[int, int] | None = None
    depth: tuple[float, float] | None = None
    threshold: float = Field(0.1, gt=0.0, le=1.0)
    """λ: a cached token whose attention from the last question rows exceeds this is evicted."""

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_explain(err, "CalibrationRule")) from None

    @model_validator(mode="after")
    def _one_layer_spec(self) -> CalibrationRule:
        if (self.layers is None) == (self.depth is None):
            raise ValueError("give exactly one of `layers=(first, last)` or `depth=(start, end)`")
        if self.layers is not None and not 0 <= self.layers[0] <= self.layers[1]:
            raise ValueError(f"layers={self.layers}: need 0 <= first <= last")
        if self.depth is not None and not 0.0 <= self.depth[0] < self.depth[1] <= 1.0:
            raise ValueError(f"depth={self.depth}: need 0 <= start < end <= 1")
        return self

    def layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based layer indices this rule covers in a model with `num_layers` layers."""
        if self.layers is not None:
            first, last = self.layers
            if last >= num_layers:
                raise ConfigError(
                    f"calibration rule names layers {first}..{last}, but the model has only "
                    f"{num_layers} layers (0..{num_layers - 1}); use depth=(start, end) fractions "
                    "to address layers independently of depth"
                )
            return list(range(first, last + 1))
        start, end = self.depth  # both ends rounded the same way, so adjacent rules never overlap
        return list(range(math.floor(start * num_layers + 0.5), math.floor(end * num_layers + 0.5)))


# The paper's best "Ours-calibration" (Tables 6/8 captions): 1-indexed layers 1-8 middle, 9-16
# recent, 25-32 sink of a 32-layer model, written as depth fractions.
PAPER_CALIBRATION_RULES = (
    CalibrationRule(region="middle", depth=(0.0, 0.25)),
    CalibrationRule(region="recent", depth=(0.25, 0.5)),
    CalibrationRule(region="sink", depth=(0.75, 1.0)),
)


class ParallelCompConfig(BaseModel):
    """All settings of one ParallelComp runtime. Invalid values raise `ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- chunking (method.md §1.2; we pack by tokens, never split mid-word) ---
    chunk_tokens: int | None = Field(None, ge=MIN_CHUNK_TOKENS, strict=True)
    """Most context tokens per chunk, at least MIN_CHUNK_TOKENS. None: the model's trained window
    minus the prompt prefix and `reserve_tokens`. Does not depend on an ordinary question, so a
    corpus chunks the same way for every question and its chunk KV can be reused (store.py)."""
    reserve_tokens: int | None = Field(None, gt=0, strict=True)
    """Window tokens left free after the longest chunk for the question and the answer when
    `chunk_tokens` is None. None: min(512, window / 8). A call whose question suffix (with the chat
    turns after the documents) plus `max_new_tokens` does not fit after the chunks gets chunks cut
    for twice, four times ... the reserve, up to half the window (engine._chunk_budgets), a corpus
    from `encode` too. Past that, late tokens run at positions past the trained window, reported
    in `RunStats.exceeds_window` with a warning."""
    keep_chunks: int = Field(3, ge=1, strict=True)
    """K, chunks kept after question-NLL scoring (paper default 3; 1 for retrieval tasks)."""
    document_separator: str = "\n\n"
    """Placed between documents packed into one chunk."""
    pack_documents: bool = Field(True, strict=True)
    """Pack consecutive documents into one chunk while they fit (the default). False: every
    document starts its own chunks (a longer one still splits), so a document's chunks, their store
    keys and their scores do not depend on the other documents or their order: a retriever that
    returns the same documents in another order or beside others hits the chunk store for all of
    them, and every document has a score of its own. The cost: more, shorter chunks, so phase 2
    scores more of them and the K kept chunks hold fewer tokens (docs/store.md, "The key")."""
    max_input_chars: int = Field(4_000_000, gt=0, strict=True)
    """Refuse larger inputs (about 1M tokens) with an error instead of running for hours."""
    memory_budget_bytes: int | None = Field(None, gt=0, strict=True)
    """Refuse a run whose estimated peak memory (guard.py: KV, micro-batch activations, decode
    cache) exceeds this. None: the memory free when the call starts (psutil; CUDA: free device memory)."""

    # --- prompt ---
    instruction: str = DEFAULT_INSTRUCTION
    use_chat_template: bool = Field(True, strict=True)
    """Wrap prefix/chunk/question in the tokenizer's chat template when it has one."""
    restate_instruction: bool = Field(False, strict=True)
    """Repeat the instruction after the documents, before the question, as long-context QA
    templates do (LongBench's question template). Off: on the SmolLM2 needle cases it did not
    change which chunk ranked first (docs/method-fidelity.md §6)."""
    history_after_documents: bool = Field(True, strict=True)
    """Where a chat history goes in a call with documents. True: the documents open the chat's
    first user turn and the later turns follow the chunks (prompts.documents_turn), the order of
    conversational RAG prompts; the chunks' prefix, and so their store keys, stay the same from
    turn to turn, and a conversation over one corpus encodes it once. False: the history precedes
    the question's turn, which holds the documents, so every turn encodes the corpus again; on
    SmolLM2-135M that answered more follow-up questions right, since the small model copies its
    previous answer when it sits just before the question; Qwen2.5-Coder-0.5B did not
    (docs/integrations.md, "A conversation over one corpus")."""

    # --- chunk scoring (method.md §2, Eq. 3) ---
    score_tokens: Literal["question", "suffix"] = "question"
    """Whose NLL ranks a chunk: "question", the tokens of the question text only (Eq. 3's X^q),
    or "suffix", every token after the chunk, template included (official code). The template's
    tokens ("\n\nQuestion:", end of turn, "assistant") carry no relevance and counting them
    cut the gold chunk's lead by ~40% on SmolLM2 needle cases (docs/method-fidelity.md §1)."""

    lexical_weight: float = Field(0.0, ge=0, allow_inf_nan=False, strict=True)
    """λ in nats: rank chunks by NLL − λ · (the question's BM25 match with the chunk ÷ the corpus's
    best match), computed over the model's token ids (lexical.py). 0: the question's NLL alone, as
    the paper. With SmolLM2-135M on SQuAD/HotpotQA distractors the NLL alone misses the gold chunk
    far more often than BM25 does; held-out numbers and the default's choice: docs/lexical-prior.md."""

    lexical_fold_case: bool = Field(False, strict=True)
    """Match the case-folded text: the terms are the token ids of the question's and each chunk's
    text after `str.casefold`. A BPE vocabulary splits one word differently by case (SmolLM2:
    " Confederation" is one token, " confederation" two), so with the ids as they are a question
    and a chunk can share a word and no term. Only read when `lexical_weight` > 0."""

    # --- prefill execution ---
    prefill_batch_tokens: int = Field(4096, gt=0, strict=True)
    """Micro-batch budget: phase 1 encodes chunks of up to this many tokens (rows × longest chunk;
    one forward per chunk, prefill.encode_chunks) before phase 2 scores the ones the store does not
    hold; phase 2 scores `prefill.question_rows` chunks per forward. On CPU a cold prefill is no
    faster at 8192 than at 2048 (measured with padded batches of chunks), while peak memory
    grows with it (128K tokens, disk tier only: 1,614, 2,072 and 2,421–3,068 MiB at 2048, 4096
    and 8192); a question over reused chunks is slower with fewer chunks per forward (16K: 3.84,
    3.39 and 2.80 s). 4096 is the middle. `python -m benchmarks prefill-scaling --batch-tokens
    2048 4096 8192`, README "Peak memory against the micro-batch". On a GPU, raising it batches
    more question rows in phase 2."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """None: flash_attention_2 on CUDA when installed, else sdpa."""
    attention_kernel: Literal["auto", "fused", "matmul", "amx", "avx512"] = "auto"
    """How an sdpa model attends in phase 1, to the prompt prefix and in phase 2: "fused" is torch's
    scaled_dot_product_attention; "matmul" is blocks of matmuls with a softmax (accumulated in
    fp32) between them, the arithmetic of transformers' eager attention (scores in the model's
    dtype); "amx" is attention_kernel.py's kernel on Intel AMX tiles (bf16 models on CPU, head
    sizes that are multiples of 64; compiled on first use), about twice the fused kernel's rate
    there; "avx512" is the same kernel's build for CPUs with AVX-512 BF16 but no AMX (AMD Zen 4
    and later), about 1.8 times the matmul kernel's rate there. "auto": amx or avx512 wherever
    one runs; else matmul for a bf16 model on a CPU whose native bf16
    GEMMs beat fp32 and where the matmul attention measures faster than the fused kernel
    (hardware.matmul_attention, measured once per machine): on AVX-512 BF16 without AMX the fused
    CPU kernel runs at its fp32 rate and the matmuls at about twice that; fused elsewhere. On
    "amx" the model's linear layers of at most 32 rows (the question step) also run on the tiles,
    reading each weight once (attention_kernel.linear; on SmolLM2's shapes, torch's results bit
    for bit), and in phase 2, which only scores the chunks, calls of up to 1 MB of x, and up to
    3,072 rows through a weight of at most 2 MB (attention_kernel.wider_linear). Chunk KV is stored under the kernel that made it
    (docs/hardware.md)."""
    layer_kernel: Literal["auto", "torch"] = "auto"
    """How a bf16 model's RMSNorms and SwiGLU gate run on CPU: "auto" runs layer_kernel.py's C
    kernels (one pass over memory each instead of eager torch's five to six; compiled on first use)
    on an x86-64 CPU with AVX-512 BF16 where they build, for modules whose forward is
    transformers' Llama formula; "torch" keeps the modules' own forward. They agree to a bf16
    rounding; chunk KV is stored under the choice (docs/hardware.md)."""
    pack_weights: bool = Field(True, strict=True)
    """Keep a bf16 model's linear weights on CPU a second time, packed once into oneDNN's blocked
    layout, so no call reorders them (packed_linear.py): on the AVX-512 BF16 host a phase-1 forward
    about 5% faster, at the cost of a second copy of the projection weights (SmolLM2-135M: 202.5
    MiB; `RunStats.packed_weight_bytes`). The outputs are torch's, bit for bit (checked per
    weight shape). Not on the "amx" attention kernel, whose own linear takes the calls of few rows."""
    decode_kernel: Literal["auto", "torch"] = "auto"
    """How an sdpa model's one-token decode steps attend on CPU: "auto" runs the C kernel of
    decode_kernel.py (fp32 arithmetic, the KV streamed once by all threads; compiled on first use
    by the system C compiler) on an x86-64 CPU with AVX2 and FMA, where it builds; "torch" keeps
    torch's SDPA split into key ranges. The tokens agree to rounding (docs/decode.md)."""

    # --- chunk KV store (store.py, docs/store.md) ---
    kv_store_bytes: int | None = Field(None, ge=0, strict=True)
    """Memory tier of the chunk KV store: an LRU of at most this many bytes. None: a third of the
    memory the KV lives in (the GPU's for a model on CUDA, else the machine's RAM). 0: no memory tier."""
    kv_store_dir: str | None = None
    """Disk tier: a directory of checksummed safetensors files shared by runs and processes. A
    path object is taken as its string, and a leading "~" as the home directory."""
    kv_store_disk_bytes: int | None = Field(None, gt=0, strict=True)
    """Disk tier budget; least recently used files are deleted above it. None: half of what the
    tier could occupy when the engine opens it (the bytes it holds plus the free space of its file
    system), so a store never fills the disk (docs/store.md)."""

    # --- per-chunk KV eviction, SnapKV-style (method.md §3) ---
    kv_budget_tokens: int | None = Field(None, gt=0, strict=True)
    """Context tokens kept per chunk, per layer and KV head. None: no compression."""
    kv_budget_ratio: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    """Alternative to `kv_budget_tokens`: keep this fraction of each chunk."""
    snap_observation: Literal["question", "last"] = "question"
    """Which question-step rows score a chunk's tokens: "question", the question text's own tokens
    (Eq. 6 sums over the query), or "last", the last `snap_window` tokens (official code), which
    with a chat template are mostly template tokens ('?', '<|im_end|>', 'assistant', ...). The
    question's rows kept a needle in more layers and heads (docs/method-fidelity.md §3)."""
    snap_window: int = Field(8, gt=0, strict=True)
    """w: with snap_observation="last", the last w question tokens score the context (code: 8)."""
    pool_kernel: int = Field(7, gt=0, strict=True)
    """Smoothing kernel over token scores (code: 7, must be odd)."""
    pooling: Literal["max", "avg"] = "max"
    gqa_reduce: Literal["mean", "max"] = "mean"
    """How the query heads sharing a KV head combine their scores (we select per KV head)."""

    # --- attention-bias calibration (method.md §4) ---
    calibration_rules: tuple[CalibrationRule, ...] = ()
    calibration_reference: Literal["per_chunk", "global"] = "per_chunk"
    """Regions measured inside each chunk (paper text) or over the merged sequence (official code)."""
    calibration_region_tokens: int = Field(100, gt=0, strict=True)
    """N: width of the sink and recent regions (paper App. C: 100)."""
    calibration_query_rows: int = Field(1, gt=0, strict=True)
    """r: last question rows whose attention is averaged (code default 1)."""
    calibrate_prefix: bool = Field(False, strict=True)
    """Make the shared prefix (BOS, system prompt, instruction) an eviction candidate, at the head
    of the first kept chunk, so it leads the sink region: the official code's regions are indices
    that start at BOS and the instruction (method.md §4). Off, the prefix is never evicted and
    the real attention sink always survives a sink rule. On in the paper-calibration presets."""

    @field_validator("kv_store_dir", mode="before")
    @classmethod
    def _directory(cls, value):
        if not isinstance(value, (str, os.PathLike)):
            return value
        if not os.fspath(value).strip():  # Path("") is the working directory
            raise ValueError("kv_store_dir is empty; pass a directory for the disk tier, or None for none")
        return os.path.expanduser(os.fspath(value))

    @field_validator("instruction", "document_separator")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        check_text(value, "the text")  # the tokenizer cannot encode lone surrogates
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ParallelCompConfig:
        if self.kv_budget_tokens is not None and self.kv_budget_ratio is not None:
            raise ValueError("set kv_budget_tokens or kv_budget_ratio, not both")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel={self.pool_kernel} must be odd so scores stay aligned")
        return self

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_explain(err)) from None

    @property
    def compresses(self) -> bool:
        return self.kv_budget_tokens is not None or self.kv_budget_ratio is not None

    def kv_budget_for(self, chunk_len: int) -> int:
        """Tokens to keep from a chunk of `chunk_len` tokens (≥ chunk_len means no eviction)."""
        if self.kv_budget_tokens is not None:
            return self.kv_budget_tokens
        if self.kv_budget_ratio is not None:
            return max(1, math.ceil(self.kv_budget_ratio * chunk_len))
        return chunk_len

    def replace(self, **changes) -> ParallelCompConfig:
        """A copy with `changes` applied and validated."""
        return ParallelCompConfig(**{**self.model_dump(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides) -> ParallelCompConfig:
        """A named preset (see `PRESETS`), optionally with overrides."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # Paper "Ours": K=3, no compression, no calibration (LongBench setting, App. C).
    "paper": {"keep_chunks": 3},
    # Paper: K=1 for retrieval tasks (needle, passkey, key-value lookup); one kept chunk is also
    # what a small model reads best (benchmarks/results: niah 16K 3/3 vs 2/3 with K=3).
    "paper-retrieval": {"keep_chunks": 1},
    # Ours: K=1 over 2048-token chunks. The kept chunk is a quarter of SmolLM2's window, so the
    # question reads 2K tokens instead of ~7.6K: RULER niah 16K/32K/64K, 5 samples each, the same
    # samples, 15/15 against 10/15 with window-sized chunks (benchmarks/results/quality/README.md).
    "retrieval": {"keep_chunks": 1, "chunk_tokens": 2048},
    # Ours: K=3 over 1024-token chunks, ranked with the BM25 prior (λ=2) over case-folded text
    # (docs/lexical-prior.md), for answers that lie in one paragraph among many. Same samples,
    # SmolLM2: SQuAD's gold paragraph kept in 30/30, 30/30 and 29/30 at 16K, 32K and 64K (28/30 at
    # 64K without folding, the same run's NLLs), against 28/30 and 25/30 at 16K and 32K with
    # `retrieval` plus the prior; niah 15/15 (benchmarks/results/qa-fold, qa-preset). Twice
    # `retrieval`'s chunks: twice the question rows a reused question runs through the model.
    "qa": {"keep_chunks": 3, "chunk_tokens": 1024, "lexical_weight": 2.0, "lexical_fold_case": True},
    # Paper "Ours-calibration": the three-rule set of Tables 6/8, λ=0.1, regions of 100 tokens.
    # The prefix is a candidate, as in the code the tables came from: there the sink region is the
    # first 100 (200 in e051ec0) tokens from BOS, and Table 6's collapse when sinks are evicted in
    # layers 1-8 (R.KV 2.2, R.Num 42.71) is what removing the real sink does (docs/method-fidelity.md).
    "paper-calibration": {"keep_chunks": 3, "calibration_rules": PAPER_CALIBRATION_RULES, "calibrate_prefix": True},
    # Paper "Ours-compression": SnapKV inside each chunk to about half the chunk
    # (2000/4000 of 4K/8K chunks, App. C), w=8, max-pool 7.
    "paper-compression": {"keep_chunks": 3, "kv_budget_ratio": 0.5},
    "paper-calibration-compression": {
        "keep_chunks": 3,
        "kv_budget_ratio": 0.5,
        "calibration_rules": PAPER_CALIBRATION_RULES,
        "calibrate_prefix": True,
    },
    # Ours: small chunks prefill faster on CPU (attention is quadratic in chunk length) and
    # compression halves the KV the question and decode attend to.
    "fast": {"keep_chunks": 3, "chunk_tokens": 2048, "kv_budget_ratio": 0.5},
}


def _explain(err: ValidationError, what: str = "ParallelCompConfig") -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{where}: {e['msg']}{got}")
    return f"invalid {what}: " + "; ".join(lines)
