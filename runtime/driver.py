"""The step driver: one decoding step for each of a set of requests, their engine calls batched.

Each decoder (apd.py, leftright.py, ...) is a generator that yields the engine calls it needs and
the steps it commits. `step` resumes every request until it yields a call or a step, makes one
call per model for the calls yielded, hands the results back, and goes on until every request has
yielded its step (APD: a dLLM round, then verifier rounds that only the requests whose draft has
no rejection yet take part in). A request decoded alone is a batch of one (`Runtime.stream`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from apd_deploy.runtime.apd import apd
from apd_deploy.runtime.autoregressive import autoregressive
from apd_deploy.runtime.canvas import Call, Canvas, Decoder, Step
from apd_deploy.runtime.diffusion import diffusion
from apd_deploy.runtime.engine import DecoderEngine, EngineCall
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.leftright import leftright
from apd_deploy.runtime.params import GenerationParams
from apd_deploy.runtime.results import Generation, Progress
from apd_deploy.runtime.sampling import Sampler

if TYPE_CHECKING:
    from apd_deploy.runtime.runtime import Runtime


class Request(NamedTuple):
    """A request checked and settled once (`Runtime.request`): its prompt ids and parameters."""

    ids: np.ndarray
    params: GenerationParams


class Decoding:
    """A request and where its decoding stands: its decoder, its progress, the caches it was given."""

    def __init__(self, handle: Generation, request: Request, chunk_text: bool, arrived: float | None = None) -> None:
        self.handle, self.request, self.chunk_text, self.arrived = handle, request, chunk_text, arrived
        self.slot = -1  # its row of a lane's cache buffers
        self.caches: list[KVCache] = []
        self.canvas: Canvas | None = None  # canvas, decoder and progress: made by `start`
        self.decoder: Decoder | None = None
        self.progress: Progress | None = None
        self.reply: Any = None  # what the decoder is resumed with: an engine call's result

    def start(self, runtime: Runtime, new_cache: Callable[[str, int], KVCache] | None) -> None:
        """Make the canvas (caches by `new_cache(role, capacity)`), the decoder (it runs nothing yet), the progress."""
        ids, p = self.request
        sampler = Sampler(p.sampling, runtime.vocab_size, runtime.xp)
        self.canvas = Canvas.start(ids, p.max_new_tokens, runtime.mask_id, runtime.vocab_size, sampler, new_cache)
        self.decoder = new_decoder(self.canvas, p, runtime.verifier.first_verify_chunk)
        self.progress = Progress(self.canvas, runtime.eos_ids, runtime.tokenizer, self.chunk_text, self.arrived,
                                 p.ignore_eos, p.min_tokens)

    def advance(self) -> Call | Step | None:
        """Resume the decoder until it asks for a call or commits a step (None: it ended)."""
        try:
            item = self.decoder.send(self.reply)
        except StopIteration:
            self.end()
            return None
        except Exception as exc:  # a fault in one request's decoding ends that request only
            self.end(error=exc)
            return None
        if isinstance(item, Step):
            self.handle.push(self.progress.push(item))
            if self.progress.stopped:
                self.end()
        return item

    def end(self, error: BaseException | None = None) -> None:
        if self.handle.done:
            return
        if self.decoder is not None:
            self.decoder.close()
        if error is not None:
            self.handle.finish(None, error)
            return
        if (rest := self.progress.rest()) is not None:
            self.handle.push(rest)
        cancelled = self.handle.cancelled and not self.progress.stopped
        self.handle.finish(self.progress.result(cancelled=cancelled))


def new_decoder(canvas: Canvas, p: GenerationParams, first_verify_chunk: int | None) -> Decoder:
    if p.alg == "apd":
        return apd(canvas, p.apd_mixture_weight, p.kv_window, p.max_lookahead, first_verify_chunk)
    if p.alg == "leftright":
        return leftright(canvas, p.tokens_per_step, p.kv_window, p.max_lookahead)
    if p.alg == "diffusion":
        return diffusion(canvas, p.steps or p.max_new_tokens, p.diffusion_order)
    return autoregressive(canvas)


def step(requests: Sequence[Decoding], engines: dict[str, DecoderEngine]) -> None:
    """One step for every started request, their engine calls batched per model; a cancelled one ends."""
    waiting = []
    for request in requests:
        if request.handle.cancelled:
            request.end()
            continue
        request.reply = None
        waiting.append(request)
    while waiting:
        calls: dict[str, list[tuple[Decoding, EngineCall]]] = {"dllm": [], "verifier": []}
        for request in waiting:
            item = request.advance()
            if isinstance(item, Call):
                calls[item.role].append((request, item.call))
        waiting = []
        for role, group in calls.items():
            if group:
                waiting += _run(role, engines[role], group)


def _run(role: str, engine: DecoderEngine, group: list[tuple[Decoding, EngineCall]]) -> list[Decoding]:
    """Make the calls of `group` (split as `split_by_length` finds cheapest); the requests resumed, replies set."""
    if len(group) == 1:  # a request decoding alone: nothing to split or order
        parts = [group]
    else:  # in consecutive slots, their caches are handed over without a gather
        lengths = [call.ids.shape[-1] for _, call in group]
        parts = [sorted((group[i] for i in part), key=lambda pair: pair[0].slot)
                 for part in split_by_length(lengths, engine.call_cost_tokens)]
    resumed = []
    for batch in parts:
        started = time.perf_counter()
        try:
            outputs = engine.run([call for _, call in batch])
        except Exception as exc:  # the engine failed this call: its requests end with the error
            for request, _ in batch:
                request.end(error=exc)
            continue
        elapsed = time.perf_counter() - started
        for (request, _), output in zip(batch, outputs):
            request.canvas.engine_seconds[role] += elapsed
            request.reply = output
            resumed.append(request)
    return resumed


def split_by_length(lengths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Indices of `lengths` (window tokens per request) split into the batches that cost least when
    a batch costs `call_cost` tokens plus its rows times its longest window: a request joining with
    its whole prompt is not batched with requests feeding a few tokens each, whose rows it would
    pad to its length. Optimal over batches of consecutive lengths (a dynamic program, sorted)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in order]
    best, cut = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end], cut[end] = min((best[start] + call_cost + (end - start) * ordered[end - 1], start)
                                  for start in range(end))
    parts, end = [], len(order)
    while end:
        parts.append(order[cut[end] : end])
        end = cut[end]
    return parts[::-1]
