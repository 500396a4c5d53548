"""Chunk eviction (method.md §2): keep the K chunks whose question NLL is lowest.

Online: `TopK.offer` is called once per micro-batch, so at most K kept chunks (plus the
micro-batch being scored) are alive. Ties keep the earlier chunk. Kept chunks come back in
document order, whatever order they were scored in.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class TopK(Generic[T]):
    def __init__(self, k: int):
        self.k = k
        self._items: list[tuple[float, int, T]] = []

    def offer(self, score: float, index: int, item: T) -> list[int]:
        """Add one chunk; returns the indices evicted by this offer (possibly the new one)."""
        self._items.append((score, index, item))
        self._items.sort(key=lambda entry: (entry[0], entry[1]))
        evicted = self._items[self.k :]
        self._items = self._items[: self.k]
        return [index for _, index, _ in evicted]

    def kept(self) -> list[T]:
        """The kept items in document (index) order."""
        return [item for _, _, item in sorted(self._items, key=lambda entry: entry[1])]

    def kept_indices(self) -> set[int]:
        return {index for _, index, _ in self._items}
