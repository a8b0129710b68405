"""Engine calls padded to a few fixed shapes, with masks carrying the real lengths.

A CUDA graph replays the kernels it captured, on the addresses and shapes it captured them
with, so a graph call needs inputs and outputs of one shape in buffers that never move. The
exported graphs already allow it: they attend to every cache position the attention mask marks,
so a call can hand over, per request (batch row r), a cache of fixed capacity C and a window of
fixed length S, with the mask set to 1 for its cached positions [0, past_r) and its real window
tokens [C, C + n_r), 0 elsewhere:

    attention_mask [B, C + S]   past_kv [B, ..., C, ...]   input_ids / position_ids [B, S]   logit_rows [L]

Padded window positions are masked as keys, so the real rows see exactly what they would see in
an exact-size call; their own outputs are ignored. Batch rows no request fills attend to nothing.
Extra logit rows repeat the last real one.
Shapes are rounded up to powers of two, so the handful of shapes a decoding run meets get one
graph each. Written against the array-module interface, so the CPU can check the padding and the
masks token for token against exact-size calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from apd_deploy.runtime.engine import EngineCall

MIN_WINDOW, MAX_MIN_ROWS, MIN_CAPACITY = 16, 128, 256


def round_up(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclass(frozen=True)
class FixedShape:
    batch: int  # B
    window: int  # S
    rows: int  # L, the logit rows of the whole batch
    capacity: int  # C

    @classmethod
    def holding(cls, batch: int, window: int, rows: int, capacity: int) -> FixedShape:
        # Rows are rounded up to the window's size (up to MAX_MIN_ROWS) rather than on their own:
        # one row count per window size keeps the shapes of a run few (a graph and a session
        # each), and extra rows cost only their share of the vocabulary projection.
        window = round_up(window, MIN_WINDOW)
        return cls(round_up(batch, 1), window, round_up(rows, min(window, MAX_MIN_ROWS)), round_up(capacity, MIN_CAPACITY))

    @classmethod
    def for_calls(cls, calls: Sequence[EngineCall]) -> FixedShape:
        """The shape holding one engine call for the requests of `calls` (their logit rows together)."""
        rows = sum(call.ids.shape[-1] if call.rows is None else len(call.rows) for call in calls)
        return cls.holding(len(calls), max(call.ids.shape[-1] for call in calls), rows,
                           max(call.cache.capacity for call in calls))

    def dimensions(self) -> dict[str, int]:
        """Values of the graphs' symbolic dimensions (`manifest.json` inputs) at this shape."""
        return {"batch": self.batch, "seq_len": self.window, "total_len": self.capacity + self.window,
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
        b, s, c = shape.batch, shape.window, shape.capacity
        self.xp, self.shape = xp, shape
        self.arrays = {
            "input_ids": xp.zeros((b, s), dtype=np.int64),
            "position_ids": xp.zeros((b, s), dtype=np.int64),
            "attention_mask": xp.zeros((b, c + s), dtype=np.int64),
            "past_kv": xp.zeros((b, layers, 2, kv_heads, c, head_dim), dtype=kv_dtype),
            "logit_rows": xp.zeros((shape.rows,), dtype=np.int64),
        }
        # Index ranges the per-call writes compare against or copy from, so that a call moves no
        # index data from the host.
        self._arange = xp.arange(max(max_positions, c + s, b * s), dtype=np.int64)

    def write(self, calls: Sequence[EngineCall]) -> list[int]:
        """Write one engine call (each request's ids 1-D on the array module's device) into the
        inputs, a batch row per request; return each request's count of logit rows."""
        xp, inputs, c, s = self.xp, self.arrays, self.shape.capacity, self.shape.window
        offset, counts = 0, []
        for r, call in enumerate(calls):
            past, n = call.cache.length, call.ids.shape[-1]
            inputs["input_ids"][r, :n] = call.ids
            inputs["position_ids"][r, :n] = self._arange[past : past + n]
            mask = inputs["attention_mask"][r]
            xp.less(self._arange[:c], past, out=mask[:c])
            xp.less(self._arange[:s], n, out=mask[c:])
            if past:
                inputs["past_kv"][r, ..., :past, :] = call.cache.buffer[0, ..., :past, :]
            count = self._write_rows(offset, r * s, np.arange(n, dtype=np.int64) if call.rows is None else call.rows)
            offset += count
            counts.append(count)
        inputs["attention_mask"][len(calls) :] = 0  # batch rows no request fills attend to nothing
        inputs["logit_rows"][offset:] = inputs["logit_rows"][offset - 1]  # extra rows repeat the last real one
        return counts

    def _write_rows(self, offset: int, first: int, rows: np.ndarray) -> int:
        """Write one request's rows (window indices; its window starts at flat row `first`)."""
        out, count = self.arrays["logit_rows"][offset:], len(rows)
        start = contiguous_start(rows)
        if start is None:
            out[:count] = self.xp.asarray(rows + first)
        else:
            out[:count] = self._arange[first + start : first + start + count]
        return count
