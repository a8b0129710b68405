"""Batched decoding: a request decoded among others gets the tokens it gets alone.

Everything here runs on the tiny random pair (prompt lengths, parameters and algorithms mixed,
requests joining and leaving mid-batch); the trained demo pair's answers are checked in
test_demo_pair.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from apd_deploy.errors import GenerationError
from apd_deploy.runtime import QueueFull, Runtime, SchedulerClosed
from apd_deploy.runtime.engine import EngineCall
from apd_deploy.runtime.kv_cache import KVSlots, stacked_past
from apd_deploy.runtime.driver import split_by_length
from conftest import without_eos

RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(30, 250, n).tolist() for n in (5, 31, 12, 3, 20, 8, 17, 40, 1, 26)]
# (alg, params) pairs; the APD ones differ in R, W and M so that rows of one call differ in window,
# cache length and logit rows.
MIXED = [
    ("apd", {}),
    ("apd", {"apd_mixture_weight": 0.3, "kv_window": 4, "max_lookahead": 16}),
    ("leftright", {"tokens_per_step": 3}),
    ("apd", {"apd_mixture_weight": 0.9, "kv_window": 1, "max_lookahead": 37}),
    ("ar", {}),
    ("diffusion", {"steps": 12}),
    ("apd", {"kv_window": 64, "max_lookahead": 5}),
    ("leftright", {"tokens_per_step": 1, "kv_window": 2}),
    ("apd", {"apd_mixture_weight": 0.0}),
    ("apd", {"apd_mixture_weight": 1.0}),
]


def _requests(sampled: bool = False) -> list[dict]:
    """Per request: its prompt and parameters (lengths differ, so requests leave at different steps)."""
    out = []
    for i, (prompt, (alg, params)) in enumerate(zip(PROMPTS, MIXED)):
        request = {"prompt": prompt, "alg": alg, "max_new_tokens": 20 + 9 * i, **params}
        if sampled:
            request.update(temperature=0.8, top_p=0.95, seed=100 + i)
        out.append(request)
    return out


def _alone(runtime: Runtime, requests: list[dict]) -> list:
    return [runtime.generate(**request) for request in requests]


@pytest.mark.parametrize("max_batch", [3, 10])
def test_a_batched_request_gets_its_tokens_alone(runtime_without_eos, max_batch):
    """Mixed prompt lengths, algorithms and parameters; with 3 slots, requests join as others leave."""
    requests = _requests()
    alone = _alone(runtime_without_eos, requests)
    with runtime_without_eos.scheduler(max_batch=max_batch) as scheduler:
        handles = [scheduler.submit(**request) for request in requests]
        batched = [handle.result(timeout=120) for handle in handles]
        assert scheduler.iterations > 0 and max(scheduler.batch_sizes) == max_batch
    for want, got in zip(alone, batched):
        assert got.token_ids == want.token_ids
        assert got.accepted_per_step == want.accepted_per_step
        assert (got.dllm_forwards, got.verifier_forwards) == (want.dllm_forwards, want.verifier_forwards)
        assert got.finish_reason == "length"


def test_lanes_decode_side_by_side_with_the_same_tokens(runtime_without_eos):
    """Two scheduling loops, each on its own sessions at one thread: the same tokens as alone."""
    requests = _requests()[:6]
    alone = _alone(runtime_without_eos, requests)
    with runtime_without_eos.scheduler(max_batch=4, lanes=2) as scheduler:
        assert [lane.max_batch for lane in scheduler.lanes] == [2, 2]
        lane_engines = [lane.engines["dllm"] for lane in scheduler.lanes]
        assert lane_engines[0] is not lane_engines[1] is not runtime_without_eos.dllm
        batched = [h.result(timeout=120) for h in [scheduler.submit(**r) for r in requests]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    with pytest.raises(GenerationError, match="lanes must be at most 4"):
        runtime_without_eos.scheduler(max_batch=4, lanes=5)


def test_sampled_tokens_do_not_depend_on_the_batch(runtime_without_eos):
    """T > 0 with a seed: each request draws from its own generator, whatever shares its batch."""
    requests = _requests(sampled=True)
    alone = _alone(runtime_without_eos, requests)
    with runtime_without_eos.scheduler(max_batch=4) as scheduler:
        batched = [h.result(timeout=120) for h in [scheduler.submit(**r) for r in requests]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.seed for r in batched] == [100 + i for i in range(len(requests))]


def test_generate_many_keeps_prompt_order_and_stops_at_eos(runtime):
    prompts = PROMPTS[:6]
    alone = [runtime.generate(p, max_new_tokens=40) for p in prompts]
    many = runtime.generate_many(prompts, max_batch=4, max_new_tokens=40)
    assert [r.token_ids for r in many] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in many] == [r.finish_reason for r in alone]
    assert runtime.generate_many([]) == []


def test_streamed_chunks_add_up_to_the_result(runtime_without_eos):
    with runtime_without_eos.scheduler(max_batch=2) as scheduler:
        handles = [scheduler.submit(p, max_new_tokens=30) for p in PROMPTS[:3]]
        chunks = [list(handle) for handle in handles]
        results = [handle.result() for handle in handles]
    for chunk_list, result in zip(chunks, results):
        assert [t for c in chunk_list for t in c.token_ids] == result.token_ids
        assert "".join(c.text for c in chunk_list if c.text) == result.text
        assert result.first_chunk_seconds is not None and 0 < result.first_chunk_seconds <= result.seconds


def test_cancelling_one_request_leaves_its_neighbours_unchanged(runtime_without_eos):
    rt = runtime_without_eos
    requests = [{"prompt": p, "max_new_tokens": 120} for p in PROMPTS[:4]]
    alone = _alone(rt, requests)
    with rt.scheduler(max_batch=3) as scheduler:
        handles = [scheduler.submit(**r) for r in requests]  # the fourth waits for a slot
        victim = handles[1]
        first = next(iter(victim))  # it has taken a step among the others
        victim.cancel()
        results = [h.result(timeout=120) for h in handles]
    cancelled = results[1]
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.token_ids[: len(first.token_ids)] == first.token_ids
    assert len(cancelled.token_ids) < len(alone[1].token_ids)
    for i in (0, 2, 3):  # the fourth took the freed slot
        assert results[i].token_ids == alone[i].token_ids and results[i].finish_reason == "length"


def test_a_request_cancelled_while_queued_ends_without_tokens(runtime_without_eos):
    with runtime_without_eos.scheduler(max_batch=1) as scheduler:
        running = scheduler.submit(PROMPTS[0], max_new_tokens=100)
        queued = scheduler.submit(PROMPTS[1], max_new_tokens=100)
        queued.cancel()
        result = queued.result(timeout=120)
        assert result.finish_reason == "cancelled" and result.token_ids == [] and result.steps == 0
        assert running.result(timeout=120).finish_reason == "length"


def test_a_full_queue_is_refused_and_a_closed_scheduler_takes_nothing(runtime_without_eos):
    scheduler = runtime_without_eos.scheduler(max_batch=1, max_queue=1)
    try:
        running = scheduler.submit(PROMPTS[1], max_new_tokens=200)
        deadline = time.monotonic() + 60
        while scheduler.active == 0 and time.monotonic() < deadline:  # admitted: the queue is empty again
            time.sleep(0.001)
        waiting = scheduler.submit(PROMPTS[0], max_new_tokens=5)
        with pytest.raises(QueueFull, match=r"queue is full \(1 requests wait"):
            scheduler.submit(PROMPTS[0], max_new_tokens=5)
        waiting.cancel()  # a cancelled request gives up its place in the queue to the next
        replacement = scheduler.submit(PROMPTS[0], max_new_tokens=5)
        assert waiting.result(timeout=1).finish_reason == "cancelled" and waiting.result().token_ids == []
        waiting = replacement
        running.cancel()
        assert waiting.result(timeout=120).finish_reason == "length"
    finally:
        scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.submit(PROMPTS[0], max_new_tokens=5)


def test_bad_scheduler_settings_and_requests_are_clear_errors(runtime):
    with pytest.raises(GenerationError, match="max_batch must be at least 1, got 0"):
        runtime.scheduler(max_batch=0)
    with pytest.raises(GenerationError, match="max_queue must be at least 1"):
        runtime.scheduler(max_queue=0)
    with pytest.raises(GenerationError, match="max_seq_len must be at most"):
        runtime.scheduler(max_seq_len=runtime.max_positions + 1)
    with runtime.scheduler(max_batch=2, max_seq_len=64) as scheduler:
        with pytest.raises(GenerationError, match=r"exceeds the scheduler's 64 positions.*use max_new_tokens 54 or less"):
            scheduler.submit(list(range(10, 20)), max_new_tokens=60)
        with pytest.raises(GenerationError, match="^temperature must be at least 0"):
            scheduler.submit([5, 6], temperature=-1)
        with pytest.raises(GenerationError, match="exceeds the models'"):
            scheduler.submit([5, 6], max_new_tokens=runtime.max_positions)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        runtime.generate_many([[5], []])
    built_for_4 = replace(runtime, engine_max_batch=("tensorrt-cuda-fp16", 4))  # as built with --max-batch 4
    with pytest.raises(GenerationError, match="built for batches of at most 4.*build-engine --max-batch 8"):
        built_for_4.scheduler(max_batch=8)
    built_for_4.scheduler(max_batch=4).close()


def test_an_engine_failure_ends_the_requests_of_that_call_only(tiny_bundle):
    rt = without_eos(Runtime.load(tiny_bundle))
    real_run, failures = rt.verifier.run, []

    def failing_once(calls):
        if not failures and len(calls) > 1:
            failures.append(len(calls))
            raise RuntimeError("engine fault")
        return real_run(calls)

    rt.verifier.run = failing_once
    with rt.scheduler(max_batch=4) as scheduler:
        handles = [scheduler.submit(p, max_new_tokens=24) for p in PROMPTS[:4]]
        outcomes = []
        for handle in handles:
            try:
                outcomes.append(handle.result(timeout=120).finish_reason)
            except RuntimeError as exc:
                outcomes.append(str(exc))
        later = scheduler.submit(PROMPTS[4], max_new_tokens=24).result(timeout=120)
    assert outcomes.count("engine fault") == failures[0] and outcomes.count("length") == 4 - failures[0]
    rt.verifier.run = real_run
    assert later.token_ids == rt.generate(PROMPTS[4], max_new_tokens=24).token_ids


def test_handles_are_safe_to_use_from_other_threads(runtime):
    with runtime.scheduler(max_batch=4) as scheduler:
        results, errors = {}, []

        def client(i: int) -> None:
            try:
                results[i] = scheduler.submit(PROMPTS[i], max_new_tokens=16).result(timeout=120).token_ids
            except Exception as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert [results[i] for i in range(8)] == [runtime.generate(PROMPTS[i], max_new_tokens=16).token_ids for i in range(8)]


def test_padded_batched_calls_give_the_exact_tokens(tiny_bundle):
    """The CUDA engine's fixed shapes with a batch dimension, checked on the CPU: padded batch rows,
    windows and logit rows change no token."""
    exact = without_eos(Runtime.load(tiny_bundle))
    padded = without_eos(Runtime.load(tiny_bundle, engine_options={"fixed_shapes": True}))
    requests = _requests()[:7]
    alone = _alone(exact, requests)
    with padded.scheduler(max_batch=3) as scheduler:
        batched = [h.result(timeout=300) for h in [scheduler.submit(**r) for r in requests]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_split_by_length_keeps_a_prompt_from_padding_short_windows():
    # Seven requests feeding one token and one joining with a 40-token prompt: two calls.
    assert sorted(map(sorted, split_by_length([1, 1, 40, 1, 1, 1, 1, 1], 32))) == [[0, 1, 3, 4, 5, 6, 7], [2]]
    # Similar windows: one call.
    assert split_by_length([100, 104, 98, 110], 32) == [[2, 0, 1, 3]]
    # Calls that cost nothing: one per length; calls that cost everything: one in all.
    assert len(split_by_length([1, 2, 3], 0)) == 3 and len(split_by_length([1, 50, 900], 10**6)) == 1
    assert split_by_length([7], 32) == [[0]]


def test_cache_rows_of_consecutive_slots_are_handed_over_without_a_copy():
    slots = KVSlots(4, 10, (2, 1, 3), np.dtype(np.float32))
    caches = [slots.cache(i, 8) for i in range(4)]
    for i, cache in enumerate(caches):
        cache.append(np.full((1, 2, 2, 1, 2 + i, 3), i + 1, dtype=np.float32))
    view = stacked_past(caches[1:3], 4)
    assert np.shares_memory(view, slots.buffer) and view.shape[0] == 2
    gathered = stacked_past([caches[3], caches[0]], 5)
    assert not np.shares_memory(gathered, slots.buffer)
    assert gathered.shape == (2, 2, 2, 1, 5, 3)  # sized for the call, not a second copy of every slot
    held = [v for v in vars(slots).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) == slots.buffer.nbytes
    assert (gathered[0, ..., :5, :] == 4).all() and (gathered[1, ..., :2, :] == 1).all()
    slots.move(caches[3], 1)  # the last request takes a freed slot, its cache with it
    assert caches[3].slot == 1 and (slots.buffer[1, ..., :5, :] == 4).all() and caches[3].length == 5
    with pytest.raises(ValueError, match="does not fit a slot of 10"):
        slots.cache(0, 11)


def test_batched_calls_mask_each_rows_cache_and_window(runtime_without_eos):
    """Below the tokens: each row's logits in a batched call equal its logits alone to float rounding."""
    engine = runtime_without_eos.dllm
    slots = engine.new_slots(3, 200)
    single = [engine.new_cache(200) for _ in range(3)]
    rows_of = [slots.cache(i, 200) for i in range(3)]
    rng = np.random.default_rng(0)
    for past in ((0, 0, 0), (17, 3, 40)):
        for cache, row, n in zip(single, rows_of, past):  # give each cache `n` positions of real keys
            if n:
                ids = rng.integers(0, 250, n)
                (_, kv), = engine.run([EngineCall(ids, cache)])
                cache.append(kv)
                row.append(kv)
        calls = [(rng.integers(0, 250, n), rows) for n, rows in ((9, None), (23, np.arange(3, 9)), (2, np.array([1, 0])))]
        want = [engine.run([EngineCall(ids, cache, rows)])[0] for (ids, rows), cache in zip(calls, single)]
        got = engine.run([EngineCall(ids, row, rows) for (ids, rows), row in zip(calls, rows_of)])
        for (want_logits, want_kv), (got_logits, got_kv) in zip(want, got):
            np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(got_kv, want_kv, rtol=1e-4, atol=1e-4)


def test_a_stream_and_a_submitted_request_are_one_handle_type(runtime):
    """`Runtime.stream` and `Scheduler.submit` hand back one type: iterate it for chunks, then `result()`."""
    stream = runtime.stream([5, 6], alg="leftright", max_new_tokens=8, ignore_eos=True)
    chunks = [chunk.token_ids for chunk in stream]
    with runtime.scheduler(max_batch=2) as scheduler:
        handle = scheduler.submit([5, 6], alg="leftright", max_new_tokens=8, ignore_eos=True)
        assert type(handle) is type(stream)
        assert [chunk.token_ids for chunk in handle] == chunks
    assert handle.result().token_ids == stream.result().token_ids == sum(chunks, [])
    assert list(stream) == []  # iterated again, it ends at once


def test_the_loaded_runtime_never_changes_and_its_variants_share_its_engines(runtime):
    with pytest.raises(AttributeError):
        runtime.eos_ids = frozenset()
    full_length, timed = without_eos(runtime), runtime.timed()
    assert full_length.dllm is runtime.dllm and timed.dllm.engine is runtime.dllm
    assert runtime.defaults.ignore_eos is False and full_length.defaults.ignore_eos is True
    expected = runtime.generate([5, 6], max_new_tokens=16, ignore_eos=True)
    assert full_length.generate([5, 6], max_new_tokens=16).token_ids == expected.token_ids
    assert timed.generate([5, 6], max_new_tokens=16, ignore_eos=True).token_ids == expected.token_ids
