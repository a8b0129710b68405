"""Continuous batching: many requests advanced together, one step each per iteration.

Each decoder (apd.py, leftright.py, ...) is a generator that yields the engine calls it needs and
the steps it commits. A request decoding alone has each call made at once (`Runtime.generate`);
here the scheduler runs up to `max_batch` decoders side by side and makes their calls together:

    iteration: every active request takes one step
        round: advance each request that is waiting for nothing until it yields a call or a step
               one batched call per model for the calls yielded (each row its own window, cache
               length and logit rows), results handed back
        ... until every request has yielded its step (APD: a dLLM round, then verifier rounds
            that only the requests whose draft has no rejection yet take part in)
    requests that ended (EOS, max new tokens, cancelled, failed) leave; queued ones take their slots

Each request keeps its own parameters, sampler and random generator, so its tokens do not
depend on what else is in the batch. Caches: one buffer per model with a row per slot
(`KVSlots`); the active requests hold slots 0..n-1, so the rows of a call that every request
makes are one contiguous block; when a request leaves, the last one moves into its slot.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.canvas import Call, Canvas, Decoder, Step
from apd_deploy.runtime.engine import DecoderEngine
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.params import GenerationParams, check_integer
from apd_deploy.runtime.results import Chunk, GenerationResult, Progress

if TYPE_CHECKING:
    from apd_deploy.runtime.runtime import Runtime

ROLES = ("dllm", "verifier")


class QueueFull(GenerationError):
    """The scheduler's queue holds `max_queue` requests: retry later."""


class SchedulerClosed(GenerationError):
    """The scheduler was closed and takes no more requests."""


_END = object()  # closes a handle's chunk queue


class RequestHandle:
    """A submitted request: iterate for its chunks as steps commit them (blocking), `result()`
    for the whole generation, `cancel()` to stop it. Safe to use from any thread."""

    def __init__(self, request_id: int, on_event: Callable[[Chunk | None], None] | None = None,
                 on_cancel: Callable[[RequestHandle], None] | None = None) -> None:
        self.id = request_id
        self._on_event, self._on_cancel = on_event, on_cancel
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self._chunks.get()) is not _END:
            yield chunk
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished generation (its `finish_reason` is 'cancelled' after `cancel()`); raises
        the error that ended the request, or TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop the request at its next step; its slot and cache rows go to the next request. A
        request still queued ends at once and gives up its place in the queue."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _push(self, chunk: Chunk) -> None:
        self._chunks.put(chunk)
        if self._on_event is not None:
            self._on_event(chunk)

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._chunks.put(_END)
        if self._on_event is not None:
            self._on_event(None)


class Active:
    """A request, queued or holding a slot: its decoder, where it stands, and the caches it was given."""

    def __init__(self, handle: RequestHandle, ids: np.ndarray, params: GenerationParams, chunk_text: bool,
                 arrived: float) -> None:
        self.handle, self.ids, self.params, self.chunk_text, self.arrived = handle, ids, params, chunk_text, arrived
        self.slot = -1
        self.caches: list[KVCache] = []
        self.canvas: Canvas | None = None
        self.decoder: Decoder | None = None
        self.progress: Progress | None = None
        self.reply: Any = None  # what the decoder is resumed with: an engine call's result

    @property
    def finished(self) -> bool:
        return self.handle.done

    def start(self, runtime: Runtime, new_cache: Callable[[str, int], KVCache] | None) -> None:
        """Make the request's canvas, decoder and progress (the decoder runs nothing yet)."""
        self.canvas, self.decoder = runtime.start(self.ids, self.params, new_cache)
        self.progress = Progress(self.canvas, runtime.eos_ids, runtime.tokenizer, self.chunk_text, self.arrived,
                                 self.params.ignore_eos, self.params.min_tokens)


class Scheduler:
    def __init__(self, runtime: Runtime, max_batch: int = 8, max_queue: int = 256, max_seq_len: int | None = None,
                 lanes: int = 1) -> None:
        check_integer("max_batch", max_batch, 1)
        check_integer("max_queue", max_queue, 1)
        check_integer("lanes", lanes, 1, max_batch)
        if max_seq_len is not None:
            check_integer("max_seq_len", max_seq_len, 2, runtime.max_positions)
        if runtime.engine_max_batch is not None and max_batch > runtime.engine_max_batch[1]:
            name, most = runtime.engine_max_batch
            raise GenerationError(
                f"engine '{name}' was built for batches of at most {most}; use a max batch of {most} or less, or "
                f"rebuild it with apd-deploy build-engine --max-batch {max_batch}"
            )
        self.runtime, self.max_batch, self.max_queue = runtime, max_batch, max_queue
        self.max_seq_len = max_seq_len or runtime.max_positions
        self._queue: deque[Active] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._next_id = 0
        # Called on a lane's thread after each iteration with its seconds and its number of requests
        # (a server's step-latency and batch-size metrics).
        self.on_iteration: Callable[[float, int], None] | None = None
        # Lane i takes every lanes-th slot of max_batch; each lane beyond one runs its own sessions.
        engines = runtime.engines_for_lanes(lanes)
        self.lanes = [Lane(self, engines[i], len(range(i, max_batch, lanes)), i) for i in range(lanes)]
        for lane in self.lanes:
            lane.thread.start()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(len(lane.active) for lane in self.lanes)

    @property
    def alive(self) -> bool:
        """Open, and every lane's loop running (a health check's question)."""
        return not self._closed and all(lane.thread.is_alive() for lane in self.lanes)

    @property
    def iterations(self) -> int:
        """Iterations run, all lanes together (a server reports them)."""
        return sum(lane.iterations for lane in self.lanes)

    @property
    def batch_sizes(self) -> dict[int, int]:
        """How many iterations ran with each number of requests."""
        sizes: dict[int, int] = defaultdict(int)
        for lane in self.lanes:
            for size, count in list(lane.batch_sizes.items()):
                sizes[size] += count
        return dict(sizes)

    def submit(self, prompt: str | Sequence[int], chat: bool = False, chunk_text: bool = True,
               **params: Any) -> RequestHandle:
        """Queue a request (parameters as `Runtime.generate`); raises GenerationError for bad
        parameters, QueueFull when `max_queue` requests wait already."""
        ids, p = self.runtime.request(prompt, chat, params)
        return self.submit_prepared(ids, p, chunk_text)

    def submit_prepared(self, ids: np.ndarray, params: GenerationParams, chunk_text: bool = True,
                        on_event: Callable[[Chunk | None], None] | None = None) -> RequestHandle:
        """Queue a request already checked by `Runtime.request`. `on_event`, if given, is called on
        the scheduler's thread with each chunk and with None once the request has ended (its
        result or error is then ready): how an event loop learns of progress without a thread
        blocked per request."""
        if len(ids) + params.max_new_tokens > self.max_seq_len:
            raise GenerationError(
                f"prompt of {len(ids)} tokens + --max-new-tokens {params.max_new_tokens} exceeds the scheduler's "
                f"{self.max_seq_len} positions per slot (max_seq_len); use --max-new-tokens "
                f"{max(self.max_seq_len - len(ids), 0)} or less, or a scheduler with a larger max_seq_len"
            )
        arrived = time.perf_counter()
        with self._wake:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed and takes no more requests")
            # The queue also holds what a lane has not yet moved into a free slot: a burst of up to
            # free slots + max_queue is admitted.
            free = sum(lane.max_batch - len(lane.active) for lane in self.lanes)
            if len(self._queue) >= self.max_queue + free:
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait for a slot); retry later, or "
                                "make the scheduler with a larger max_queue")
            handle = RequestHandle(self._next_id, on_event, self._withdraw)
            self._next_id += 1
            self._queue.append(Active(handle, ids, params, chunk_text, arrived))
            self._wake.notify_all()  # each lane looks for a free slot
        return handle

    def _withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request that is still queued leaves the queue and ends without a step."""
        with self._wake:  # reentrant: `close` cancels holding it
            request = next((r for r in self._queue if r.handle is handle), None)
            if request is None:
                return  # already decoding: it ends at its next step
            self._queue.remove(request)
        request.start(self.runtime, new_cache=None)  # never resumed: it makes no cache
        request.decoder.close()
        handle._finish(request.progress.result(cancelled=True))

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no more requests, let the queued and active ones finish (or cancel them), and stop."""
        with self._wake:
            self._closed = True
            if cancel:
                for request in [*self._queue, *(r for lane in self.lanes for r in lane.active)]:
                    request.handle.cancel()
            self._wake.notify_all()
        for lane in self.lanes:
            lane.thread.join(timeout)


class Lane:
    """One scheduling loop on its own thread: its engines, its slots' cache rows, its requests.
    A CPU with several lanes runs them side by side, each call on fewer threads (see `lanes` in
    `Runtime.scheduler`)."""

    def __init__(self, scheduler: Scheduler, engines: dict[str, DecoderEngine], slots: int, index: int) -> None:
        self.scheduler, self.engines, self.max_batch = scheduler, engines, slots
        self.slots = {role: engine.new_slots(slots, scheduler.max_seq_len) for role, engine in engines.items()}
        self.active: list[Active] = []  # index = slot
        self.iterations = 0
        self.batch_sizes: dict[int, int] = defaultdict(int)
        self.thread = threading.Thread(target=self._loop, name=f"apd-scheduler-{index}", daemon=True)

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with scheduler._wake:
                while not self.active and not scheduler._queue and not scheduler._closed:
                    scheduler._wake.wait()
                if scheduler._closed and not scheduler._queue and not self.active:
                    return
                self._admit()
            if not self.active:  # another lane took what was queued
                continue
            try:
                self._iterate()
            except Exception as exc:  # a fault outside any one request's decoding: fail the batch, go on
                for request in self.active:
                    self._end(request, error=exc)
                self._leave()

    def _admit(self) -> None:
        """Move queued requests into free slots (called holding the scheduler's lock)."""
        queue = self.scheduler._queue
        while queue and len(self.active) < self.max_batch:
            request = queue.popleft()
            request.slot = len(self.active)
            self.active.append(request)

    def _start(self, request: Active) -> None:
        def new_cache(role: str, capacity: int) -> KVCache:
            cache = self.slots[role].cache(request.slot, capacity)
            request.caches.append(cache)
            return cache

        request.start(self.scheduler.runtime, new_cache)

    def _iterate(self) -> None:
        """One step for every active request, their engine calls batched per model."""
        started, batch = time.perf_counter(), len(self.active)
        self.iterations += 1
        self.batch_sizes[batch] += 1
        waiting = []
        for request in self.active:
            if request.decoder is None:
                self._start(request)
            if request.handle.cancelled:
                self._end(request)
                continue
            request.reply = None
            waiting.append(request)
        while waiting:
            calls: dict[str, list[tuple[Active, Call]]] = {role: [] for role in ROLES}
            for request in waiting:
                item = self._advance(request)
                if isinstance(item, Call):
                    calls[item.role].append((request, item))
            waiting = []
            for role, group in calls.items():
                if group:
                    waiting += self._run_batched(role, group)
        self._leave()
        if self.scheduler.on_iteration is not None:
            self.scheduler.on_iteration(time.perf_counter() - started, batch)

    def _advance(self, request: Active) -> Call | Step | None:
        """Resume the request's decoder until it asks for a call or commits a step."""
        try:
            item = request.decoder.send(request.reply)
        except StopIteration:
            self._end(request)
            return None
        except Exception as exc:  # a fault in one request's decoding ends that request only
            self._end(request, error=exc)
            return None
        if isinstance(item, Step):
            request.handle._push(request.progress.push(item))
            if request.progress.stopped:
                self._end(request)
        return item

    def _run_batched(self, role: str, group: list[tuple[Active, Call]]) -> list[Active]:
        engine, resumed = self.engines[role], []
        lengths = [call.call.ids.shape[-1] for _, call in group]
        for part in split_by_length(lengths, engine.call_cost_tokens):
            batch = sorted((group[i] for i in part), key=lambda pair: pair[0].slot)  # consecutive slots: no gather
            started = time.perf_counter()
            try:
                outputs = engine.run([call.call for _, call in batch])
            except Exception as exc:  # the engine failed this call: its requests end with the error
                for request, _ in batch:
                    self._end(request, error=exc)
                continue
            elapsed = time.perf_counter() - started
            for (request, _), output in zip(batch, outputs):
                request.canvas.engine_seconds[role] += elapsed
                request.reply = output
                resumed.append(request)
        return resumed

    def _end(self, request: Active, error: BaseException | None = None) -> None:
        if request.finished:
            return
        if request.decoder is not None:
            request.decoder.close()
        if error is not None:
            request.handle._finish(None, error)
        else:
            if (rest := request.progress.rest()) is not None:
                request.handle._push(rest)
            cancelled = request.handle.cancelled and not request.progress.stopped
            request.handle._finish(request.progress.result(cancelled=cancelled))

    def _leave(self) -> None:
        """Free the slots of requests that ended: the last active request moves into each."""
        with self.scheduler._wake:
            slot = 0
            while slot < len(self.active):
                if not self.active[slot].finished:
                    slot += 1
                    continue
                last = self.active.pop()
                if slot < len(self.active) and not last.finished:
                    for cache in last.caches:
                        cache.slots.move(cache, slot)
                    last.slot = slot
                    self.active[slot] = last
                    slot += 1


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
