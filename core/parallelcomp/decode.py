"""Question prefill and token-by-token decoding over the merged KV (method.md §1.7).

Positions are explicit: the question starts at p0 (prefix + longest kept chunk, the PCW rule)
and every new token advances by one, while the cache keeps its own length. Sampling reuses
transformers' logits processors; EOS ids and string stops end generation here, in one place.

Speed (docs/decode.md): the engine hands in a preallocated cache (`kv.decode_cache`), and the
one-token steps run packed-GQA attention (`attention.packed_decode`; on CPU the C kernels of
decode_kernel.py for that attention and the projections, or for a Llama-family model the whole
step in one C call) for as long as the generator runs; all give the same tokens as a DynamicCache
with transformers' own sdpa, up to rounding.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterator

import torch
from transformers import (
    Cache,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .attention import packed_decode
from .compat import forward
from .decode_kernel import DecodeStep, one_row_linears


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    """> 1 discourages repeating question or answer tokens (CTRL-style, as in `model.generate`)."""

    def processors(self, eos_ids: set[int], prompt_tokens: int, constraint: LogitsProcessor | None = None,
                   device: torch.device | str = "cpu") -> LogitsProcessorList:
        """The grammar's mask first (`constraint`, grammar.GrammarProcessor), so no later step sees
        a disallowed token; EOS is never the first new token (official code: min_length =
        |question| + 1), so an answer is never empty; then the optional penalty and sampling
        warpers. `device`: where the logits are (the EOS ids are compared there)."""
        procs = LogitsProcessorList([constraint] if constraint is not None else [])
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_tokens, 1, sorted(eos_ids), device=device))
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@contextmanager
def one_token_steps(model, kernel: bool, causal: str = "") -> Iterator[None]:
    """The scope of decoding: packed one-query attention, and with `kernel` the C kernels of
    decode_kernel.py for one-token steps' attention and projections; `causal` ("matmul", "amx"
    or "avx512"): the question step's causal attention on that kernel (attention.packed_decode)."""
    with packed_decode(model, kernel, causal), one_row_linears(model) if kernel else nullcontext():
        yield


@torch.inference_mode()
def generate_tokens(
    model,
    cache: Cache,
    question_ids: list[int],
    p0: int,
    max_new_tokens: int,
    eos_ids: set[int],
    sampling: Sampling,
    question_step: ContextManager | None = None,
    constraint: LogitsProcessor | None = None,
    kernel: bool = False,
    whole_step: DecodeStep | None = None,
    causal: str = "",
    carried: int = 0,
) -> Iterator[int]:
    """Yield new token ids until EOS (not yielded) or `max_new_tokens`.

    `question_step` is entered around the question prefill only (attention calibration). The
    packed-GQA scope ends when the generator is exhausted or closed. `constraint`: a grammar's
    logits processor (grammar.GrammarProcessor), applied before every other. `kernel`: the
    one-token steps run the C kernels of decode_kernel.py (attention and projections) where they
    take the step's tensors. `whole_step`: one-token steps run in one C call where it takes them
    (decode_kernel.DecodeStep, over this `cache`), else through the model's modules. `causal`: the
    question step attends on that kernel ("matmul", "amx" or "avx512") where its mask allows
    (attention.packed_decode). `carried`: the first question tokens whose KV the cache already
    holds at their positions (engine._Context.head); the question step runs the rest.
    """
    device = model.device
    ids = torch.tensor([question_ids], device=device)
    positions = p0 + torch.arange(carried, len(question_ids), device=device)[None]
    processors = sampling.processors(eos_ids, len(question_ids), constraint, device)
    generator = None
    if sampling.temperature > 0 and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    history = ids
    with one_token_steps(model, kernel, causal):
        with question_step or nullcontext():
            logits = forward(model, ids[:, carried:], cache, positions)
        for step in range(max_new_tokens):
            scores = processors(history, logits[:, -1].float())
            if sampling.temperature > 0:
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            token_id = int(token)
            if token_id in eos_ids:
                return
            yield token_id
            if step + 1 == max_new_tokens:  # no step for a token that could only be followed by none
                return
            history = torch.cat([history, token], dim=1)
            positions = positions[:, -1:] + 1
            if whole_step is not None and whole_step.takes_step():
                logits = whole_step(token_id, int(positions[0, 0]))
            else:
                logits = forward(model, token, cache, positions)


class TextAssembler:
    """Turns generated token ids into text deltas, honouring string stops.

    Text that could still become a stop string, or an incomplete UTF-8 sequence, is held back
    until it is safe; a stop string and everything after it is never emitted. Emitted text can
    neither contain a stop nor end in the start of one, so each token only searches the text after
    the emitted part (held text plus the new token's): the cost per token is linear in the longest
    stop (GenerationSettings bounds stops to MAX_STOPS of MAX_STOP_CHARS characters).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._flush(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        return self._flush(safe - self._held(text, safe))

    def finish(self) -> str:
        """The held-back remainder once generation has ended."""
        return self._flush(len(self.text))

    def _held(self, text: str, end: int) -> int:
        """Length of the longest tail of text[emitted:end] that is a proper prefix of a stop."""
        longest = 0
        for s in self.stop:
            i = text.find(s[0], max(self.emitted, end - len(s) + 1), end)
            while i >= 0 and end - i > longest:  # candidates start with s[0], longest first
                if s.startswith(text[i:end]):
                    longest = end - i
                    break
                i = text.find(s[0], i + 1, end)
        return longest

    def _flush(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta
