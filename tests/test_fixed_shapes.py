"""Calls padded to fixed shapes (the CUDA engine's CUDA-graph path) give the tokens of exact-size
calls: checked on the CPU, where the same padding and masks run through the same graphs."""

from __future__ import annotations

import numpy as np
import pytest

from apd_deploy.runtime import Runtime
from apd_deploy.runtime.fixed_shapes import FixedShape, PaddedInputs, contiguous_start, round_up
from apd_deploy.runtime.engine import EngineCall
from apd_deploy.runtime.kv_cache import KVCache
from conftest import without_eos

PROMPTS = ([72, 101, 108, 108, 111], list(range(30, 61)))
RUNS = (
    ("apd", {}),
    ("apd", {"apd_mixture_weight": 0.3, "kv_window": 4, "max_lookahead": 16}),
    ("apd", {"apd_mixture_weight": 0.9, "kv_window": 1, "max_lookahead": 37}),
    ("leftright", {"tokens_per_step": 3}),
    ("diffusion", {"steps": 20}),
    ("ar", {}),
)


@pytest.fixture(scope="module")
def exact_and_padded(tiny_bundle):
    # every run to its full length, through every window shape
    exact = without_eos(Runtime.load(tiny_bundle))
    padded = without_eos(Runtime.load(tiny_bundle, engine_options={"fixed_shapes": True}))
    padded.verifier.first_verify_chunk = None  # as on a GPU: the whole draft in one verifier call
    return exact, padded


@pytest.mark.parametrize("alg,params", RUNS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(RUNS)])
def test_padded_calls_give_the_exact_tokens(exact_and_padded, alg, params):
    exact, padded = exact_and_padded
    for prompt in PROMPTS:
        want = exact.generate(prompt, alg=alg, max_new_tokens=70, **params)
        got = padded.generate(prompt, alg=alg, max_new_tokens=70, **params)
        assert got.token_ids == want.token_ids
        assert got.accepted_per_step == want.accepted_per_step


def test_padded_logits_match_exact_logits(exact_and_padded):
    """Below the tokens: the real rows' logits and keys/values agree to float rounding."""
    exact, padded = (rt.dllm for rt in exact_and_padded)
    rng = np.random.default_rng(0)
    caches = [engine.new_cache(300) for engine in (exact, padded)]
    for n, rows in ((23, None), (9, np.arange(3, 9)), (40, np.array([0, 5, 2, 39]))):
        ids = rng.integers(0, 250, n)
        (want, want_kv), (got, got_kv) = (e.run([EngineCall(ids, c, rows)])[0] for e, c in zip((exact, padded), caches))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_kv, want_kv, rtol=1e-4, atol=1e-4)
        for cache, kv in zip(caches, (want_kv, got_kv)):
            cache.append(kv)


def test_round_up_and_shapes():
    assert [round_up(n, 16) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    shape = FixedShape.holding(batch=1, window=116, rows=100, capacity=300)
    assert (shape.batch, shape.window, shape.rows, shape.capacity) == (1, 128, 128, 512)
    # One row count per window size: a few shapes per run, whatever the rows asked for.
    assert FixedShape.holding(batch=1, window=200, rows=3, capacity=300).rows == 128
    assert FixedShape.holding(batch=1, window=9, rows=1, capacity=10) == FixedShape(1, 16, 16, 256)
    assert FixedShape.holding(batch=1, window=300, rows=200, capacity=300).rows == 256
    assert FixedShape.holding(batch=5, window=9, rows=300, capacity=10) == FixedShape(8, 16, 512, 256)
    assert shape.dimensions() == {"batch": 1, "seq_len": 128, "total_len": 640, "capacity": 512, "logit_len": 128}


def test_contiguous_rows_are_recognised():
    assert contiguous_start(np.arange(4, 9)) == 4
    assert contiguous_start(np.array([3])) == 3
    assert contiguous_start(np.array([1, 2, 4])) is None
    assert contiguous_start(np.array([5, 4, 3])) is None


def test_padded_inputs_mask_the_stale_cache_and_the_padding():
    shape = FixedShape.holding(batch=3, window=5, rows=3, capacity=10)
    inputs = PaddedInputs(np, shape, (1, 1, 2), np.dtype(np.float32), max_positions=64)
    inputs.arrays["attention_mask"][:] = 1  # what an earlier call left in the padded batch row
    caches = [KVCache(10, 1, 1, 2, np.dtype(np.float32)) for _ in range(3)]
    caches[0].append(np.ones((1, 1, 2, 1, 7, 2), dtype=np.float32))
    caches[0].crop(3)  # positions 3..6 hold stale keys: they must be masked
    calls = [EngineCall(np.array([7, 8, 9, 10, 11]), caches[0], np.array([2, 3])),
             EngineCall(np.array([4, 5]), caches[1], np.array([1])),
             EngineCall(np.array([6]), caches[2])]
    assert inputs.write(calls) == [2, 1, 1]
    mask, s, c = inputs.arrays["attention_mask"], shape.window, shape.capacity
    assert shape.batch == 4 and s == 16
    assert mask[0, :3].tolist() == [1, 1, 1] and not mask[0, 3:c].any()
    assert mask[0, c : c + 5].tolist() == [1] * 5 and not mask[0, c + 5 :].any()
    assert not mask[1, :c].any() and mask[1, c : c + 2].tolist() == [1, 1] and not mask[1, c + 2 :].any()
    assert not mask[3].any()  # the batch row no request fills attends to nothing
    assert inputs.arrays["position_ids"][0, :5].tolist() == [3, 4, 5, 6, 7]
    assert inputs.arrays["position_ids"][1, :2].tolist() == [0, 1]
    # Rows index the batch's windows flattened: request r's window starts at r * S.
    assert inputs.arrays["logit_rows"].tolist() == [2, 3, s + 1, 2 * s] + [2 * s] * (shape.rows - 4)
