"""Preallocated KV caches: cropped and extended by changing a length, never reallocated.

Layout matches the graphs' `past_kv` / `new_kv`: [batch, layers, 2, kv_heads, time, head_dim].
A request decoding alone owns a `KVCache` with a buffer of batch 1. Requests decoded together
(`scheduler.py`) each get a row of a `KVSlots` buffer, one per model, which holds a row per slot:
the rows of the requests in slots 0..b-1 are one contiguous block, handed to an engine as it is.
The engines read only the first `length` positions of a row (the graph learns each row's length
from the attention mask), so nothing is copied or sliced on the way in.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np


class KVCache:
    def __init__(self, capacity: int, layers: int, kv_heads: int, head_dim: int, dtype: np.dtype, xp=np) -> None:
        # zeros, not empty: pages never written stay unallocated. At least one position, so that
        # even an empty cache has a real address to hand to an engine.
        self.buffer = xp.zeros((1, layers, 2, kv_heads, max(capacity, 1), head_dim), dtype=dtype)
        self._capacity = capacity
        self.length = 0
        self.slots: KVSlots | None = None  # the shared buffer this cache is a row of, if any
        self.slot = 0

    @property
    def capacity(self) -> int:
        """Positions this cache may hold (a slot's row may be longer: it is sized for any request)."""
        return self._capacity

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length

    def append(self, new_kv, count: int | None = None) -> None:
        """Write the first `count` (default: all) positions of `new_kv` [1, ..., n, head_dim] after
        the cached ones."""
        count = new_kv.shape[-2] if count is None else count
        if self.length + count > self.capacity:
            raise ValueError(f"cache of capacity {self.capacity} cannot take {count} more after {self.length}")
        self.buffer[..., self.length : self.length + count, :] = new_kv[..., :count, :]
        self.length += count


class KVSlots:
    """One model's cache buffer for a batch: [slots, layers, 2, kv_heads, capacity, head_dim]."""

    def __init__(self, slots: int, capacity: int, kv_dims: tuple[int, int, int], dtype: np.dtype,
                 xp: ModuleType = np) -> None:
        layers, kv_heads, head_dim = kv_dims
        shape = (slots, layers, 2, kv_heads, max(capacity, 1), head_dim)
        self.xp = xp
        self.buffer = xp.zeros(shape, dtype=dtype)
        self.capacity = capacity

    def cache(self, slot: int, capacity: int) -> KVCache:
        """A cache on row `slot`, holding at most `capacity` positions."""
        if capacity > self.capacity:
            raise ValueError(f"a cache of {capacity} positions does not fit a slot of {self.capacity}")
        cache = KVCache.__new__(KVCache)
        cache.buffer, cache._capacity, cache.length = self.buffer[slot : slot + 1], capacity, 0
        cache.slots, cache.slot = self, slot
        return cache

    def move(self, cache: KVCache, slot: int) -> None:
        """Move `cache` (a row of this buffer) to row `slot`, which must be free."""
        self.buffer[slot, ..., : cache.length, :] = self.buffer[cache.slot, ..., : cache.length, :]
        cache.buffer, cache.slot = self.buffer[slot : slot + 1], slot


def stacked_past(caches: Sequence[KVCache], past_len: int):
    """The caches of one call as one [batch, ...] buffer whose first `past_len` positions per row
    are each cache's (and whatever follows, masked): for one cache its own buffer, for rows of
    consecutive slots of one KVSlots a view of them; otherwise their rows gathered into a buffer of
    `past_len` positions (the verifier's later chunks, which only the requests without a rejection
    yet make, skip slots)."""
    first = caches[0]
    if len(caches) == 1:
        return first.buffer
    slots = first.slots
    if slots is None or any(c.slots is not slots for c in caches):
        raise ValueError("caches decoded together must be rows of one KVSlots buffer")
    if all(c.slot == first.slot + i for i, c in enumerate(caches)):
        return slots.buffer[first.slot : first.slot + len(caches)]
    buffer = slots.buffer  # zeros below, not empty: the masked positions must hold finite numbers
    gathered = slots.xp.zeros((len(caches), *buffer.shape[1:4], max(past_len, 1), buffer.shape[5]), buffer.dtype)
    for i, cache in enumerate(caches):
        gathered[i, ..., : cache.length, :] = buffer[cache.slot, ..., : cache.length, :]
    return gathered
