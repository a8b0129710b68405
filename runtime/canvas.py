"""Per-request decoding state shared by every algorithm."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from apd_deploy.runtime.engine import EngineCall
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.sampling import Sampler


@dataclass
class Step:
    """What one decoding step did: `committed` tokens were decided, and the decided prefix of the
    generation grew by `tokens` (the same tokens, for left-to-right algorithms)."""

    committed: int
    tokens: np.ndarray  # on the host
    # The canvas positions decided, where they are not those of `tokens` (diffusion decides anywhere).
    positions: np.ndarray | None = None


@dataclass(frozen=True)
class Call:
    """What a decoder asks of the engine of `role`; it is resumed with (logits, new_kv)."""

    role: str
    call: EngineCall


@dataclass
class Canvas:
    """The sequence being generated: prompt followed by masks, filled in as decoding commits.
    `x` lives on the host; logits, drafts and sampling live on the engines' array module `xp`."""

    x: np.ndarray
    prompt_len: int
    mask_id: int
    vocab_size: int  # sampling is restricted to the ids both models know (the verifier's vocabulary)
    sampler: Sampler
    xp: ModuleType
    # A KV cache for the model of a role, of a capacity: the request's own (decoding alone) or
    # its row of the batch's shared buffer (decoding in a batch).
    new_cache: Callable[[str, int], KVCache]
    forwards: dict[str, int] = field(default_factory=lambda: {"dllm": 0, "verifier": 0})
    engine_seconds: dict[str, float] = field(default_factory=lambda: {"dllm": 0.0, "verifier": 0.0})

    @classmethod
    def start(cls, prompt: np.ndarray, max_new_tokens: int, mask_id: int, vocab_size: int, sampler: Sampler,
              new_cache: Callable[[str, int], KVCache]) -> Canvas:
        x = np.full(len(prompt) + max_new_tokens, mask_id, dtype=np.int64)
        x[: len(prompt)] = prompt
        return cls(x, len(prompt), mask_id, vocab_size, sampler, sampler.xp, new_cache)

    def run(self, role: str, ids, cache: KVCache, rows=None) -> Generator[Call, Any, tuple[Any, Any]]:
        """One engine call, counted per model: `logits, new_kv = yield from canvas.run(...)`, with
        logits for the window rows `rows` (all by default). Whoever drives the decoder makes the
        call, alone or batched with other requests' calls, and times it."""
        self.forwards[role] += 1
        return (yield Call(role, EngineCall(ids, cache, rows)))


Decoder = Generator["Call | Step", Any, None]  # yields engine calls and steps


class WindowedDLLM:
    """The dLLM with APD's KV window: each step recomputes x[left:right] over a cache of
    [0, left), and afterwards keeps the positions up to `curr - W + 1`, so that the next step
    recomputes the last W committed positions plus the newly committed ones."""

    def __init__(self, canvas: Canvas, kv_window: int) -> None:
        self.canvas, self.kv_window = canvas, kv_window
        self.cache = canvas.new_cache("dllm", len(canvas.x))
        self.left = 0
        self._new_kv = None

    def predict(self, curr: int, right: int, count: int | None = None):
        """Logits predicting positions curr..right-1 (only the first `count` of them if given) from a
        window that runs to `right`. Dream's logits are shifted: the output row of position j-1
        predicts token j (curr > left always, so row j-1 is in the window)."""
        self.cache.crop(self.left)
        first = curr - 1 - self.left
        rows = np.arange(first, first + (right - curr if count is None else count), dtype=np.int64)
        logits, self._new_kv = yield from self.canvas.run("dllm", self.canvas.x[self.left : right], self.cache, rows)
        return logits[:, : self.canvas.vocab_size]

    def advance(self, curr: int) -> None:
        """Call once per step with `curr`, the first position this step decided."""
        keep = max(curr - self.kv_window + 1, 0)
        self.cache.append(self._new_kv, keep - self.left)
        self.left = keep
