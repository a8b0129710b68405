"""Engine calls padded to a few fixed shapes, with masks carrying the real lengths.

A CUDA graph replays the kernels it captured, on the addresses and shapes it captured them
with, so a graph call needs inputs and outputs of one shape in buffers that never move. The
exported graphs already allow it: they attend to every cache position the attention mask marks,
so a call can hand over a cache of fixed capacity C and a window of fixed length S, with the mask
set to 1 for the cached positions [0, past) and the real window tokens [C, C + n), 0 elsewhere:

    attention_mask [1, C + S]   past_kv [..., C, ...]   input_ids / position_ids [1, S]   logit_rows [L]

Padded window positions are masked as keys, so the real rows see exactly what they would see in
an exact-size call; their own outputs are ignored. Extra logit rows repeat the last real one.
Shapes are rounded up to powers of two, so the handful of shapes a decoding run meets get one
graph each. Written against the array-module interface, so the CPU can check the padding and the
masks token for token against exact-size calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from apd_deploy.runtime.kv_cache import KVCache

MIN_WINDOW, MAX_MIN_ROWS, MIN_CAPACITY = 16, 128, 256


def round_up(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclass(frozen=True)
class FixedShape:
    window: int  # S
    rows: int  # L
    capacity: int  # C

    @classmethod
    def holding(cls, window: int, rows: int, capacity: int) -> FixedShape:
        # Rows are rounded up to the window's size (up to MAX_MIN_ROWS) rather than on their own:
        # one row count per window size keeps the shapes of a run few (a graph and a session
        # each), and extra rows cost only their share of the vocabulary projection.
        window = round_up(window, MIN_WINDOW)
        return cls(window, round_up(rows, min(window, MAX_MIN_ROWS)), round_up(capacity, MIN_CAPACITY))

    @classmethod
    def for_call(cls, window: int, rows: np.ndarray | None, capacity: int) -> FixedShape:
        """The shape holding a call of `window` tokens asking for logits of `rows` (None: every row)."""
        return cls.holding(window, window if rows is None else len(rows), capacity)

    def dimensions(self) -> dict[str, int]:
        """Values of the graphs' symbolic dimensions (`manifest.json` inputs) at this shape."""
        return {"batch": 1, "seq_len": self.window, "total_len": self.capacity + self.window,
                "capacity": self.capacity, "logit_len": self.rows}


def contiguous_start(rows: np.ndarray) -> int | None:
    """rows[0] if `rows` is an increasing run of consecutive indices (every caller but Dream's
    diffusion asks for such a run), else None."""
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
        return int(rows[0])
    return None


class PaddedInputs:
    """The static input buffers of one fixed shape, and how a call is written into them."""

    def __init__(self, xp: ModuleType, shape: FixedShape, kv_dims: tuple[int, int, int], kv_dtype: np.dtype,
                 max_positions: int) -> None:
        layers, kv_heads, head_dim = kv_dims
        s, c = shape.window, shape.capacity
        self.xp, self.shape = xp, shape
        self.arrays = {
            "input_ids": xp.zeros((1, s), dtype=np.int64),
            "position_ids": xp.zeros((1, s), dtype=np.int64),
            "attention_mask": xp.zeros((1, c + s), dtype=np.int64),
            "past_kv": xp.zeros((layers, 2, 1, kv_heads, c, head_dim), dtype=kv_dtype),
            "logit_rows": xp.zeros((shape.rows,), dtype=np.int64),
        }
        # Index ranges the per-call writes compare against or copy from, so that a call moves no
        # index data from the host.
        self._arange = xp.arange(max(max_positions, c + s), dtype=np.int64)

    def write(self, ids, cache: KVCache, rows: np.ndarray | None) -> tuple[int, int]:
        """Write one call (ids [1, n] on the array module's device) into the inputs; return the
        number of real window positions and of real logit rows."""
        xp, inputs, c = self.xp, self.arrays, self.shape.capacity
        past, n = cache.length, ids.shape[1]
        inputs["input_ids"][:, :n] = ids
        inputs["position_ids"][0, :n] = self._arange[past : past + n]
        mask = inputs["attention_mask"][0]
        xp.less(self._arange[:c], past, out=mask[:c])
        xp.less(self._arange[: self.shape.window], n, out=mask[c:])
        if past:
            inputs["past_kv"][..., :past, :] = cache.buffer[..., :past, :]
        count = self._write_rows(np.arange(n, dtype=np.int64) if rows is None else rows)
        return n, count

    def _write_rows(self, rows: np.ndarray) -> int:
        out, count = self.arrays["logit_rows"], len(rows)
        start = contiguous_start(rows)
        if start is None:
            out[:count] = self.xp.asarray(rows)
        else:
            out[:count] = self._arange[start : start + count]
        out[count:] = int(rows[-1])  # extra rows repeat the last real one
        return count
