"""The chunk KV store: phase-1 results (a chunk's KV behind the shared prefix, and the
log-probabilities of the token after it) kept across questions, calls and processes (docs/store.md).

Phase 1 never sees the question, and every chunk sits at the same positions behind the same
prefix (PCW, arXiv 2502.14317 Eq. 1-2), so its KV can be reused exactly whenever the model, the
prefix and the chunk's tokens are the same. The key is the SHA-256 of exactly that:

    "pc-chunk-kv/1" ‖ model identity ‖ prefix ids ‖ chunk ids

It is not chained over earlier chunks: a chunk hits in any document order and in any corpus.
Only uncompressed KV is stored; compression and calibration depend on the question. The memory
tier also keeps, with each chunk, the KV of the question heads phase 2 ran behind it (prefill.Head:
the template tokens before the question text, the same for every question).

Tiers:
* memory: an LRU bounded in bytes (`ParallelCompConfig.kv_store_bytes`; 0 turns it off);
* disk (optional, `kv_store_dir`): one immutable safetensors file per chunk at
  `<dir>/v1/<identity[:16]>/<key[:2]>/<key>.safetensors`, written to a temporary file and renamed
  into place, so readers in other processes never see a partial file. It is not fsynced: a cache
  file that a crash leaves torn fails its checks below and is recomputed. It is written behind:
  an entry the memory tier holds goes to disk at `flush` (the engine calls it after a call's
  last token, so writing never delays an answer) or when the memory tier drops it, whichever
  comes first; an entry the memory tier cannot hold is written at once. A file is used
  only after its format version, key, identity, token ids, tensor shapes and payload checksum
  (XXH3-128) all check out; anything else is deleted, counted in the run's stats and recomputed.
  A full or read-only directory costs a warning, never an answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
import uuid
import warnings
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError

from . import attention_kernel
from . import kv as kvops
from .output import DocumentSpan, ReuseStats
from .prefill import Head

Piece = tuple[array, DocumentSpan]
"""A piece of a document as chunking.DocumentMemo keeps it: its token ids (4-byte) and its span."""

KEY_VERSION = "pc-chunk-kv/1"
"""What a key and a model identity cover (chunk_key, model_identity); a new version would orphan
every stored file, where a new FORMAT has each one rejected, deleted and recomputed on its next hit."""
FORMAT = "pc-chunk-kv/3"
"""The file layout and how its KV was computed, checked on load: /2 checksums the payload with
XXH3-128 (/1: SHA-256); /3 holds KV encoded one chunk per forward (prefill.encode_chunks), where a
/2 file may hold KV rounded inside a padded batch."""

PIECES_FORMAT = "pc-doc-pieces/2"
"""What a document's pieces file holds, and what its key and identity cover (pieces_key): a new
version, e.g. for a change to how chunking.py cuts documents, makes every stored file miss.
/2: document text tokenized with special-token spellings as plain text (chunking.text_ids)."""


RESCAN_WRITES = 64
"""Writes after which the disk tier's size is scanned again rather than kept as a running total
(other processes may share the directory). A scan stats every file: 18 ms at 3,000 files here, so
scanning after every write made a cold run's writes quadratic in the directory's files."""

ABANDONED_WRITE_SECONDS = 3600
"""Age after which a temporary file in the disk tier is a write whose process died (a live write
renames its file into place within seconds); a directory scan deletes such files."""

HEADS_PER_CHUNK = 4
"""Question heads kept per chunk in the memory tier: one per prompt template, restated
instruction and conversation in use (engine.question_nll; a conversation's turn replaces the
head of the turn before it, `ChunkStore.keep_head`)."""


@dataclass
class Entry:
    """One chunk's phase-1 result."""

    kv: list[kvops.LayerKV]
    last_logprobs: torch.Tensor
    seconds: float
    """Time its phase 1 took (its share of the micro-batch): what a hit saves."""
    heads: dict[tuple[int, ...], Head] = field(default_factory=dict)
    """Question heads behind this chunk by their ids, oldest first (memory tier only)."""

    @property
    def own_bytes(self) -> int:
        """The chunk's KV and log-probabilities, without its question heads."""
        return kvops.n_bytes(self.kv) + self.last_logprobs.numel() * self.last_logprobs.element_size()

    @property
    def nbytes(self) -> int:
        return self.own_bytes + sum(h.nbytes for h in self.heads.values())


TILES = "amx-tiles"  # model_identity's "kv_layout" where chunks are kept kv.Tiled


def model_identity(model, attention: str, layers: str, tiles: bool = False) -> dict:
    """Everything a chunk's KV depends on besides the tokens: config, weights, dtype, device type,
    the attention kernel phase 1 ran (`attention`: the model's backend, or "matmul", "amx" or "avx512" for
    ParallelCompConfig.attention_kernel's), the layer kernel (`layers`: "torch" or
    layer_kernel.NAME), a C kernel's name followed by "@" and its source's digest
    (native.source_digest), transformers major.minor. Weights are fingerprinted by sampling
    each tensor at up to 65,536 evenly strided positions (exact for a changed checkpoint in
    practice; hashing every weight would cost seconds per GB). `tiles`: chunks are kept `Tiled`
    (engine._keeps_tiles), which the identity says as "kv_layout" so that no engine reads another
    layout's files."""
    import transformers

    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 65536)].float().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    # Not the directory the model was loaded from (`_name_or_path`), nor the transformers version
    # that saved it: a moved checkpoint keeps its stored KV, and placement by key on Ray workers
    # does not depend on a path.
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return {
        "format": KEY_VERSION,
        "config": json.dumps(cfg, sort_keys=True, default=str),
        "weights": digest.hexdigest(),
        "dtype": str(model.dtype),
        "device": model.device.type,
        "attn_implementation": attention,
        "layers": layers,
        "transformers": ".".join(transformers.__version__.split(".")[:2]),
    } | ({"kv_layout": TILES} if tiles else {})


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """SHA-256 of everything a document's pieces depend on besides its text and the budget: the
    fast tokenizer's full serialization (vocabulary, merges, normalizer, pre-tokenizer) and its
    class. Pieces do not depend on the model, so they are shared by every model with this tokenizer."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()


def pieces_identity(tokenizer_id: str) -> dict:
    return {"format": PIECES_FORMAT, "tokenizer": tokenizer_id}


def pieces_key(tokenizer_id: str, text: str, budget: int) -> str:
    h = hashlib.sha256(PIECES_FORMAT.encode())
    h.update(bytes.fromhex(tokenizer_id))
    h.update(struct.pack("<Q", budget))
    h.update(text.encode())
    return h.hexdigest()


def chunk_key(identity_hex: str, prefix_ids: list[int], chunk_ids: list[int]) -> str:
    h = hashlib.sha256(KEY_VERSION.encode())
    h.update(bytes.fromhex(identity_hex))
    for ids in (prefix_ids, chunk_ids):
        h.update(struct.pack("<I", len(ids)))
        h.update(struct.pack(f"<{len(ids)}i", *ids))
    return h.hexdigest()


class ChunkStore:
    """Memory LRU in front of an optional disk directory. Thread-safe use is the engine's job
    (it calls the store under the model lock)."""

    def __init__(self, memory_bytes: int, disk_dir: str | os.PathLike | None = None, disk_bytes: int | None = None):
        self.memory_bytes = memory_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None and disk_bytes is None:
            disk_bytes = _default_disk_budget(self.disk_dir)
        self.disk_bytes = disk_bytes
        self._disk_held: int | None = None  # the directory's bytes: its last scan plus this store's writes since
        self._writes_since_scan = 0
        self._lru: OrderedDict[str, Entry] = OrderedDict()
        self._unwritten: dict[str, tuple[dict, list[int], list[int]]] = {}  # held in memory, not yet on disk
        self._held = 0
        self._warned = False

    @property
    def bytes_held(self) -> int:
        """Bytes of KV in the memory tier."""
        return self._held

    @property
    def chunk_bytes(self) -> int:
        """Of `bytes_held`, the chunks' own KV and log-probabilities, without their question heads."""
        return sum(e.own_bytes for e in self._lru.values())

    @property
    def room(self) -> int:
        """Bytes the memory tier may still fill before it starts evicting."""
        return max(0, self.memory_bytes - self._held)

    def holds(self, key: str) -> bool:
        """Whether the memory tier holds `key`."""
        return key in self._lru

    def bytes_of(self, key: str) -> int:
        """Bytes the memory tier holds for `key` (0 when it holds nothing)."""
        entry = self._lru.get(key)
        return entry.nbytes if entry is not None else 0

    def get(self, key: str, identity: dict, prefix_ids: list[int], chunk_ids: list[int],
            report: ReuseStats, shape: tuple[int, int, int], device: torch.device | str = "cpu") -> Entry | None:
        """The stored entry for `key`, from memory or (verified) from disk; None on a miss, counted in
        `report.encoded_chunks` (the caller encodes it).
        `shape` = (layers, KV heads, head dim) the entry must have; `device`: the model's, where an
        entry read from disk is moved after it is verified."""
        entry = self._lru.get(key)
        if entry is not None:
            self._lru.move_to_end(key)
            report.reused_chunks += 1
            return entry
        entry = self._load(key, identity, prefix_ids, chunk_ids, report, shape, torch.device(device))
        if entry is None:
            report.encoded_chunks += 1
            return None
        report.reused_chunks += 1
        report.store_disk_hits += 1
        self._remember(key, entry, report)
        return entry

    def put(self, key: str, entry: Entry, identity: dict, prefix_ids: list[int], chunk_ids: list[int],
            report: ReuseStats) -> None:
        """Keep a newly encoded entry: in the memory tier, and on disk at the next `flush` (or when
        the memory tier drops it); at once when the memory tier does not hold it."""
        self._remember(key, entry, report)
        if self.disk_dir is None or os.path.isfile(self._path(key, identity)):
            return
        if key in self._lru:
            self._unwritten[key] = (identity, prefix_ids, chunk_ids)
        else:
            self._save(key, entry, identity, prefix_ids, chunk_ids, report)

    @property
    def unwritten(self) -> int:
        """Entries the memory tier holds that the disk tier does not yet (`flush` writes them)."""
        return len(self._unwritten)

    def flush(self, report: ReuseStats) -> None:
        """Write every entry the memory tier holds but the disk tier does not yet (oldest first)."""
        while self._unwritten:
            key = next(iter(self._unwritten))
            self._save(key, self._lru[key], *self._unwritten.pop(key), report)

    def head(self, key: str, head_ids: list[int]) -> Head | None:
        """The question head `head_ids` behind the chunk `key`, with the log-probabilities of the
        token after it, from a held `Head` that begins with those ids (an earlier question with the
        same template head); else the longest start of it that a held head shares (a
        conversation's next turn: its head begins with the last turn up to that turn's last
        question token), cut short of the last head token, whose logits phase 2 then computes;
        None when the memory tier holds neither the chunk nor a head that shares a token."""
        entry = self._lru.get(key)
        if entry is None:
            return None
        ids = tuple(head_ids)
        best, n = None, 0
        for held_ids, held in entry.heads.items():
            common = _common_start(held_ids, ids)
            if common == len(ids) and len(ids) in held.logprobs:
                return held.cut(len(ids))
            if min(common, len(ids) - 1) > n:
                best, n = held, min(common, len(ids) - 1)
        return best.cut(n) if best is not None else None

    def keep_head(self, key: str, head_ids: list[int], head: Head, report: ReuseStats) -> None:
        """Keep `head` with the chunk `key` if the memory tier holds that chunk (the last
        HEADS_PER_CHUNK heads per chunk; they leave with it and count in its bytes). `head_ids`:
        the question tokens phase 2 ran or carried, up to the question's last one. A held head
        whose ids up to its question `head` begins with is replaced by it: the last question with
        the same template head (which the new head serves as well), or a conversation's last turn,
        which the new one extends (a later turn asks as a plain user turn, as the history then
        renders it: prompts.build_prompt). A head that parts from this one before its question
        (another template's, a restated instruction) stays."""
        entry = self._lru.get(key)
        if entry is None:
            return
        heads, ids = entry.heads, tuple(head_ids)
        for held in [h for h in heads if _common_start(h, ids) >= min(heads[h].logprobs, default=len(h))]:
            self._held -= heads.pop(held).nbytes
        self._held += head.nbytes
        heads[ids] = head
        while len(heads) > HEADS_PER_CHUNK:
            self._held -= heads.pop(next(iter(heads))).nbytes
        self._lru.move_to_end(key)
        self._shrink(report)

    def clear(self) -> None:
        """Empty the memory tier, first writing what the disk tier still lacks (`flush`)."""
        self.flush(ReuseStats())
        self._lru.clear()
        self._held = 0

    # ------------------------------------------------------------------ memory tier

    def _remember(self, key: str, entry: Entry, report: ReuseStats) -> None:
        if entry.nbytes > self.memory_bytes:
            return  # larger than the whole budget: never held (reused from disk only)
        self._lru[key] = entry
        self._held += entry.nbytes
        self._shrink(report)

    def _shrink(self, report: ReuseStats) -> None:
        """Drop least recently used entries until the memory tier is within its budget."""
        while self._held > self.memory_bytes:
            key, dropped = self._lru.popitem(last=False)
            if key in self._unwritten:
                self._save(key, dropped, *self._unwritten.pop(key), report)
            self._held -= dropped.nbytes
            report.store_evicted += 1

    # ------------------------------------------------------------------ disk tier

    def _path(self, key: str, identity: dict) -> Path:
        return self.disk_dir / "v1" / identity_digest(identity)[:16] / key[:2] / f"{key}.safetensors"

    def _save(self, key, entry: Entry, identity, prefix_ids, chunk_ids, report: ReuseStats) -> None:
        meta = {"identity": json.dumps(identity, sort_keys=True), "seconds": repr(entry.seconds)}
        self._write(self._path(key, identity), key, _tensors(entry, prefix_ids, chunk_ids), meta, FORMAT, report)

    def _load(self, key, identity, prefix_ids, chunk_ids, report: ReuseStats, shape, device: torch.device
              ) -> Entry | None:
        if self.disk_dir is None:
            return None
        read = self._read(self._path(key, identity),
                          lambda meta, tensors: _check(meta, tensors, key, identity, prefix_ids, chunk_ids, shape),
                          report)
        if read is None:
            return None
        meta, tensors = read
        kv = [(tensors[f"k.{i}"].to(device), tensors[f"v.{i}"].to(device)) for i in range(shape[0])]
        if identity.get("kv_layout") == TILES:
            kv = [kvops.Tiled(k, v, len(chunk_ids)) for k, v in kv]
        return Entry(kv, tensors["last_logprobs"].to(device), float(meta["seconds"]))

    # ------------------------------------------------------------------ documents' chunking on disk

    def pieces(self, tokenizer_id: str, text: str, budget: int, report: ReuseStats) -> list[Piece] | None:
        """The pieces (token ids, span) `text` was cut into at `budget` tokens by a tokenizer with
        this identity (tokenizer_identity), read from the disk tier and verified; None when it
        holds none. Safe outside the engine's lock: it changes no state of this store."""
        if self.disk_dir is None:
            return None
        key, identity = pieces_key(tokenizer_id, text, budget), pieces_identity(tokenizer_id)
        read = self._read(self._pieces_path(key, identity),
                          lambda meta, tensors: _check_pieces(meta, tensors, key, identity, len(text), budget), report)
        if read is None:
            return None
        ids, pieces, at = read[1]["ids"].tolist(), [], 0
        for n, start, stop, complete in read[1]["pieces"].tolist():
            pieces.append((array("i", ids[at : at + n]), DocumentSpan(0, start, stop, bool(complete))))
            at += n
        return pieces

    def keep_pieces(self, tokenizer_id: str, text: str, budget: int, pieces: list[Piece], report: ReuseStats) -> None:
        """Write `text`'s pieces at `budget` to the disk tier (call under the engine's lock)."""
        if self.disk_dir is None:
            return
        key, identity = pieces_key(tokenizer_id, text, budget), pieces_identity(tokenizer_id)
        tensors = {"ids": torch.tensor([t for ids, _ in pieces for t in ids], dtype=torch.int32),
                   "pieces": torch.tensor([(len(ids), s.start, s.end, int(s.complete)) for ids, s in pieces],
                                          dtype=torch.int64)}
        meta = {"identity": json.dumps(identity, sort_keys=True), "budget": str(budget)}
        self._write(self._pieces_path(key, identity), key, tensors, meta, PIECES_FORMAT, report)

    def _pieces_path(self, key: str, identity: dict) -> Path:
        return self.disk_dir / "documents" / identity_digest(identity)[:16] / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ files

    def _write(self, path: Path, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], form: str,
               report: ReuseStats) -> None:
        """Write one file atomically (a temporary file renamed into place) with its checksum; a
        failed write costs a warning (once per store) and a count in `report`, never the answer."""
        from safetensors.torch import save_file

        start = time.perf_counter()
        meta = {"format": form, "key": key, **meta, "xxh3_128": _payload_checksum(tensors)}
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            written = tmp.stat().st_size
            os.replace(tmp, path)  # no fsync: durability is the checksum's job (docs/store.md, "Disk")
        except (OSError, SafetensorError) as err:  # safetensors reports its writer's I/O errors as its own type
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            report.store_write_errors += 1
            report.store_write_seconds += time.perf_counter() - start
            if not self._warned:
                self._warned = True
                warnings.warn(f"KV store: cannot write to {self.disk_dir} ({err}); answers go on without the "
                              "disk tier", stacklevel=3)
            return
        if self.disk_bytes is not None:
            report.store_disk_evicted += self._trim_disk(written, report)
        report.store_write_seconds += time.perf_counter() - start

    @staticmethod
    def _read(path: Path, check, report: ReuseStats) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """A file's metadata and tensors once `check(meta, tensors)` finds no reason against them;
        None when there is no file, or when there is a reason: the file is then deleted and the
        reason counted in `report.store_rejected`. A path that cannot be looked at (a directory
        without permission) is no file: the run recomputes, and a write there warns."""
        if not os.path.isfile(path):  # unlike Path.exists, False on EACCES rather than raising
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            reason = "unreadable"
        else:
            reason = check(meta, tensors)
        if reason is not None:
            report.store_rejected[reason] = report.store_rejected.get(reason, 0) + 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the disk budget (atime is often off)
        return meta, tensors

    def _trim_disk(self, written: int, report: ReuseStats) -> int:
        """After writing `written` bytes: above the disk budget, delete least recently used files down
        to 90% of it; returns how many. The directory is scanned (a stat per file) only when the
        running total passes the budget or after RESCAN_WRITES writes, which counts what other
        processes sharing the directory wrote or deleted, not after every write. A scan also
        deletes abandoned temporary files (counted as rejected, "abandoned write")."""
        self._writes_since_scan += 1
        if self._disk_held is not None and self._writes_since_scan < RESCAN_WRITES:
            self._disk_held += written
            if self._disk_held <= self.disk_bytes:
                return 0
        abandoned = _delete_abandoned_writes(self.disk_dir)
        if abandoned:
            report.store_rejected["abandoned write"] = report.store_rejected.get("abandoned write", 0) + abandoned
        files = _stored_files(self.disk_dir)
        total, deleted = sum(size for _, size, _ in files), 0
        self._writes_since_scan = 0
        if total > self.disk_bytes:
            for _, size, path in sorted(files):
                if total <= 0.9 * self.disk_bytes:
                    break
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # another user's file, a read-only directory: it stays, and counts
                    continue
                total -= size
                deleted += 1
        self._disk_held = total
        return deleted


def _common_start(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many first ids `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _stored_files(root: Path) -> list[tuple[float, int, Path]]:
    """(mtime, bytes, path) of every file of a disk tier: chunk entries and documents' pieces."""
    files = []
    for path in (*(root / "v1").glob("*/*/*.safetensors"), *(root / "documents").glob("*/*/*.safetensors")):
        try:
            st = path.stat()
        except OSError:  # deleted meanwhile, or not ours to look at
            continue
        files.append((st.st_mtime, st.st_size, path))
    return files


def _delete_abandoned_writes(root: Path) -> int:
    """Delete the temporary files (`_write`) older than ABANDONED_WRITE_SECONDS; returns how many."""
    deleted, cutoff = 0, time.time() - ABANDONED_WRITE_SECONDS
    for path in (*(root / "v1").glob("*/*/.*.tmp"), *(root / "documents").glob("*/*/.*.tmp")):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                deleted += 1
        except OSError:  # finished or deleted meanwhile, or not ours to delete
            continue
    return deleted


def _default_disk_budget(root: Path) -> int:
    """Half of what a disk tier could occupy: the bytes it holds plus the free space of its file
    system (of the nearest existing parent while the directory does not exist yet)."""
    existing = next(p for p in (root, *root.parents) if os.path.exists(p))
    held = sum(size for _, size, _ in _stored_files(root))
    return max(1, (held + shutil.disk_usage(existing).free) // 2)


def _tensors(entry: Entry, prefix_ids, chunk_ids) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(entry.kv):
        out[f"k.{i}"], out[f"v.{i}"] = layer[0].contiguous(), layer[1].contiguous()
    out["last_logprobs"] = entry.last_logprobs.contiguous()
    out["prefix_ids"] = torch.tensor(prefix_ids, dtype=torch.int32)
    out["chunk_ids"] = torch.tensor(chunk_ids, dtype=torch.int32)
    return out


def _payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """XXH3-128 over the tensors' names and bytes: it catches truncation, bit rot and torn writes at
    memory speed (docs/store.md, "Tiers"). Like any checksum kept in the file it guards, it is no
    defence against someone who can write the directory, so SHA-256 would add nothing but time."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, not a bytes copy
    return h.hexdigest()


def _check(meta, tensors, key, identity, prefix_ids, chunk_ids, shape) -> str | None:
    """None when the file is this entry, else the reason it must not be used."""
    if meta.get("format") != FORMAT:
        return "format"
    if meta.get("key") != key:
        return "key"
    if meta.get("identity") != json.dumps(identity, sort_keys=True):
        return "identity"
    layers, heads, dim = shape
    expected = {f"{kv}.{i}" for kv in "kv" for i in range(layers)} | {"last_logprobs", "prefix_ids", "chunk_ids"}
    if set(tensors) != expected:
        return "tensors"
    if tensors["prefix_ids"].tolist() != list(prefix_ids) or tensors["chunk_ids"].tolist() != list(chunk_ids):
        return "ids"
    tokens = len(chunk_ids)
    want = (1, heads, attention_kernel.tiled_tokens(tokens) if identity.get("kv_layout") == TILES else tokens, dim)
    if any(tuple(tensors[f"{kv}.{i}"].shape) != want for kv in "kv" for i in range(layers)):
        return "shape"
    if meta.get("xxh3_128") != _payload_checksum(tensors):
        return "checksum"
    return None


def _check_pieces(meta, tensors, key, identity, length: int, budget: int) -> str | None:
    """None when the file holds pieces of this text (`length` characters) at `budget`, else the
    reason. The checksum comes before the table's checks (a small file: cheap), so "shape" names
    a file written with a valid checksum over pieces that cannot be this text's."""
    if meta.get("format") != PIECES_FORMAT:
        return "format"
    if meta.get("key") != key:
        return "key"
    if meta.get("identity") != json.dumps(identity, sort_keys=True) or meta.get("budget") != str(budget):
        return "identity"
    if set(tensors) != {"ids", "pieces"}:
        return "tensors"
    if meta.get("xxh3_128") != _payload_checksum(tensors):
        return "checksum"
    ids, table = tensors["ids"], tensors["pieces"]
    if ids.dim() != 1 or table.dim() != 2 or table.shape[1:] != (4,) or not len(table):
        return "shape"
    end = 0
    for n, start, stop, complete in table.tolist():
        if not (0 < n <= budget and end <= start < stop <= length and complete in (0, 1)):
            return "shape"
        end = stop
    if int(table[:, 0].sum()) != len(ids) or (len(table) > 1 and bool(table[:, 3].any())):
        return "shape"
    return None
