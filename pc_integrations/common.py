"""Framework-neutral glue shared by the LangChain and LlamaIndex wrappers (written once here):
per-call settings, document normalisation, the one routing rule that turns a call into the
engine's question and corpus, source attribution, timeouts, and running the blocking engine off
the event loop. Imports no framework; framework objects are duck-typed.

Routing (`route`), in this order; `generation_info(...)["split"]` reports which rule applied:

1. `documents=[...]` given: the prompt is the question, each document one input (rule
   "documents"). A prompt that also contains CONTEXT_MARKER is an error.
2. The prompt contains CONTEXT_MARKER: text before its last occurrence is the corpus, text after
   it the question ("marker").
3. The prompt fits the model's window as a plain question: the model answers it alone
   ("question").
   A last turn that is not a user turn (an agent's tool result) and does not fit is the corpus
   whole, with the tool results since the last user message, and that message is the question
   ("result"), with the history before it: the chunks are scored by what the user asked,
   not by a piece of the result, and the model answers it over them (the assistant's tool calls
   are left out; a question already in the history would be copied, not scored).
4. Otherwise the prompt is a stuffed prompt and is never refused for length. Its question is the
   trailing part, found by the first of these that yields a non-empty question no longer than
   the question budget (a quarter of the window left after the rest of the prompt and
   max_new_tokens, and at most `chunk_tokens`):
   "label"     - the text after the last line-initial `Question:`, `Query:`, `Q:`, `User:`,
                 `Human:`, `Input:` or `Task:` label (or run of them: `Human: Question:`),
                 except a label inside the block below, up to a line-initial context label
                 (`Context:`, `Documents:`, `Sources:`, ...) that follows it; or, the question
                 first (LangChain's RAG prompt rlm/rag-prompt), the text between the last
                 question label before the first context label and that context label;
   "block"     - the text around the longest span between two equal delimiter lines (`-----`),
                 which is the corpus, when text follows the closing line (refine prompts);
   "lead"      - the instruction first, in a user turn that does not end in a question: a first
                 paragraph that ends with `:` or speaks of the text "below" or "following"
                 ("Write a concise summary of the following:"), with a last paragraph that ends
                 with `:` ("CONCISE SUMMARY:");
   "paragraph" - the last paragraph (text after the last blank line);
   "line"      - the last non-empty line;
   "sentence"  - the last sentence (text after the last `.`, `!` or `?` followed by a space);
   "tail"      - the longest run of trailing tokens within the budget.
   A trailing answer cue on its own line (`Answer:`, `Response:`, `Assistant:`, ...) is dropped
   from the question; everything else is the corpus, chunked like documents. The rules from
   "lead" on guess from the prompt's shape, so they warn (`StuffedPromptWarning`, shown once
   per rule as Python shows warnings).

Before these rules, a chat history that leaves no room in the window is fitted: while the prompt
around the documents (template, instruction, tool descriptions and history) and `max_new_tokens`
take more than half the window, the longest history message leaves the history and becomes one
more corpus document (metadata: its role and index). This is how a stuffed system message, as in LangChain's
`create_stuff_documents_chain` with `("system", "...{context}"), ("human", "{input}")`, or a long
tool result reaches the model: chunked, scored and evicted like any document. `split` then lists
the moved messages' indices under "moved_messages" (rule "history" when the last turn is a plain
question).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

from parallelcomp import GenerationOutput, InputError, ParallelComp, ParallelCompError, TextStream
from parallelcomp.grammar import OPEN, calls_so_far, holdback, new_call_id, parse_tool_calls
from parallelcomp.guard import cancel_scope, fits_window
from parallelcomp.prompts import PromptParts, check_history, has_chat_template
from parallelcomp.settings import GenerationSettings

CONTEXT_MARKER = "<<<QUESTION>>>"
"""In a single prompt string, text before the last marker is context and text after it is the
question (rule 2 of `route`)."""

SETTING_ALIASES = {"max_tokens": "max_new_tokens"}
"""LangChain/OpenAI-style names accepted for `GenerationSettings` fields."""
CALL_KEYS = ("documents", "timeout", "history", "role")
"""Per-call keyword arguments the wrappers take besides `GenerationSettings` fields."""


class StuffedPromptWarning(UserWarning):
    """A stuffed prompt's question was guessed from its shape (`route`, rules in `GUESSES`)."""


class GenerationTimeout(ParallelCompError, TimeoutError):
    """A call ran past its `timeout` (seconds); raise the timeout or lower max_new_tokens."""


class CallError(ParallelCompError, RuntimeError):
    """A rejected LlamaIndex LLM call. LlamaIndex's synthesizers catch ValueError and TypeError
    from the LLM and answer "Empty Response" instead; this error (the `InputError` or
    `ConfigError` is its `__cause__`) passes through them to the user."""


# ---------------------------------------------------------------------- settings


def by_name(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with each alias (`SETTING_ALIASES`) replaced by its field's name."""
    named = dict(kwargs)
    for alias, name in SETTING_ALIASES.items():
        if alias in named:
            if name in named:
                raise InputError(f"pass {name}= or its alias {alias}=, not both")
            named[name] = named.pop(alias)
    return named


def call_settings(defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine settings, wrapper options) of one call: `defaults` (the wrapper's fields)
    overridden by the call's `kwargs`, validated by `GenerationSettings` (typed `InputError`)."""
    kwargs = by_name(kwargs)
    names = set(GenerationSettings.names())
    unknown = sorted(set(kwargs) - names - set(CALL_KEYS))
    if unknown:
        accepted = [*GenerationSettings.names(), *SETTING_ALIASES, *CALL_KEYS]
        raise InputError(f"unexpected keyword argument(s) {unknown}; accepted: {accepted}")
    merged = {**{k: v for k, v in defaults.items() if k in names}, **{k: kwargs[k] for k in kwargs if k in names}}
    if "stop" in defaults and "stop" in kwargs:  # instance stops plus call stops
        stops = (GenerationSettings.of(stop=defaults["stop"]).stop, GenerationSettings.of(stop=kwargs["stop"]).stop)
        merged["stop"] = list(dict.fromkeys([*stops[0], *stops[1]]))
    settings = GenerationSettings.of(**merged)
    options = {k: kwargs.get(k, defaults.get(k)) for k in CALL_KEYS}
    options["role"] = options["role"] or "user"
    check_timeout(options["timeout"])
    options["history"] = check_history(options["history"])
    return settings.model_dump(), options


def check_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InputError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


# ---------------------------------------------------------------------- chat

def chat_call(engine: ParallelComp, turns: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """(prompt, extra call kwargs) of a chat given as (role, text) turns, roles from ROLES.

    The model answers after the last turn, whatever its role: a user question, a tool result an
    agent goes on from, or an assistant or system message (LangGraph asks for a structured
    response after the agent's last answer). With the tokenizer's chat template (and
    `use_chat_template`), the last turn's text is the question, rendered with its role, and the
    earlier turns are the `history`, so the prompt is the template's own rendering of the chat.
    Without one, the chat is flattened into one question: system texts, then the other turns as
    "User: ...", "Assistant: ...", "Tool: ...", the last one bare if it is a user turn, joined by
    blank lines. Documents are chunked either way; the routing rule applies to the question.
    """
    if not turns:
        raise InputError("no messages: pass at least one user message")
    role, text = turns[-1]
    if engine.config.use_chat_template and has_chat_template(engine.tokenizer):
        return text, {"history": [{"role": r, "content": t} for r, t in turns[:-1]], "role": role}
    return flatten_chat(turns), {}


def flatten_chat(turns: list[tuple[str, str]]) -> str:
    """A chat as one question string, for models without a chat template (`chat_call`)."""
    system = [t for r, t in turns[:-1] if r == "system"]
    earlier = [f"{r.title()}: {t}" for r, t in turns[:-1] if r != "system"]
    role, text = turns[-1]
    last = text if role == "user" else f"{role.title()}: {text}"
    return "\n\n".join(p for p in [*system, *earlier, last] if p.strip())


class ToolCallText:
    """An answer's text deltas split into content, passed on as it comes, and tool calls: text
    from the first `<tool_call>` marker on, or what may still become one, is held back from the
    content. Each call streams as it is decoded (`begun`, `call_deltas`: its id and name once the
    name is whole, then its arguments' JSON text as it grows; grammar.calls_so_far) and is parsed
    whole at the end (`finish`, grammar.parse_tool_calls), under the same id."""

    def __init__(self) -> None:
        self.text = ""
        self.emitted = 0
        self.ids: list[str] = []  # one per call block begun, in order
        self.sent: dict[int, int] = {}  # call block → characters of its arguments passed on (`call_deltas`)

    def feed(self, delta: str) -> str:
        """The content that is safe to show after `delta`."""
        self.text += delta
        first = self.text.find(OPEN)
        end = max(first if first >= 0 else len(self.text) - holdback(self.text), self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def begun(self) -> list[tuple[int, str, str, str]]:
        """(block index, id, name, arguments' JSON text so far) of each call whose name is whole."""
        calls = calls_so_far(self.text)
        self.ids += [new_call_id() for _ in range(len(calls) - len(self.ids))]
        return [(n, self.ids[n], *call) for n, call in enumerate(calls) if call is not None]

    def call_deltas(self) -> list[dict[str, Any]]:
        """What the calls' text added since the last time, as LangChain's tool-call chunks take it:
        {"index", "id" and "name" (the first time, else None), "args" (the text added)}."""
        deltas = []
        for n, call_id, name, arguments in self.begun():
            sent = self.sent.get(n)
            if sent is None or len(arguments) > sent:
                first = sent is None
                deltas.append({"index": n, "id": call_id if first else None, "name": name if first else None,
                               "args": arguments[sent or 0 :]})
                self.sent[n] = len(arguments)
        return deltas

    def finish(self) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        """(the rest of the content, calls, invalid calls), each with the id it streamed under."""
        self.begun()
        rest, calls, invalid = parse_tool_calls(self.text[self.emitted :], self.ids)
        return (rest.strip() if calls or invalid else rest), calls, invalid

    def last_deltas(self, calls: list[dict[str, Any]], invalid: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """After `finish`: the calls' last `call_deltas`, and whole each call that never streamed
        (its name was not found where the call format puts it; an invalid call keeps its text)."""
        block = {call_id: n for n, call_id in enumerate(self.ids)}
        deltas = self.call_deltas()
        deltas += [{"index": block[c["id"]], "id": c["id"], "name": c["name"], "args": json.dumps(c["arguments"])}
                   for c in calls if block[c["id"]] not in self.sent]
        deltas += [{"index": block[c["id"]], "id": c["id"], "name": None, "args": c["text"]}
                   for c in invalid if block[c["id"]] not in self.sent]
        return deltas


# ---------------------------------------------------------------------- documents


@dataclass(frozen=True)
class SourceDocument:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def normalize_documents(documents: Any) -> list[SourceDocument]:
    """str, LangChain `Document`, LlamaIndex node / `NodeWithScore`, or {"text"|"page_content": ...}."""
    if documents is None or isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Iterable):
        got = "None" if documents is None else type(documents).__name__
        raise InputError(f"documents must be a list (of str, Document or node objects), got {got}")
    out = [_one(i, doc) for i, doc in enumerate(documents)]
    if not out:
        raise InputError("the corpus is empty: pass at least one document")
    return out


def _one(i: int, doc: Any) -> SourceDocument:
    if isinstance(doc, str):
        return SourceDocument(doc)
    if hasattr(doc, "page_content"):  # langchain_core.documents.Document
        return SourceDocument(_text(i, doc.page_content), _metadata(i, doc.metadata))
    node = getattr(doc, "node", doc)  # llama_index NodeWithScore → node
    if hasattr(node, "get_content"):
        return SourceDocument(_text(i, node.get_content()), _metadata(i, getattr(node, "metadata", None)))
    if isinstance(doc, Mapping) and ("text" in doc or "page_content" in doc):
        return SourceDocument(_text(i, doc.get("text", doc.get("page_content"))), _metadata(i, doc.get("metadata")))
    raise InputError(f"document {i} has unsupported type {type(doc).__name__}; use str or a Document/node")


def _text(i: int, text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(f"document {i}: its text is a {type(text).__name__}, expected str")
    return text


def _metadata(i: int, metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InputError(f"document {i}: metadata must be a mapping (dict), got {type(metadata).__name__}")
    return dict(metadata)


# ---------------------------------------------------------------------- routing

_LABEL = re.compile(r"(?im)^[ \t>*#-]*(?:(?:question|query|q|user|human|input|task)[ \t]*:[ \t]*)+")
_CONTEXT_LABEL = re.compile(
    r"(?im)^[ \t>*#-]*(?:[a-z]+[ \t]+)?(?:context|documents?|sources?|passages?|texts?|articles?|excerpts?)[ \t]*:")
_LEAD = re.compile(r"(?is):\s*$|\b(?:below|following)\b")
GUESSES = ("lead", "paragraph", "line", "sentence", "tail")
"""Rules that take the question from the prompt's shape alone: each warns."""
_DELIMITER = re.compile(r"(?m)^[ \t]*([-=_*~#])\1{2,}[ \t]*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=\S)")
_ANSWER_CUE = re.compile(
    r"(?is)\n[ \t]*(answer|refined answer|new answer|response|output|assistant|ai|a)[ \t]*:[ \t]*$")


@dataclass(frozen=True)
class Route:
    """One call as the engine sees it: the question, the corpus (None: the model alone) and how
    the prompt was split."""

    question: str
    sources: list[SourceDocument] | None
    split: dict[str, Any]
    history: list[dict[str, str]]
    """The chat history left in the prompt (moved messages removed)."""
    role: str = "user"
    """The chat role of the question's turn."""


def route(
    engine: ParallelComp,
    prompt: Any,
    documents: Any = None,
    max_new_tokens: int = 256,
    history: list | None = None,
    tools: Iterable[Mapping] | None = None,
    role: str = "user",
) -> Route:
    """The one routing rule for every wrapper call (module docstring). `history`: the chat
    messages before the prompt's turn (the documents open its first user turn,
    `prompts.documents_turn`); `tools`: their description goes in the prompt prefix. `role`: the
    chat role of the prompt's turn (`chat_call`)."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
    history, moved = _fit_history(engine, history or [], tools, max_new_tokens, role)
    parts = functools.partial(engine.prompt_parts, history=history, tools=tools, role=role)

    def done(question: str, sources: list[SourceDocument] | None, rule: str, before=None, turn: str = role) -> Route:
        sources = [*(sources or []), *moved] or None
        split = {"rule": "history" if moved and rule == "question" else rule, "question_chars": len(question),
                 "context_chars": sum(len(s.text) for s in sources or [])}
        if moved:
            split["moved_messages"] = [s.metadata["message"] for s in moved]
        return Route(question, sources, split, history if before is None else before, turn)

    if documents is not None:
        if CONTEXT_MARKER in prompt:
            msg = f"the prompt contains {CONTEXT_MARKER!r} and documents= was given: pass the context one way only"
            raise InputError(msg)
        return done(prompt, normalize_documents(documents), "documents")
    if CONTEXT_MARKER in prompt:
        context, question = prompt.rsplit(CONTEXT_MARKER, 1)
        return done(question.strip(), [SourceDocument(context)] if context.strip() else None, "marker")
    alone = parts(prompt, False)
    if fits_window(engine.window, len(alone.prefix_ids), len(alone.question_ids), max_new_tokens):
        return done(prompt, None, "question")
    probe = parts("?", True)  # the prompt with a stand-in question: tokenized once
    limit = _question_budget(engine, probe, max_new_tokens)
    asked = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None) if role != "user" else None
    if asked is not None:  # a long tool result: the user's question over it, and over the results before it
        before, question = history[:asked], history[asked]["content"]
        asking = _question_budget(engine, engine.prompt_parts("?", True, history=before, tools=tools), max_new_tokens)
        if len(engine.prompt_parts(question, True, history=before, tools=tools).question_ids) <= asking:
            results = [SourceDocument(m["content"], {"role": m["role"]}) for m in history[asked + 1:] if m["role"] == "tool"]
            return done(question, [*results, SourceDocument(prompt, {"role": role})], "result", before, "user")
    overhead = len(probe.question_ids)
    for rule, context, question in _splits(engine, prompt, limit - overhead, lead=role == "user"):
        question = _strip_cue(question).strip()
        if question and context.strip() and len(parts(question, True).question_ids) <= limit:
            if rule in GUESSES:
                msg = (f"a prompt longer than the window had its question guessed from its shape (rule {rule!r}; "
                       "generation_info['split'] says how much was taken): if that is not the question, pass the "
                       "context as documents= or put the question after a 'Question:' label (docs/integrations.md)")
                warnings.warn(msg, StuffedPromptWarning, stacklevel=2)
            return done(question, [SourceDocument(context)], rule)
    raise InputError(f"no question of at most {limit - overhead} tokens could be found at the end of the prompt")


def _fit_history(engine: ParallelComp, history: list[dict[str, str]], tools, max_new_tokens: int, role: str
                 ) -> tuple[list[dict[str, str]], list[SourceDocument]]:
    """(history kept in the prompt, moved messages as documents): the longest messages move to
    the corpus while the prompt around the documents (prefix, later turns, template) and
    `max_new_tokens` take more than half the window."""
    kept = dict(enumerate(history))
    moved = []
    while kept:
        probe = engine.prompt_parts("?", True, history=list(kept.values()), tools=tools, role=role)
        if len(probe.prefix_ids) + len(probe.question_ids) + max_new_tokens <= engine.window // 2:
            break
        i = max(kept, key=lambda j: len(kept[j]["content"]))
        message = kept.pop(i)
        moved.append(SourceDocument(message["content"], {"role": message["role"], "message": i}))
    return list(kept.values()), sorted(moved, key=lambda s: s.metadata["message"])


def _question_budget(engine: ParallelComp, probe: PromptParts, reserve: int) -> int:
    """Most tokens of a question suffix: the suffix of `probe` (a stand-in question: template and
    the chat turns after the documents) plus, for the question itself, a quarter of the window
    that the prompt and `reserve` leave, and at most `chunk_tokens`."""
    fixed = len(probe.question_ids)
    limit = (engine.window - len(probe.prefix_ids) - fixed - reserve) // 4
    return fixed + (min(limit, engine.config.chunk_tokens) if engine.config.chunk_tokens else limit)


def _splits(engine: ParallelComp, prompt: str, tail_tokens: int, lead: bool) -> Iterator[tuple[str, str, str]]:
    """Candidate splits (rule, corpus, question), in rule order; "lead" only where `lead` (a user
    turn: a tool result that opens with "Results:" holds no instruction)."""
    block, body = _block(prompt), _strip_cue(prompt)
    labels = [m for m in _LABEL.finditer(prompt) if not (block and block[1] <= m.start() < block[2])]
    if labels:
        last = labels[-1]
        follows = _CONTEXT_LABEL.search(prompt, last.end())
        if follows is None:
            yield "label", prompt[: last.start()], prompt[last.end():]
        else:  # the question, then the context
            yield "label", prompt[: last.start()] + body[follows.start():], prompt[last.end(): follows.start()]
        opens = _CONTEXT_LABEL.search(prompt)
        asked = [m for m in labels if opens and m.end() <= opens.start()]
        if asked and asked[-1] is not last:  # the question first, a label inside the context after it
            yield "label", prompt[: asked[-1].start()] + body[opens.start():], prompt[asked[-1].end(): opens.start()]
    if block:
        before, inner, after = prompt[: block[0]], prompt[block[1]: block[2]], prompt[block[3]:]
        if after.strip():
            yield "block", inner, f"{before.strip()}\n{after.strip()}".strip()
    opening, _, rest = body.strip().partition("\n\n")
    if lead and rest.strip() and not body.rstrip().endswith("?") and _LEAD.search(opening):
        context, _, closing = rest.rstrip().rpartition("\n\n")
        if context.strip() and closing.endswith(":"):  # an instruction after the text too: "CONCISE SUMMARY:"
            yield "lead", context, f"{opening}\n{closing.strip()}"
        else:
            yield "lead", rest, opening
    for rule, cut in (("paragraph", body.rfind("\n\n")), ("line", body.rfind("\n"))):
        if cut > 0:
            yield rule, prompt[:cut], prompt[cut:]
    sentences = list(_SENTENCE_END.finditer(body))
    if sentences:
        yield "sentence", prompt[: sentences[-1].end()], prompt[sentences[-1].end():]
    encoded = engine.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    n = max(1, tail_tokens - 2)
    if len(offsets) > n:
        yield "tail", prompt[: offsets[-n][0]], prompt[offsets[-n][0]:]


def _block(prompt: str) -> tuple[int, int, int, int] | None:
    """(start of the opening delimiter line, start of the text, end of the text, end of the closing
    line) of the longest text between two equal delimiter lines (`-----`, `=====`, ...), as the
    templates of refine steps put their context: LlamaIndex's text refine prompt and LangChain's
    refine summarize chain ask with the query and the existing answer above the block and the
    instruction below it."""
    lines = list(_DELIMITER.finditer(prompt))
    pairs = [(a, b) for a, b in zip(lines, lines[1:]) if a.group().strip() == b.group().strip()]
    if not pairs:
        return None
    a, b = max(pairs, key=lambda p: p[1].start() - p[0].end())
    return a.start(), a.end(), b.start(), b.end()


def _strip_cue(text: str) -> str:
    return _ANSWER_CUE.sub("", text.rstrip())


class Run:
    """One routed engine run. Iterate `deltas()` for the answer text; the engine stream is closed
    when iteration ends or the consumer stops (so the engine is freed at once), and a run past
    `timeout` seconds raises `GenerationTimeout` (checked at every decoded token: a prefill in
    progress is not interrupted). Afterwards `output` and `info()` describe the run."""

    def __init__(self, engine: ParallelComp, prompt: Any, kwargs: Mapping[str, Any], defaults: Mapping[str, Any]):
        settings, options = call_settings(defaults, kwargs)
        self.route = route(engine, prompt, options["documents"], settings["max_new_tokens"], options["history"],
                           settings["tools"], options["role"])
        texts = None if self.route.sources is None else [s.text for s in self.route.sources]
        self.timeout = options["timeout"]
        self.started = time.monotonic()
        self.stream: TextStream = engine.stream(self.route.question, documents=texts, history=self.route.history,
                                                role=self.route.role, **settings)

    def deltas(self) -> Iterator[str]:
        try:
            for delta in self.stream:
                if self.timeout is not None and time.monotonic() - self.started > self.timeout:
                    msg = f"the call ran past timeout={self.timeout} s; raise it or lower max_new_tokens"
                    raise GenerationTimeout(msg)
                yield delta
        finally:
            self.stream.close()

    @property
    def output(self) -> GenerationOutput:
        return self.stream.output

    def info(self) -> dict[str, Any]:
        return {**generation_info(self.output, self.route.sources), "split": self.route.split}


def attribution(output: GenerationOutput, sources: list[SourceDocument]) -> list[dict[str, Any]]:
    """One record per input document, in input order: kept or evicted, score, metadata."""
    scores = output.document_scores()
    records = []
    for i, src in enumerate(sources):
        score, kept = scores.get(i, (float("nan"), False))
        chunks = [c.index for c in output.chunks if i in c.documents]
        records.append(
            {"index": i, "kept": kept, "score": score, "chunks": chunks, "metadata": src.metadata}
        )
    return records


def token_usage(stats: Mapping[str, Any]) -> dict[str, int]:
    """OpenAI-named token counts of a run's stats (`RunStats.to_dict()`): prompt tokens (prefix,
    every chunk and the question, before eviction) and completion tokens."""
    prompt = stats.get("prefix_tokens", 0) + stats.get("tokens_in", 0) + stats.get("question_tokens", 0)
    completion = stats.get("new_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generation_info(output: GenerationOutput, sources: list[SourceDocument] | None) -> dict[str, Any]:
    """What every wrapper reports next to the text: sources, chunk reports and run statistics."""
    info: dict[str, Any] = {"stats": output.stats.to_dict(), "finish_reason": output.stats.finish_reason}
    if sources is not None:
        info["sources"] = attribution(output, sources)
        info["chunks"] = [
            {"index": c.index, "documents": list(c.documents), "spans": [[s.document, s.start, s.end] for s in c.spans],
             "n_tokens": c.n_tokens, "score": c.score, "lexical": c.lexical, "kept": c.kept}
            for c in output.chunks
        ]
    return info


async def aiter_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread; yield its items without blocking the loop.

    The engine serialises runs with its own lock, so concurrent callers queue in their threads.
    An exception in the worker is re-raised here. When the consumer stops early (break,
    cancellation), the engine's run stops at its next token (a run still queued for the model
    does no work; `guard.cancel_scope`) and the worker closes the iterator, so the engine is
    freed for queued calls instead of decoding on to max_new_tokens for nobody.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    abandoned = threading.Event()

    def put(item, err) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, (item, err))

    def work() -> None:
        try:
            with cancel_scope(abandoned), contextlib.closing(make_iterator()) as items:
                for item in items:
                    if abandoned.is_set():
                        return
                    put(item, None)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting side
            put(done, err)
        else:
            put(done, None)

    # not a daemon: the interpreter exits after the run stops at its next token, not inside a
    # torch call of a thread it is tearing down (that aborted the process: "terminate called
    # without an active exception", when a server shut down with an async stream open)
    threading.Thread(target=work, name="parallelcomp-worker").start()
    try:
        while True:
            item, err = await queue.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        abandoned.set()
