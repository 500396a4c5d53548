"""Which worker holds which chunk: rendezvous (highest-random-weight) hashing on the chunk's
store key (store.chunk_key). Pure Python; knows nothing about Ray.

Every worker gets a pseudo-random weight H(key ‖ worker) per chunk and the heaviest owns it. The
owner depends only on the key and the set of workers, so the same document goes to the same
worker on every call and its KV stays in that worker's store; when a worker is lost, only its
chunks move, each to the next-heaviest worker (the runner-up), and the others stay where they are.
"""

from __future__ import annotations

import hashlib


def weight(key: str, worker: str) -> bytes:
    return hashlib.blake2b(f"{key}|{worker}".encode(), digest_size=8).digest()


def owner(key: str, workers: list[str]) -> str:
    return max(workers, key=lambda worker: weight(key, worker))


def assign(keys: dict[int, str], workers: list[str]) -> dict[str, list[int]]:
    """Worker → the chunk indices it owns, in document order (workers owning none are left out)."""
    plan: dict[str, list[int]] = {}
    for index in sorted(keys):
        plan.setdefault(owner(keys[index], workers), []).append(index)
    return plan
