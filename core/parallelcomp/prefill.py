"""Two-phase parallel prefill (method.md §1.4, §9), exactly equal to encoding
`prefix + chunk + question` per chunk in one forward:

* the shared prefix's KV is encoded and stored once (`encode_prefix`);
* phase 1 (`encode_chunks`, question-independent): each chunk in its own forward behind the
  prefix, so every chunk reuses the positions P, P+1, … (PCW) and its KV, stored once, batch 1,
  depends on the chunk alone (no neighbour, no padding);
* phase 2 (`question_nll`, question-dependent): the question runs against each chunk's KV at
  positions P + L_c, …, giving the per-token NLL of Eq. 3. Each row's attention reads the prefix
  and its chunk where they are stored (no padded batch copy), so one forward can score many
  chunks (`question_rows`). Only the scored tokens' rows meet the LM head, in vocabulary slices
  where the model's head is a plain one (nll.py), never a chunk's full-vocabulary logits (method.md
  §7 item 12).

Because phase 1 does not see the question, a corpus's chunk KV is reused across questions
(store.py, `ParallelComp.encode`). So is the KV of the question suffix's head, the template tokens
before the question text (`Head`): phase 2 keeps it per chunk, and a later question with the same
head starts at its own first token (docs/store.md, "What a reused question costs").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from . import attention_kernel
from . import kv as kvops
from .chunking import Chunk
from .attention import Observer, causal_kernel, chunk_attention
from .compat import forward, last_hidden
from .nll import plain_head, token_nll


@dataclass
class EncodedChunk:
    chunk: Chunk
    kv: list[kvops.LayerKV]
    """The chunk's own tokens' KV (prefix excluded), batch 1."""
    last_logprobs: torch.Tensor
    """(V,) log-probabilities of the token after the chunk: scores the first question token."""

    head: Head | None = None
    """The question head's KV behind this chunk, when phase 2 reads it instead of running it."""

    @property
    def length(self) -> int:
        return len(self.chunk.token_ids)


@dataclass
class Head:
    """Question tokens behind one chunk that phase 2 ran: the template's "\n\nQuestion:", a
    conversation's earlier turns and the question text up to its last token. Their KV, at the
    positions right after the chunk, and the log-probabilities of the first question token after
    the tokens before it (`logprobs`, by that count: the end of the head, where phase 2 computed or
    carried them). They depend only on the prefix, the chunk and the ids, so a later question
    whose suffix begins with the same ids reads them instead of running them: a question with the
    same template head reads the head and the log-probabilities after it, a conversation's next
    turn the whole last turn up to its question's last token."""

    kv: list[kvops.LayerKV]
    logprobs: dict[int, torch.Tensor]
    """(V,) log-probabilities of the token after the first n tokens, by n."""

    @property
    def length(self) -> int:
        return kvops.n_tokens(self.kv)

    @property
    def last_logprobs(self) -> torch.Tensor | None:
        """The next token's log-probabilities after the whole head, or None where not known."""
        return self.logprobs.get(self.length)

    @property
    def nbytes(self) -> int:
        return kvops.n_bytes(self.kv) + sum(t.numel() * t.element_size() for t in self.logprobs.values())

    def cut(self, n: int) -> Head:
        """The head's first `n` tokens (a view of its KV), with the next token's log-probabilities where known."""
        return Head([(k[:, :, :n], v[:, :, :n]) for k, v in self.kv],
                    {n: self.logprobs[n]} if n in self.logprobs else {})


def micro_batches(chunks: list[Chunk], budget_tokens: int) -> Iterator[list[Chunk]]:
    """Consecutive chunks grouped so that rows × longest chunk ≤ budget_tokens (at least one): the
    chunks phase 1 encodes (one forward each) before the KV the store does not hold goes to phase 2
    (engine.score_chunks), which bounds the KV alive outside the store."""
    batch: list[Chunk] = []
    for chunk in chunks:
        longest = max([len(c.token_ids) for c in batch] + [len(chunk.token_ids)])
        if batch and longest * (len(batch) + 1) > budget_tokens:
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch


def question_rows(budget_tokens: int, question_tokens: int, sliced_head: bool) -> int:
    """Chunks phase 2 scores in one forward, at least one. With the LM head in vocabulary slices
    (`sliced_head`, nll.py) a question token costs only its activations, as a phase-1 token does:
    the phase-1 token budget in question tokens (at the default 4096 and a 31-token question, 132
    chunks, so a 128K corpus in one forward). Otherwise each question token also carries a row of
    vocabulary logits: a quarter of it. Fewer, larger forwards pay off on a CPU: on SmolLM2's
    projection shapes in bf16 on the AMX host (ad hoc, best of 5), a layer's GEMMs took 3.26 ms for
    693 rows and 4.05 ms for 1,365; in fp32 on the AVX2 host, 1K-row GEMMs ran at 69–128 GFLOP/s
    and 60-row ones at 38–76."""
    return max(1, budget_tokens // (1 if sliced_head else 4) // max(question_tokens, 1))


@torch.inference_mode()
def encode_prefix(model, prefix_ids: list[int], kernel: str = "sdpa") -> list[kvops.LayerKV]:
    """The prompt prefix's KV, batch 1, on the attention `kernel` of phase 1 (ParallelComp.attention_kernel)."""
    device = model.device
    if not prefix_ids:
        return _empty_kv(model)
    cache = kvops.to_cache([])
    ids = torch.tensor([prefix_ids], device=device)
    with causal_kernel(model, kernel):
        forward(model, ids, cache, position_ids=torch.arange(len(prefix_ids), device=device)[None])
    return kvops.from_cache(cache)


@torch.inference_mode()
def encode_chunks(model, prefix_ids: list[int], chunks: list[Chunk], kernel: str = "sdpa",
                  tiles: bool = False) -> list[EncodedChunk]:
    """Phase 1 for one micro-batch: per chunk one forward of [prefix ‖ chunk], causal, no mask.

    One forward per chunk, never a padded batch, makes a chunk's KV a function of the model, the
    prefix and the chunk: a batch's padded length changes how the kernels block a row's
    reductions (attention over the keys, the softmax), so the same chunk beside a longer one came
    out rounded otherwise (bf16 SmolLM2: KV up to 0.09 and next-token log-probabilities up to 0.3
    apart), and a chunk recomputed after a store miss no longer equalled the one a cold run had
    stored, which changed answers with what the store held. It costs a cold prefill 5–7% on the
    AVX-512 BF16 host (docs/performance.md, "One chunk per forward").

    The prefix (a few dozen tokens) is re-run with each chunk instead of read from its cache: with
    q_len == kv_len and no mask, sdpa and flash attention take their fused causal kernels, which
    on CPU is about 2× faster and far leaner than the explicit-mask path a prefix cache forces
    (measured on SmolLM2, 8K tokens: 17 s vs 32 s). Only the chunk's own KV is kept. `kernel`: the
    attention kernel (`attention.causal_kernel`, ParallelCompConfig.attention_kernel). `tiles`: keep
    each chunk's KV `Tiled` (kvops.split_rows) for the AMX kernel's phase 2.
    """
    device, p = model.device, len(prefix_ids)
    encoded = []
    for c in chunks:
        ids = torch.tensor([prefix_ids + c.token_ids], device=device)
        cache = kvops.to_cache([])
        with causal_kernel(model, kernel):
            logits = forward(model, ids, cache, torch.arange(ids.shape[1], device=device)[None], logits_to_keep=1)
        (kv,) = kvops.split_rows(cache, [(p, ids.shape[1])], tiles)
        encoded.append(EncodedChunk(c, kv, torch.log_softmax(logits[0, -1].float(), dim=-1)))
    return encoded


@torch.inference_mode()
def question_nll(
    model,
    prefix: list[kvops.LayerKV],
    encoded: list[EncodedChunk],
    question_ids: list[int],
    scored: slice,
    observe: Observer | None = None,
    kernel: str = "sdpa",
    head: int = 0,
) -> torch.Tensor:
    """Phase 2: (B, n) NLL of the question tokens `scored` (n of them) given each chunk (Eq. 3
    before averaging). Row i runs the question behind [prefix ‖ chunk i], both read in place
    (`attention.chunk_attention`); only the question tokens before the last scored one (or up to
    the last one `observe` needs) go through the model. `observe(row, layer, probs)` receives the
    question's attention (e.g. for KV compression). `kernel`: the attention kernel (ParallelComp.attention_kernel).

    `head`: how many leading question tokens are the question-independent head (the first scored
    token must follow it, and no `observe`). The rows carry the same number of leading question
    tokens in their `Head`, at most the head: all of it (with its last token's log-probabilities),
    a start of it (`Head.cut`) or none. The model runs from the first token they do not carry,
    behind [prefix ‖ chunk ‖ carried tokens], and each row's `head` becomes every token phase 2
    ran or carried (the question up to its last scored token) with the log-probabilities of the
    first scored one, for the caller to keep.
    """
    device, p = model.device, kvops.n_tokens(prefix)
    first, end, _ = scored.indices(len(question_ids))
    if head and (first != head or observe is not None):
        raise ValueError("a question head must end where the scored tokens start, without an observer")
    carried = {0 if e.head is None else e.head.length for e in encoded}
    if len(carried) != 1 or max(carried) > head or (head and head in carried and
                                                    any(e.head.last_logprobs is None for e in encoded)):
        raise ValueError("every row must carry the same number of question-head tokens, at most the head, "
                         "and the whole head with its last token's log-probabilities")
    skip = carried.pop()  # question tokens read from each row's head
    # The last scored token's own logits predict nothing scored: the model runs the tokens before
    # it. Compression may observe any question row, so it runs them all.
    q = len(question_ids) if observe is not None else end - 1
    lengths = torch.tensor([e.length + skip for e in encoded], device=device)
    positions = p + lengths[:, None] + torch.arange(q - skip, device=device)[None]
    question = torch.tensor([question_ids[skip:q]], device=device).expand(len(encoded), -1)
    causal = torch.ones(q - skip, q - skip, dtype=torch.bool, device=device).tril()[None, None]
    # logits predicting tokens max(first, skip + 1)…end-1, as rows of this forward
    rows = torch.arange(max(first, skip + 1) - 1 - skip, end - 1 - skip, device=device)
    contexts = [[e.kv] if e.head is None else [e.kv, e.head.kv] for e in encoded]
    kept = {} if head and skip < q else None  # layer → this forward's KV, (B, H_kv, q - skip, D) each
    targets = torch.tensor(question_ids[max(first, skip + 1) : end], device=device)
    nll = torch.empty(len(encoded), end - first, device=device)
    if first == skip:
        nll[:, 0] = torch.stack([-(e.head or e).last_logprobs[question_ids[first]] for e in encoded])
    lm_head = plain_head(model)  # or None: the model's own head makes the logits
    out = None  # the rows' last hidden states, or their logits
    if rows.numel() or observe is not None:  # compression observes even when no logits are needed
        with chunk_attention(model, prefix, contexts, observe, kernel, kept, q - skip), \
                attention_kernel.wider_linear():
            if lm_head is not None:
                out = last_hidden(model, question, positions, causal)[:, rows]
            else:
                out = forward(model, question, None, positions, causal, logits_to_keep=rows if rows.numel() else 1)
    if rows.numel():
        nll[:, end - first - len(targets) :] = _scored_nll(out, lm_head, targets)
    if kept is not None:
        # the first scored token's log-probabilities: row 0's logits, unless the rows carried them
        first_logits = (lm_head(out[:, 0]) if lm_head is not None else out[:, 0]) if skip < head else None
        for row, e in enumerate(encoded):
            ran = [(k[row : row + 1], v[row : row + 1]) for k, v in map(kept.get, sorted(kept))]
            kv = [(k.clone(), v.clone()) for k, v in ran] if e.head is None else \
                [(torch.cat([hk, k], 2), torch.cat([hv, v], 2)) for (hk, hv), (k, v) in zip(e.head.kv, ran)]
            logprobs = e.head.logprobs if first_logits is None else \
                {head: torch.log_softmax(first_logits[row].float(), dim=-1)}
            e.head = Head(kv, logprobs)
    return nll


def _scored_nll(out: torch.Tensor, lm_head: torch.nn.Linear | None, targets: torch.Tensor) -> torch.Tensor:
    """(B, n) fp32 NLL of `targets` (n,) in each of the B rows of `out`: (B, n, D) last hidden
    states under `lm_head` (its vocabulary in slices, nll.py), or (B, n, V) logits."""
    if lm_head is not None:
        return token_nll(out.reshape(-1, out.shape[-1]), lm_head, targets.repeat(len(out))).view(len(out), -1)
    nll = torch.empty(out.shape[:2], device=out.device)
    for row, logits in enumerate(out):  # one row at a time: no second (n, V) tensor for log-softmax
        logits = logits.float()
        nll[row] = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None])[:, 0]
    return nll


def _empty_kv(model) -> list[kvops.LayerKV]:
    """Zero-length KV for every layer, for prompts without a prefix (no BOS, no instruction)."""
    layers, heads, head_dim = kvops.layout(model)
    empty = torch.zeros(1, heads, 0, head_dim, dtype=model.dtype, device=model.device)
    return [(empty, empty) for _ in range(layers)]
