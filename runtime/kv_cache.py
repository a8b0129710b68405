"""A preallocated KV cache: one buffer per request, cropped and extended by changing a length.

Layout matches the graphs' `past_kv` / `new_kv`: [batch, time, layers, 2, kv_heads, head_dim].
Time is the outer axis after batch, so for batch 1 the cached prefix is a contiguous view that
goes to the engine without a copy.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, capacity: int, kv_shape: tuple[int, ...], dtype: np.dtype, xp=np) -> None:
        # zeros, not empty: the pages stay untouched (and unallocated) until written. At least one
        # position, so that even an empty cache has a real address to hand to an engine.
        self.buffer = xp.zeros((1, max(capacity, 1), *kv_shape), dtype=dtype)
        self._capacity = capacity
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def past(self):
        return self.buffer[:, : self.length]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length

    def append(self, new_kv, count: int | None = None) -> None:
        """Write the first `count` (default: all) positions of `new_kv` after the cached ones."""
        count = new_kv.shape[1] if count is None else count
        if self.length + count > self.capacity:
            raise ValueError(f"cache of capacity {self.capacity} cannot take {count} more after {self.length}")
        self.buffer[:, self.length : self.length + count] = new_kv[:, :count]
        self.length += count
