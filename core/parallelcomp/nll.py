"""Target tokens' NLL from a causal LM's last hidden states, its head run in vocabulary slices
(phase 2: `prefill.question_nll`, Eq. 3 of arXiv 2502.14317 before averaging).

Phase 2 needs, for each chunk and scored question token, logsumexp(logits) − logits[target], not
the logits. When the model's own head made them, a reused 128K question held 65 chunks × 21 tokens
× 49,152 bf16 logits, 134 MB: above glibc's 32 MB mmap threshold, so every phase-2 forward faulted
a fresh mapping in, which cost more than the head's arithmetic, and `question_rows` split the
chunks over two forwards to bound that tensor (docs/performance.md, "The LM head in slices").

Here the head's matrix product runs over SLICE vocabulary columns at a time into one buffer, and
each slice is folded into a running log-sum-exp (the online softmax normalizer of Milakov and
Gimelshein, arXiv 1805.02867): in one C pass on AVX-512 BF16 (`layer_kernel.logsumexp_update`),
else as torch.logsumexp in fp32. Each target's logit is read from the slice that holds it. The
logits are the head's own bf16 (or fp32) values and the sums are fp32, as when the whole rows were
reduced; what is alive is rows × SLICE logits, whatever the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from . import layer_kernel
from .compat import same_code

SLICE = 4096
"""Vocabulary columns per slice. At 1,365 rows (a reused 128K corpus) 4,096 columns are 11 MB of bf16,
below the mmap threshold, so the buffer is reused from the heap (measured ad hoc: 2,048–8,192
columns within 10% of each other)."""


def plain_head(model) -> nn.Linear | None:
    """`model`'s LM head where its logits are nothing but `lm_head(last hidden states)`: its class's
    forward is, code for code, transformers' LlamaForCausalLM.forward (which Mistral, Qwen2, Qwen3,
    Phi-3, Gemma and others copy) and the head a bias-free nn.Linear. None otherwise (Gemma 2's
    soft-capped logits, Granite's scaled ones): phase 2 then takes the logits from the model."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head if same_code(type(model).forward, LlamaForCausalLM.forward) else None


@torch.inference_mode()
def token_nll(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """(R,) fp32: −log softmax(head(hidden[r]))[targets[r]] for the (R, D) rows `hidden` and
    their (R,) target ids."""
    weight = head.weight
    rows, vocab = hidden.shape[0], weight.shape[0]
    width = min(SLICE, vocab)
    buffer = torch.empty(rows * width, dtype=weight.dtype, device=hidden.device)
    lse = torch.full((rows,), float("-inf"), device=hidden.device)  # with `total`: the running maximum
    picked = torch.empty(rows, device=hidden.device)
    total = torch.zeros(rows) if layer_kernel.takes_logits(buffer.view(rows, width)) else None
    for start in range(0, vocab, width):
        stop = min(start + width, vocab)
        logits = torch.mm(hidden, weight[start:stop].t(), out=buffer[: rows * (stop - start)].view(rows, -1))
        if total is not None:
            layer_kernel.logsumexp_update(logits, lse, total)
        else:
            lse = torch.logaddexp(lse, torch.logsumexp(logits.float(), dim=-1))
        here = ((targets >= start) & (targets < stop)).nonzero()[:, 0]
        picked[here] = logits[here, targets[here] - start].float()
    if total is not None:
        lse += total.log()
    return lse - picked
