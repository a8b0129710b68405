"""Continuous batching: many requests advanced together, one step each per iteration.

A scheduler takes requests from any thread into a queue; each of its lanes (a loop on its own
thread, its own engines) moves them into free slots and runs iterations: every active request
takes one step (`driver.step`), then those that ended (EOS, max new tokens, cancelled, failed)
leave, and queued ones take their slots.

Each request keeps its own parameters, sampler and random generator, so its tokens do not
depend on what else is in the batch. Caches: one buffer per model with a row per slot
(`KVSlots`); the active requests hold slots 0..n-1, so the rows of a call that every request
makes are one contiguous block; when a request leaves, the last one moves into its slot.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.driver import Decoding, Request, step
from apd_deploy.runtime.engine import DecoderEngine
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.params import GenerationParams, check_integer
from apd_deploy.runtime.results import Chunk, Generation

if TYPE_CHECKING:
    from apd_deploy.runtime.runtime import Runtime


class QueueFull(GenerationError):
    """The scheduler's queue holds `max_queue` requests: retry later."""


class SchedulerClosed(GenerationError):
    """The scheduler was closed and takes no more requests."""


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
        if lanes > 1 and (runtime.xp is not np or runtime.open_lanes is None):
            raise GenerationError("lanes > 1 is for CPU engines loaded with Runtime.load; a GPU engine batches "
                                  "in one lane (use lanes=1)")
        self.runtime, self.max_batch, self.max_queue = runtime, max_batch, max_queue
        self.max_seq_len = max_seq_len or runtime.max_positions
        self._queue: deque[Decoding] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._next_id = 0
        # Called on a lane's thread after each iteration with its seconds and its number of requests
        # (a server's step-latency and batch-size metrics).
        self.on_iteration: Callable[[float, int], None] = lambda seconds, batch: None
        # Lane i takes every lanes-th slot of max_batch; each lane beyond one runs its own sessions,
        # opened once per runtime (a session costs a load of the weights).
        engines = runtime.open_lanes(lanes) if lanes > 1 else [runtime.engines]
        self.lanes = [Lane(runtime, engines[i], len(range(i, max_batch, lanes)), self.max_seq_len, self._take,
                           lambda seconds, batch: self.on_iteration(seconds, batch), i) for i in range(lanes)]
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
               **params: Any) -> Generation:
        """Queue a request (parameters as `Runtime.generate`); raises GenerationError for bad
        parameters, QueueFull when `max_queue` requests wait already."""
        return self.submit_prepared(*self.runtime.request(prompt, chat, params), chunk_text)

    def submit_prepared(self, ids: np.ndarray, params: GenerationParams, chunk_text: bool = True,
                        on_event: Callable[[Chunk | None], None] | None = None) -> Generation:
        """Queue a request already checked by `Runtime.request`. `on_event`, if given, is called on
        the scheduler's thread with each chunk and with None once the request has ended (its
        result or error is then ready): how an event loop learns of progress without a thread
        blocked per request."""
        if len(ids) + params.max_new_tokens > self.max_seq_len:
            raise GenerationError(
                f"prompt of {len(ids)} tokens + {{name}} {params.max_new_tokens} exceeds the scheduler's "
                f"{self.max_seq_len} positions per slot (max_seq_len); use {{name}} "
                f"{max(self.max_seq_len - len(ids), 0)} or less, or a scheduler with a larger max_seq_len",
                param="max_new_tokens",
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
            handle = Generation(self._next_id, on_event, self._withdraw)
            self._next_id += 1
            self._queue.append(Decoding(handle, Request(ids, params), chunk_text, arrived))
            self._wake.notify_all()  # each lane looks for a free slot
        return handle

    def _withdraw(self, handle: Generation) -> None:
        """A cancelled request that is still queued leaves the queue and ends without a step."""
        with self._wake:  # reentrant: `close` cancels holding it
            request = next((r for r in self._queue if r.handle is handle), None)
            if request is None:
                return  # already decoding: it ends at its next step
            self._queue.remove(request)
        request.start(self.runtime, new_cache=None)  # never resumed: it makes no cache
        request.end()

    def _take(self, lane: Lane) -> bool:
        """Wait until `lane` has requests, moving queued ones into its free slots; False once the
        scheduler is closed and nothing is left for it (called on the lane's thread)."""
        with self._wake:
            while True:
                while not lane.active and not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue and not lane.active:
                    return False
                while self._queue and len(lane.active) < lane.max_batch:
                    request = self._queue.popleft()
                    request.slot = len(lane.active)
                    lane.active.append(request)
                if lane.active:  # else another lane took what was queued
                    return True

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
    """One scheduling loop on its own thread: its engines, its slots' cache rows, its requests
    (`active`, index = slot, filled by its scheduler through `take`). Several lanes run side by
    side, each call on fewer threads (see `lanes` in `Runtime.scheduler`)."""

    def __init__(self, runtime: Runtime, engines: dict[str, DecoderEngine], slots: int, max_seq_len: int,
                 take: Callable[[Lane], bool], report: Callable[[float, int], None], index: int) -> None:
        self.runtime, self.engines, self.max_batch = runtime, engines, slots
        self.slots = {role: engine.new_slots(slots, max_seq_len) for role, engine in engines.items()}
        self.active: list[Decoding] = []
        self.iterations = 0
        self.batch_sizes: dict[int, int] = defaultdict(int)
        self._take, self._report = take, report
        self.thread = threading.Thread(target=self._loop, name=f"apd-scheduler-{index}", daemon=True)

    def _loop(self) -> None:
        while self._take(self):
            try:
                self._iterate()
            except Exception as exc:  # a fault outside any one request's decoding: fail the batch, go on
                for request in self.active:
                    request.end(error=exc)
                self._leave()

    def _iterate(self) -> None:
        """One step for every active request, their engine calls batched per model."""
        started, batch = time.perf_counter(), len(self.active)
        self.iterations += 1
        self.batch_sizes[batch] += 1
        for request in self.active:
            if request.decoder is None:
                request.start(self.runtime, partial(self._new_cache, request))
        step(self.active, self.engines)
        self._leave()
        self._report(time.perf_counter() - started, batch)

    def _new_cache(self, request: Decoding, role: str, capacity: int) -> KVCache:
        cache = self.slots[role].cache(request.slot, capacity)
        request.caches.append(cache)
        return cache

    def _leave(self) -> None:
        """Free the slots of requests that ended: the last active request moves into each. The new
        list replaces the old at once, so that other threads read one or the other whole."""
        active, slot = list(self.active), 0
        while slot < len(active):
            if not active[slot].handle.done:
                slot += 1
                continue
            last = active.pop()
            if slot < len(active) and not last.handle.done:
                for cache in last.caches:
                    cache.slots.move(cache, slot)
                last.slot = slot
                active[slot] = last
                slot += 1
        self.active = active
