"""`Corpus`: documents chunked and encoded once (`ParallelComp.encode`), asked many questions.

A corpus is a description, not a tensor holder: its chunks' token ids, where they come from, and
their keys in the engine's chunk KV store (store.py), which holds the phase-1 KV. A question with
`corpus=` looks every chunk up by key and runs only the question-dependent stages; a chunk the
store no longer holds (LRU eviction, a restart without a disk tier) is encoded again and reported
in the run's stats, so an answer never depends on what the store happens to hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chunking import Chunk
from .output import ReuseStats


@dataclass(frozen=True)
class Corpus:
    identity: str
    """Digest of the model identity the chunk keys were made for (store.model_identity)."""
    prefix_ids: tuple[int, ...]
    """The shared prompt prefix the chunks were encoded behind (template head + instruction)."""
    chunks: tuple[Chunk, ...]
    keys: tuple[str, ...]
    """Store key of each chunk behind `prefix_ids`."""
    n_documents: int
    chunk_tokens: int
    """The chunk budget the documents were packed with."""
    encode_seconds: float = 0.0
    bytes_held: int = 0
    """Bytes of this corpus's chunk KV in the store's memory tier right after `encode`."""
    encoding: ReuseStats = field(default_factory=ReuseStats)
    """What the chunk store did during `encode`: entries it dropped from memory to stay within
    `kv_store_bytes` (`store_evicted`) and from disk within `kv_store_disk_bytes`
    (`store_disk_evicted`), files it rejected, writes that failed. A question encodes this
    corpus's dropped chunks again, and reports it."""
    chunk_seconds: float = 0.0
    """Seconds the call that made this corpus spent chunking its documents."""
    chunking: ReuseStats = field(default_factory=ReuseStats)
    """What chunking the documents found (chunking.DocumentMemo): documents not tokenized again,
    those read from the disk tier, disk files rejected."""
    documents: tuple[str, ...] = ()
    """The documents' text, to chunk them again for a call that needs more room after its chunks
    (engine._chunk)."""

    def __repr__(self) -> str:  # the token ids of a 32K-token corpus would print 200 KB
        return (f"Corpus({self.n_documents} documents, {len(self.chunks)} chunks of <= {self.chunk_tokens} tokens, "
                f"{self.n_tokens} tokens, {self.encoded_chunks} encoded and {self.reused_chunks} reused in "
                f"{self.encode_seconds:.2f} s, {self.bytes_held / 2**20:.1f} MiB held)")

    @property
    def n_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def reused_documents(self) -> int:
        """Documents whose chunking the call that made this corpus did not compute again."""
        return self.chunking.reused_documents

    @property
    def encoded_chunks(self) -> int:
        """Chunks whose phase 1 ran during `encode` (the others were already in the store)."""
        return self.encoding.encoded_chunks

    @property
    def reused_chunks(self) -> int:
        return len(self.chunks) - self.encoded_chunks
