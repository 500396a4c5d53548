"""Split the prompt into the three token spans ParallelComp needs.

    prefix   = template head + system message + instruction   (encoded once, shared by every chunk)
    chunk    = document text                                   (one per chunk, see chunking.py)
    question = later chat turns + question + end of turn + generation prompt

so that `prefix + chunk + question` is exactly the single prompt a chat model expects. Shared by
the engine and both framework integrations; knows nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from jinja2 import TemplateError

from .chunking import check_text
from .errors import InputError
from .grammar import tools_prompt

_SLOT = "<<<PARALLELCOMP_DOCUMENTS>>>"


@dataclass(frozen=True)
class PromptParts:
    prefix_ids: list[int]
    question_ids: list[int]
    question_span: tuple[int, int]
    """[start, end) of the `question_ids` that carry the question text itself: the tokens Eq. 3
    (I_c = -log P(X^q | X^c)) and Eq. 6 (the query's attention) are about. The rest of the
    suffix is template: "\n\nQuestion:", end of turn, generation prompt."""

    def scored(self, which: str) -> slice:
        """The question tokens whose NLL scores a chunk: "question" (the question text only)
        or "suffix" (every token after the chunk, as the official code does, method.md §2)."""
        return slice(*self.question_span) if which == "question" else slice(0, len(self.question_ids))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


ROLES = ("system", "user", "assistant", "tool")
"""Chat roles of `history`, as Hugging Face chat templates name them."""


def check_history(history: Any) -> list[dict[str, str]]:
    """Chat messages before the question's turn: {"role": one of ROLES, "content": str} each
    (None: none); InputError otherwise."""
    if history is None:
        return []
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Iterable):
        raise InputError(f"history must be a list of {{'role', 'content'}} messages, got {type(history).__name__}")
    out = []
    for i, m in enumerate(history):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"history message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
        check_text(m["content"], f"history message {i}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def build_prompt(
    tokenizer,
    instruction: str,
    question: str,
    use_chat_template: bool,
    with_documents: bool = True,
    history: Sequence[Mapping[str, str]] = (),
    restate_instruction: bool = False,
    tools: Sequence[Mapping] | None = None,
    role: str = "user",
    history_after_documents: bool = True,
) -> PromptParts:
    """Token ids of the shared prefix and of the question suffix.

    Without documents the question is the whole user turn and the instruction is left out.
    `history` ({"role", "content"} chat messages before the question's user turn: system
    messages, earlier turns) is rendered by the chat template ahead of that turn; it needs a chat
    template. With `history_after_documents` the documents go in the chat's first user turn
    (`documents_turn`), so a system message sits in the shared prefix that every chunk sees and
    the later turns follow the documents, in the question suffix: the prefix, and so every
    chunk's store key, stays the same from turn to turn of a conversation over one corpus
    (docs/integrations.md); without it, the whole history is in the prefix. With
    `restate_instruction`, the instruction is repeated after the documents, before the question,
    as long-context QA templates do (LongBench's "Now, answer the question based on ..."). A
    question asked after earlier turns that follow the documents is its own plain user turn,
    without "Question:" or the restated instruction, as the history renders it a turn later: the
    next turn's suffix then begins with all of this one, whose KV phase 2 keeps (docs/store.md).
    `tools` (OpenAI-style dicts) go to a chat template that declares them (`tools=`, Qwen2.5);
    otherwise `grammar.tools_prompt` describes them in a system message, or, without a chat
    template, at the start of the prompt. `role`: the chat role of the question's turn; an agent's
    chat that ends in a tool result (or an assistant or system message) is answered after that
    turn, rendered with its own role.
    """
    if not question.strip():
        raise InputError("question is empty")
    if role not in ROLES:
        raise InputError(f"role must be one of {ROLES}, got {role!r:.60}")
    history = check_history(history)
    texts = [("question", question), ("instruction", instruction), *((f"history message {i}", m["content"])
                                                                  for i, m in enumerate(history))]
    for what, text in texts:
        if _SLOT in text:
            raise InputError(f"the {what} contains {_SLOT!r}, which marks where the documents go; remove it")
    if not with_documents:
        instruction = ""
    body = f"{instruction}\n\n{_SLOT}" if instruction else _SLOT
    template_tools = None
    if tools and use_chat_template and has_chat_template(tokenizer):
        if "tools" in tokenizer.chat_template:
            template_tools = [dict(t) for t in tools]
        elif _takes_system(tokenizer):
            history = _with_system(history, tools_prompt(tools))
        else:  # Gemma-2 and Llama-2 style templates refuse a system message
            body = f"{tools_prompt(tools)}\n\n{body}"
    elif tools:
        body = f"{tools_prompt(tools)}\n\n{body}"
    restated = f"{instruction}\n\n" if restate_instruction and instruction else ""
    asked = f"{restated}Question: "
    tail = f"\n\n{asked}{question}" if with_documents else question
    if use_chat_template and has_chat_template(tokenizer):
        first = documents_turn(history, role) if with_documents and history_after_documents else None
        if first is None:
            messages = [*history, {"role": role, "content": body + tail}]
        else:  # the documents open the conversation; this turn asks after the earlier ones, as the
            # plain turn the next call's history will render it, so that call's suffix repeats this one's
            tail = question
            opened = {"role": "user", "content": f"{body}\n\n{asked}{history[first]['content']}"}
            messages = [*history[:first], opened, *history[first + 1:], {"role": role, "content": tail}]
        text = _render(tokenizer, messages, template_tools)
        if text.count(_SLOT) != 1 or tail not in text:
            msg = "the tokenizer's chat template rewrites the message content; pass use_chat_template=False"
            raise InputError(msg)
        head, rest = text.split(_SLOT)
        question_ids, span = _encode_marking(tokenizer, rest, rest.rindex(tail) + len(tail) - len(question), question)
        return PromptParts(_encode(tokenizer, head), question_ids, span)
    if history or role != "user":
        raise InputError("a chat history or a turn role other than user needs the tokenizer's chat template "
                         "(use_chat_template=True)")
    head, _ = body.split(_SLOT)
    prefix = tokenizer(head, add_special_tokens=True)["input_ids"] if head or _adds_bos(tokenizer) else []
    suffix = tail + "\nAnswer:" if with_documents else tail
    question_ids, span = _encode_marking(tokenizer, suffix, len(tail) - len(question), question)
    return PromptParts(list(prefix), question_ids, span)


def documents_turn(history: Sequence[Mapping[str, str]], role: str = "user") -> int | None:
    """Index of the `history` message whose user turn the documents open: the first user
    message, when the question is a user turn; None puts them in the question's own turn.

    Conversational RAG prompts put the context before the chat history (LangChain's
    `("system", "...{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")`,
    LlamaIndex's context chat engines). Here it also keeps the chunks' prefix (template head,
    system message, instruction) from changing as the conversation grows."""
    if role != "user":
        return None
    return next((i for i, m in enumerate(history) if m["role"] == "user"), None)


def _render(tokenizer, messages: list[Mapping[str, str]], tools: list[dict] | None) -> str:
    """The chat template's text for `messages`; InputError naming the roles when the template
    refuses them (many insist on alternating user/assistant turns, or have no system or tool role)."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:
        roles = ", ".join(m["role"] for m in messages)
        msg = (f"the tokenizer's chat template refuses this chat (roles: {roles}): {err}. Send turns this "
               "model's template accepts (for example, merge a system message into the first user message, "
               "or alternate user and assistant turns), or set ParallelCompConfig(use_chat_template=False): "
               "the chat wrappers then flatten the chat into one prompt")
        raise InputError(msg) from None


def _takes_system(tokenizer) -> bool:
    """Whether the chat template renders a system message before a user turn."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
    except TemplateError:
        return False
    return True


def _with_system(history: Sequence[Mapping[str, str]], text: str) -> list[Mapping[str, str]]:
    """`history` with `text` added to its system message (one is added first if it has none)."""
    if history and history[0]["role"] == "system":
        return [{**history[0], "content": f"{history[0]['content']}\n\n{text}"}, *history[1:]]
    return [{"role": "system", "content": text}, *history]


def build_continuation(tokenizer, target: str) -> PromptParts:
    """Plain continuation (no instruction, no template) for teacher-forced scoring."""
    prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    ids = _encode(tokenizer, target)
    return PromptParts(prefix, ids, (0, len(ids)))


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


def _encode_marking(tokenizer, text: str, start: int, question: str) -> tuple[list[int], tuple[int, int]]:
    """Encode `text`; also return the token span overlapping `question`, found at char `start`."""
    if not tokenizer.is_fast:
        raise InputError("finding the question's tokens needs a fast (Rust) tokenizer with offset mappings")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(question)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return list(enc["input_ids"]), (inside[0], inside[-1] + 1)


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
