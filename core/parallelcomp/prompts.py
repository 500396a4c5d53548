"""Split the prompt into the three token spans ParallelComp needs.

    prefix   = template head + instruction          (encoded once, shared by every chunk)
    chunk    = document text                        (one per chunk, see chunking.py)
    question = question + end of user turn + generation prompt

so that `prefix + chunk + question` is exactly the single prompt a chat model expects. Shared by
the engine and both framework integrations; knows nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import InputError

_SLOT = "<<<PARALLELCOMP_DOCUMENTS>>>"


@dataclass(frozen=True)
class PromptParts:
    prefix_ids: list[int]
    question_ids: list[int]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer,
    instruction: str,
    question: str,
    use_chat_template: bool,
    with_documents: bool = True,
    history: Sequence[Mapping[str, str]] = (),
) -> PromptParts:
    """Token ids of the shared prefix and of the question suffix.

    Without documents the question is the whole user turn and the instruction is left out.
    `history` ({"role", "content"} chat messages before the question's user turn: system
    messages, earlier turns) is rendered by the chat template ahead of that turn, so it sits in
    the shared prefix that every chunk sees; it needs a chat template.
    """
    if not with_documents:
        instruction = ""
    body = f"{instruction}\n\n{_SLOT}" if instruction else _SLOT
    tail = f"\n\nQuestion: {question}" if with_documents else question
    if use_chat_template and has_chat_template(tokenizer):
        messages = [*history, {"role": "user", "content": body + tail}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_SLOT) != 1:
            msg = "the tokenizer's chat template rewrites the message content; pass use_chat_template=False"
            raise InputError(msg)
        head, rest = text.split(_SLOT)
        return PromptParts(_encode(tokenizer, head), _encode(tokenizer, rest))
    if history:
        raise InputError("a chat history needs the tokenizer's chat template (use_chat_template=True)")
    head, _ = body.split(_SLOT)
    prefix = tokenizer(head, add_special_tokens=True)["input_ids"] if head or _adds_bos(tokenizer) else []
    return PromptParts(list(prefix), _encode(tokenizer, tail + "\nAnswer:" if with_documents else tail))


def build_continuation(tokenizer, target: str) -> PromptParts:
    """Plain continuation (no instruction, no template) for teacher-forced scoring."""
    prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return PromptParts(prefix, _encode(tokenizer, target))


def end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens the chat template puts right after a user turn (e.g. <|im_end|>, <|eot_id|>)."""
    if not has_chat_template(tokenizer):
        return set()
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may insist on more roles; EOS ids still apply
        return set()
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    tail = _encode(tokenizer, text.split(_SLOT, 1)[-1])
    return {next(t for t in tail if t in special)} if any(t in special for t in tail) else set()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
