"""A bounded, thread-safe least-recently-used map: the one cache type of the MASS engine.

Why one class: the engine keeps three caches over task sets (set merges' non-matrix values, TSV-M cores, kept
dense weights). Each needs the same three things: a size bound, recency on every hit, and a lock that is never
held while a value is computed (a core or a dense weight takes milliseconds; serving threads must not queue
behind it). ``functools.lru_cache`` holds no explicit keys and cannot be peeked; this is the 40 lines it lacks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``size`` entries, and with ``max_bytes`` at most that many bytes as ``weigh`` counts them (the last
    entry stored always stays); the least recently used one goes first. Values are computed outside the lock: two
    threads that miss the same key at once both compute it, and the first one stored is what both get."""

    def __init__(self, size: int, *, max_bytes: int | None = None, weigh: Callable[[V], int] | None = None) -> None:
        if size < 1:
            raise ValueError(f"an LRU holds at least one entry, got size {size}")
        if (max_bytes is None) != (weigh is None):
            raise ValueError("an LRU bounded in bytes needs both max_bytes and weigh")
        self.size = size
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._weights: dict[K, int] = {}
        self.bytes = 0
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without touching its recency, or None."""
        return self._entries.get(key)  # one dict read: atomic, no lock needed

    def put(self, key: K, value: V) -> V:
        """Store ``value`` unless ``key`` is already there; return the stored one (first writer wins, so every
        thread shares one object) and evict beyond ``size``."""
        with self._lock:
            if key not in self._entries and self._weigh is not None:
                self._weights[key] = self._weigh(value)
                self.bytes += self._weights[key]
            kept = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size or (
                    self.max_bytes is not None and self.bytes > self.max_bytes and len(self._entries) > 1):
                old, _ = self._entries.popitem(last=False)
                self.bytes -= self._weights.pop(old, 0)
            return kept

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` (outside the lock) and stored on a miss."""
        found = self.get(key)
        return found if found is not None else self.put(key, make())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
