"""A preallocated KV cache: one buffer per request, cropped and extended by changing a length.

Layout matches the graphs' `past_kv` / `new_kv`: [layers, 2, batch, kv_heads, time, head_dim].
The engines take the whole buffer and read only its first `length` positions (the graph learns
that length from the attention mask), so nothing is copied or sliced on the way in.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, capacity: int, layers: int, kv_heads: int, head_dim: int, dtype: np.dtype, xp=np) -> None:
        # zeros, not empty: pages never written stay unallocated. At least one position, so that
        # even an empty cache has a real address to hand to an engine.
        self.buffer = xp.zeros((layers, 2, 1, kv_heads, max(capacity, 1), head_dim), dtype=dtype)
        self._capacity = capacity
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length

    def append(self, new_kv, count: int | None = None) -> None:
        """Write the first `count` (default: all) positions of `new_kv` after the cached ones."""
        count = new_kv.shape[-2] if count is None else count
        if self.length + count > self.capacity:
            raise ValueError(f"cache of capacity {self.capacity} cannot take {count} more after {self.length}")
        self.buffer[..., self.length : self.length + count, :] = new_kv[..., :count, :]
        self.length += count
