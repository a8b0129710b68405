"""What a request yields: its chunks as steps commit them, and its result at the end.

`Progress` turns one request's decoding steps into chunks and a `GenerationResult`, which its
`Generation` hands to whoever waits; the same code serves a request decoded alone
(`Runtime.stream`) and one decoded in a batch (`scheduler.py`), so both report alike.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apd_deploy.runtime.canvas import Canvas, Step
from apd_deploy.runtime.tokenizer import BundleTokenizer, TextStream

@dataclass
class GenerationResult:
    token_ids: list[int]  # the generated part only, up to and including the first EOS
    text: str | None
    steps: int
    accepted_per_step: list[int]
    dllm_forwards: int
    verifier_forwards: int
    seconds: float  # from the request's arrival (a batched request's includes its wait for a slot)
    tokens_per_second: float
    seed: int | None = None  # the seed used, to reproduce a sampled (T > 0) generation
    dllm_seconds: float = 0.0  # time inside the dLLM engine (a batched call counts for each request in it);
    verifier_seconds: float = 0.0  # the rest of `seconds` less the verifier's is host logic and waiting
    finish_reason: str = "length"  # 'stop' (an EOS), 'length' (max new tokens) or 'cancelled'
    first_chunk_seconds: float | None = None  # from arrival to the first committed tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Chunk:
    """Tokens committed by one step, and the text they add: "" while nothing printable has
    completed (part of a character), None without a tokenizer."""

    token_ids: list[int]
    text: str | None


_END = object()  # closes a generation's chunk queue


class Generation:
    """A request's generation: iterate for its chunks as steps commit them, `result()` for the
    whole generation, `cancel()` to stop it. Decoded alone (`Runtime.stream`), asking for a chunk
    runs the steps on the asking thread (`drive`: one step); submitted to a scheduler, a lane's
    thread runs them, and the handle may be used from any thread."""

    def __init__(self, request_id: int = 0, on_event: Callable[[Chunk | None], None] | None = None,
                 on_cancel: Callable[[Generation], None] | None = None, drive: Callable[[], None] | None = None) -> None:
        self.id = request_id
        self._on_event, self._on_cancel, self._drive = on_event, on_cancel, drive
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False  # set by `cancel`: the next step ends the request

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            while self._drive is not None and self._chunks.empty() and not self.done:
                self._drive()
            if (chunk := self._chunks.get()) is _END:
                break
            yield chunk
        self._chunks.put(_END)  # iterated again, it ends at once
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished generation (its `finish_reason` is 'cancelled' after `cancel()`); raises
        the error that ended the request, or TimeoutError after `timeout` seconds."""
        while self._drive is not None and not self.done:
            self._drive()
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop the request at its next step; its slot and cache rows go to the next request. A
        request still queued ends at once and gives up its place in the queue."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def push(self, chunk: Chunk) -> None:
        self._chunks.put(chunk)
        if self._on_event is not None:
            self._on_event(chunk)

    def finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._chunks.put(_END)
        if self._on_event is not None:
            self._on_event(None)


class Progress:
    """One request's generation so far: tokens up to the first EOS, and what each step decided."""

    def __init__(self, canvas: Canvas, eos_ids: frozenset[int], tokenizer: BundleTokenizer | None,
                 chunk_text: bool, arrived: float | None = None, ignore_eos: bool = False, min_tokens: int = 0) -> None:
        self.canvas, self.tokenizer = canvas, tokenizer
        self.eos_ids = frozenset() if ignore_eos else eos_ids
        self.min_tokens = min_tokens
        self.arrived = time.perf_counter() if arrived is None else arrived
        self.generated: list[int] = []
        self.decided: list[np.ndarray] = []  # the canvas positions each step decided
        self.pieces = TextStream(tokenizer) if chunk_text and tokenizer is not None else None
        self.stopped = False  # an EOS was generated: nothing after it is returned
        self.first_chunk_seconds: float | None = None

    def push(self, step: Step) -> Chunk:
        start = self.canvas.prompt_len + len(self.generated)
        self.decided.append(step.positions if step.positions is not None else np.arange(start, start + step.committed))
        tokens = step.tokens.tolist()
        eos_at = next((i for i, t in enumerate(tokens)
                       if t in self.eos_ids and len(self.generated) + i >= self.min_tokens), None)
        if eos_at is not None:
            tokens = tokens[: eos_at + 1]
            self.stopped = True
        self.generated += tokens
        if tokens and self.first_chunk_seconds is None:
            self.first_chunk_seconds = time.perf_counter() - self.arrived
        if self.pieces is None:
            return Chunk(tokens, None)
        return Chunk(tokens, (self.pieces.push(tokens) if tokens else None) or "")

    def rest(self) -> Chunk | None:
        """A last chunk without tokens for the text still held back, if any: a generation may end
        inside a character, and the chunks' texts must add up to the result's."""
        text = self.pieces.flush() if self.pieces is not None else None
        return Chunk([], text) if text else None

    def result(self, cancelled: bool = False) -> GenerationResult:
        seconds = time.perf_counter() - self.arrived
        canvas, generated = self.canvas, self.generated
        # Positions past the first EOS are not returned, so a step is credited only with those
        # before it (diffusion may have decided them many steps before the EOS appeared).
        end = canvas.prompt_len + len(generated)
        accepted = [int((positions < end).sum()) for positions in self.decided]
        return GenerationResult(
            token_ids=generated,
            text=self.tokenizer.decode(generated) if self.tokenizer is not None else None,
            steps=len(accepted),
            accepted_per_step=accepted,
            dllm_forwards=canvas.forwards["dllm"],
            verifier_forwards=canvas.forwards["verifier"],
            seconds=seconds,
            tokens_per_second=len(generated) / seconds if seconds > 0 else 0.0,
            seed=canvas.sampler.seed if not canvas.sampler.params.greedy else None,
            dllm_seconds=canvas.engine_seconds["dllm"],
            verifier_seconds=canvas.engine_seconds["verifier"],
            finish_reason="cancelled" if cancelled else "stop" if self.stopped else "length",
            first_chunk_seconds=self.first_chunk_seconds,
        )
