"""Documents → chunks of at most `budget` tokens (method.md §1.2, done by tokens, not characters).

Documents are packed in order, separated by `separator` (unless `pack` is False: then each
document starts its own chunks), and a document that fits is never split. A longer document is cut into pieces at the last paragraph break inside the budget, else
the last sentence end, else the last space; only a text with none of these is cut mid-word.

Whitespace never sits at a chunk edge: each document, and each piece of a split document, is
stripped, and the whitespace gap at a cut belongs to neither piece. A chunk's question NLL
(Eq. 3) therefore does not depend on where blank lines fall: the question suffix begins with
its own blank line, and a chunk ending in one made the first question token cost ~11 nats
instead of ~1 (issue #12, docs/method-fidelity.md). A piece's tokens are exactly the
tokenization of the text its span names, `text_ids(tokenizer, doc[span.start:span.end])`, and
everything between two spans of a document is whitespace. Pure Python; knows nothing about the
model.

Documents are data, never prompt structure: their text is tokenized with special tokens split
(`text_ids`), so a retrieved page that contains "<|im_end|>" or "<|im_start|>system"
reads as those characters, not as the control tokens that end a turn or open a new one (a
document could otherwise inject chat turns or an end of text into every question's prompt). The
question and history are the caller's own message and are tokenized as the chat template renders
them, as transformers does (prompts.py).

Tokenizing is most of the cost: 0.7–0.8 s for a 128K-token context on the project's AMX host,
about as long as the rest of a question over that corpus once its KV is reused (docs/store.md).
`DocumentMemo` keeps recent documents' pieces, so a call with the same documents again (a
retriever, an agent's corpus tool, a chain run again: the transparent store path) tokenizes only
the documents it has not seen; with a disk tier it keeps them there too (store.py,
`ChunkStore.pieces`), for the next process.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import warnings
import weakref
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace

from .errors import InputError
from .output import DocumentSpan, ReuseStats


@dataclass(frozen=True)
class Chunk:
    index: int
    token_ids: list[int]
    spans: tuple[DocumentSpan, ...]


@dataclass(frozen=True)
class _Piece:
    token_ids: list[int]
    span: DocumentSpan


def make_chunks(tokenizer, documents: list[str], budget: int, separator: str, pack: bool = True) -> list[Chunk]:
    return _pack(tokenizer, [p for i, doc in enumerate(documents) for p in _pieces(tokenizer, i, doc, budget)],
                 budget, separator, pack)


class DocumentMemo:
    """Recently chunked documents' pieces by their text and the chunk budget, least recently used
    first out once they hold more than `max_tokens` tokens (a longer document is not kept).
    Token ids are kept as 4-byte arrays. Pieces depend on the tokenizer too: one memo per engine.
    Thread-safe: calls chunk their documents before they queue for the engine's lock.

    With a `disk` (the engine's store.ChunkStore when it has a disk tier), a document this memo
    does not hold is looked up there before it is tokenized, and the documents it tokenized are
    written there at `flush`, so a fresh process over a stored corpus tokenizes nothing either."""

    def __init__(self, max_tokens: int, disk=None):
        self.max_tokens = max_tokens
        self._disk = disk
        self._tokenizer_id: str | None = None  # store.tokenizer_identity, on the first disk lookup
        self._docs: OrderedDict[tuple[bytes, int], list[tuple[array, DocumentSpan]]] = OrderedDict()
        self._unwritten: dict[tuple[bytes, int], tuple[str, str, list[tuple[array, DocumentSpan]]]] = {}
        self._tokens = 0
        self._lock = threading.Lock()

    def make_chunks(self, tokenizer, documents: list[str], budget: int, separator: str,
                    report: ReuseStats, pack: bool = True) -> list[Chunk]:
        """`make_chunks`; the documents found here or on disk (not tokenized again) are counted
        in `report.reused_documents`, those read from disk also in `report.store_disk_documents`."""
        pieces = []
        tokenizer_id = self._tokenizer(tokenizer) if self._disk is not None and tokenizer.is_fast else None
        for i, doc in enumerate(documents):
            key = (hashlib.sha256(doc.encode()).digest(), budget)
            with self._lock:
                kept = self._docs.get(key)
                if kept is not None:
                    self._docs.move_to_end(key)
            if kept is None and tokenizer_id is not None:
                kept = self._disk.pieces(tokenizer_id, doc, budget, report)
                if kept is not None:
                    report.store_disk_documents += 1
                    self._keep(key, kept)
            if kept is None:
                mine = _pieces(tokenizer, i, doc, budget)
                kept = [(array("i", p.token_ids), p.span) for p in mine]
                self._keep(key, kept)
                if tokenizer_id is not None:
                    with self._lock:
                        self._unwritten[key] = (tokenizer_id, doc, kept)
            else:
                report.reused_documents += 1
                mine = [_Piece(ids.tolist(), replace(span, document=i)) for ids, span in kept]
            pieces += mine
        return _pack(tokenizer, pieces, budget, separator, pack)

    def flush(self, report: ReuseStats) -> None:
        """Write the documents tokenized since the last flush to the disk tier (under the engine's
        lock, with the chunks: ParallelComp.write_behind)."""
        while True:
            with self._lock:
                if not self._unwritten:
                    return
                key = next(iter(self._unwritten))
                tokenizer_id, doc, kept = self._unwritten.pop(key)
            self._disk.keep_pieces(tokenizer_id, doc, key[1], kept, report)

    def _tokenizer(self, tokenizer) -> str | None:
        """store.tokenizer_identity, computed once; None (with a warning, once) for a tokenizer
        that cannot be serialized, such as one with a custom Python pre-tokenizer: its documents
        are then chunked in every process, and its chunk KV is still stored."""
        if self._tokenizer_id is None:
            from .store import tokenizer_identity

            try:
                self._tokenizer_id = tokenizer_identity(tokenizer)
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for custom components
                self._tokenizer_id = ""
                warnings.warn(f"KV store: documents' chunking is not kept on disk, since the tokenizer cannot be "
                              f"serialized to identify it ({err})", stacklevel=4)
        return self._tokenizer_id or None

    def _keep(self, key: tuple[bytes, int], pieces: list[tuple[array, DocumentSpan]]) -> None:
        tokens = sum(len(ids) for ids, _ in pieces)
        if tokens > self.max_tokens:
            return
        with self._lock:
            if key in self._docs:  # another thread chunked it meanwhile
                return
            self._docs[key] = pieces
            self._tokens += tokens
            while self._tokens > self.max_tokens:
                self._tokens -= sum(len(ids) for ids, _ in self._docs.popitem(last=False)[1])


def _pack(tokenizer, pieces: list[_Piece], budget: int, separator: str, pack: bool = True) -> list[Chunk]:
    """Consecutive pieces joined by `separator` into chunks of at most `budget` tokens; `pack`
    False: pieces of different documents never share a chunk."""
    sep_ids = text_ids(tokenizer, separator) if separator else []
    chunks: list[Chunk] = []
    ids: list[int] = []
    spans: list[DocumentSpan] = []
    for piece in pieces:
        joined = len(ids) + len(sep_ids) + len(piece.token_ids)
        if ids and (joined > budget or not pack and piece.span.document != spans[-1].document):
            chunks.append(Chunk(len(chunks), ids, tuple(spans)))
            ids, spans = [], []
        ids = ids + sep_ids + piece.token_ids if ids else list(piece.token_ids)
        spans.append(piece.span)
    if ids:
        chunks.append(Chunk(len(chunks), ids, tuple(spans)))
    return chunks


def _pieces(tokenizer, doc_index: int, text: str, budget: int) -> list[_Piece]:
    if not tokenizer.is_fast:
        raise InputError("splitting documents needs a fast (Rust) tokenizer with offset mappings")
    lo, hi = _strip(text, 0, len(text))
    enc = data_tokenizer(tokenizer)(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) <= budget:
        return [_Piece(list(ids), DocumentSpan(doc_index, lo, hi, complete=True))]
    offsets = [(a + lo, b + lo) for a, b in enc["offset_mapping"]]  # into `text`
    pieces, start = [], 0
    while start < len(ids):
        limit = min(start + budget, len(ids))
        while True:  # re-tokenizing a stripped piece can add a token at its edges: cut earlier then
            end = limit if limit == len(ids) else _cut(text, offsets, start, limit)
            a, b = _strip(text, offsets[start][0], offsets[end][0] if end < len(ids) else hi)
            piece_ids = text_ids(tokenizer, text[a:b])
            if len(piece_ids) <= budget:
                break
            if limit == start + 1:
                msg = f"chunk budget of {budget} tokens is too small to hold one word of document {doc_index}"
                raise InputError(msg)
            limit = max(start + 1, limit - (len(piece_ids) - budget))
        if piece_ids:  # a cut inside a long whitespace run leaves nothing to keep
            pieces.append(_Piece(piece_ids, DocumentSpan(doc_index, a, b, complete=False)))
        start = end
    return pieces


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of document text, special-token spellings included as plain characters."""
    return list(data_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


_DATA_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DATA_LOCK = threading.Lock()
_UNCOPYABLE = object()


def data_tokenizer(tokenizer):
    """A copy of `tokenizer` that splits special tokens (reads "<|im_end|>" as text), made once per
    tokenizer. A copy, not the call argument `split_special_tokens=True`: transformers applies that
    by setting a flag on the shared Rust tokenizer, so a prompt tokenized meanwhile in another
    thread lost its own control tokens (seen as different answers from concurrent calls).
    A tokenizer that cannot be copied (a custom Python component) is used as it is, with a warning.
    Tokens added to `tokenizer` later (`add_tokens`, `add_special_tokens`) make a new copy."""
    added = (len(tokenizer), tuple((t.content, t.special) for t in tokenizer.added_tokens_decoder.values()))
    with _DATA_LOCK:
        seen, data = _DATA_TOKENIZERS.get(tokenizer, (None, None))
        if seen != added:
            try:
                data = copy.deepcopy(tokenizer)
                data.split_special_tokens = True
            except Exception as err:  # noqa: BLE001 - tokenizers cannot pickle custom Python components
                msg = (f"the tokenizer cannot be copied ({err}), so control tokens spelled in documents (e.g. "
                       f"{tokenizer.eos_token!r}) are read as control tokens, not as text")
                warnings.warn(msg, stacklevel=2)
                data = _UNCOPYABLE
            _DATA_TOKENIZERS[tokenizer] = (added, data)
        return tokenizer if data is _UNCOPYABLE else data


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) narrowed to exclude leading and trailing whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _cut(text: str, offsets, start: int, limit: int) -> int:
    """The token index in (start + budget/2, limit] before which the text breaks most naturally."""
    best, best_rank = limit, -1
    for b in range(limit, start + max(1, (limit - start) // 2), -1):
        rank = _boundary_rank(text, offsets[b][0])
        if rank > best_rank:
            best, best_rank = b, rank
            if rank == 3:
                break
    return best


def _boundary_rank(text: str, c: int) -> int:
    """3 paragraph break, 2 sentence end or line break, 1 whitespace, 0 mid-word, at char c."""
    i, j = c, c
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while j < len(text) and text[j].isspace():
        j += 1
    gap = text[i:j]
    if gap.count("\n") >= 2:
        return 3
    if "\n" in gap or (gap and i > 0 and text[i - 1] in ".!?"):
        return 2
    return 1 if gap else 0


def validate_documents(documents, context, required: bool = True) -> list[str]:
    """The inputs as a list of non-empty strings, or an InputError saying what is wrong.

    With `required=False`, giving neither documents nor context yields [] (no context).
    """
    if documents is not None and context is not None:
        raise InputError("pass either documents=[...] or context='...', not both")
    if context is not None:
        if not isinstance(context, str):
            raise InputError(f"context must be a string, got {type(context).__name__}")
        documents = [context]
    if documents is None and not required:
        return []
    if documents is None:
        raise InputError("no documents: pass documents=[...] (one string per document) or context='...'")
    if isinstance(documents, str):
        raise InputError("documents must be a list of strings: for one long text pass [text] (generate, stream "
                         "and score also take context='...')")
    if not isinstance(documents, (list, tuple)):  # a dict's keys or a set's order are no corpus
        raise InputError(f"documents must be a list or tuple of strings, got {type(documents).__name__}")
    if not documents:
        raise InputError("documents is empty: pass at least one non-empty document")
    what = "context" if context is not None else "document {}"
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise InputError(f"{what.format(i)} is a {type(doc).__name__}, expected str")
        if not doc.strip():
            raise InputError(f"{what.format(i)} is empty or whitespace only; remove it")
        check_text(doc, what.format(i))
    return list(documents)


def check_question(question, what: str = "question") -> None:
    """Rule: a question (or a score target, `what`) is a non-blank string of valid Unicode text
    (`check_text`); else InputError."""
    if not isinstance(question, str):
        raise InputError(f"{what} must be a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError(f"{what} is empty")
    check_text(question, what)


def check_text(text: str, what: str) -> None:
    """Rule: text must be valid Unicode (encodable as UTF-8), so a lone surrogate such as '\\ud800'
    is refused, never replaced: InputError naming `what` and the character offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        msg = (
            f"{what} has a lone surrogate {text[err.start]!r} at character {err.start}, which is not valid "
            "Unicode text; decode its source with errors='replace' or remove that character"
        )
        raise InputError(msg) from None
