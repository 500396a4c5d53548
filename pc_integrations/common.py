"""Framework-neutral glue shared by the LangChain and LlamaIndex wrappers (written once here):
document normalisation, the prompt-splitting rule, source attribution, and running the blocking
engine off the event loop. Imports no framework; framework objects are duck-typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from parallelcomp import GenerationOutput, InputError
from parallelcomp.guard import cancel_scope

CONTEXT_MARKER = "<<<QUESTION>>>"
"""In a single prompt string, text before the last marker is context and text after it is the
question (see `split_prompt`)."""


@dataclass(frozen=True)
class SourceDocument:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def normalize_documents(documents: Iterable[Any]) -> list[SourceDocument]:
    """str, LangChain `Document`, LlamaIndex node / `NodeWithScore`, or {"text"|"page_content": ...}."""
    if documents is None or isinstance(documents, (str, bytes)):
        raise InputError("documents must be a list (of str, Document or node objects)")
    out = []
    for i, doc in enumerate(documents):
        out.append(_one(i, doc))
    if not out:
        raise InputError("the corpus is empty: pass at least one document")
    return out


def _one(i: int, doc: Any) -> SourceDocument:
    if isinstance(doc, str):
        return SourceDocument(doc)
    if hasattr(doc, "page_content"):  # langchain_core.documents.Document
        return SourceDocument(doc.page_content, dict(doc.metadata or {}))
    node = getattr(doc, "node", doc)  # llama_index NodeWithScore → node
    if hasattr(node, "get_content"):
        meta = dict(getattr(node, "metadata", {}) or {})
        return SourceDocument(node.get_content(), meta)
    if isinstance(doc, dict) and isinstance(doc.get("text", doc.get("page_content")), str):
        text = doc.get("text", doc.get("page_content"))
        return SourceDocument(text, dict(doc.get("metadata", {})))
    raise InputError(f"document {i} has unsupported type {type(doc).__name__}; use str or a Document/node")


def split_prompt(prompt: str) -> tuple[str | None, str]:
    """(context, question) of one prompt string.

    Rule: if the prompt contains CONTEXT_MARKER, the text before its last occurrence is the
    context and the text after it the question. Otherwise the whole prompt is the question and
    there is no context. Nothing is ever truncated: a prompt too long for the model's window
    without a marker raises an InputError from the engine that says to add the marker or pass
    documents.
    """
    if CONTEXT_MARKER in prompt:
        context, question = prompt.rsplit(CONTEXT_MARKER, 1)
        return (context if context.strip() else None), question.strip()
    return None, prompt


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


def generation_info(output: GenerationOutput, sources: list[SourceDocument] | None) -> dict[str, Any]:
    """What every wrapper reports next to the text: sources, chunk reports and run statistics."""
    info: dict[str, Any] = {"stats": output.stats.to_dict(), "finish_reason": output.stats.finish_reason}
    if sources is not None:
        info["sources"] = attribution(output, sources)
        info["chunks"] = [
            {"index": c.index, "documents": list(c.documents), "n_tokens": c.n_tokens, "score": c.score, "kept": c.kept}
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

    threading.Thread(target=work, daemon=True, name="parallelcomp-worker").start()
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
