"""Adaptive Parallel Decoding (docs/apd.md, "One decoding run"): the dLLM drafts up to M
masked positions in one pass, the AR verifier scores the draft, and the longest prefix on which
the draft equals a sample of the mixture R·dLLM + (1-R)·AR is committed."""

from __future__ import annotations

import numpy as np

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step, WindowedDLLM
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.sampling import pick


def apd(canvas: Canvas, mixture_weight: float, kv_window: int, max_lookahead: int,
        first_verify_chunk: int | None) -> Decoder:
    """first_verify_chunk: draft tokens the verifier scores in its first call of a step (each
    further call doubles), or None for the whole draft (see `DecoderEngine.first_verify_chunk`)."""
    x, sampler, xp, end = canvas.x, canvas.sampler, canvas.xp, len(canvas.x)
    window = WindowedDLLM(canvas, kv_window)
    ar_cache = canvas.new_cache("verifier", end)
    curr = canvas.prompt_len
    ar_next = None  # the verifier's logits for position curr, saved from the previous step
    while curr < end:
        right = min(curr + max_lookahead, end)
        dllm_scores = sampler.scores((yield from window.predict(curr, right)))
        noise = sampler.noise(right - curr)
        draft = pick(xp, dllm_scores, noise)
        accepted, ar_next = yield from verify(canvas, ar_cache, curr, draft, dllm_scores, noise, ar_next,
                                              mixture_weight, first_verify_chunk)
        committed = to_host(draft[:accepted])
        x[curr : curr + accepted] = committed
        window.advance(curr)
        curr += accepted
        yield Step(accepted, committed)


def verify(canvas: Canvas, cache: KVCache, curr: int, draft, dllm_scores, noise, ar_next, mixture_weight: float,
           first_verify_chunk: int | None):
    """Score `draft` (positions curr..) with the verifier and return how many tokens are accepted
    and the verifier's logits for the position after them.

    Acceptance is a prefix, so the draft is fed in growing chunks and scoring stops with the first
    chunk that holds a rejection: nothing after it can matter. The first drafted token is always
    accepted. On return `cache` holds exactly [0, curr + accepted): keys computed from the tokens
    now committed.
    """
    xp, sampler, size = canvas.xp, canvas.sampler, len(draft)
    start, chunk = 0, first_verify_chunk or size
    while True:
        stop = min(start + chunk, size)
        if cache.length == 0:  # first step: prefill the prompt together with the first chunk
            fed = xp.concatenate([xp.asarray(canvas.x[:curr]), draft[:stop]])
            # Logits from the prompt's last row on: the rows before it predict the prompt itself.
            rows, new_kv = yield from canvas.run("verifier", fed, cache, np.arange(curr - 1, curr + stop, dtype=np.int64))
        else:  # the cache holds [0, curr + start)
            logits, new_kv = yield from canvas.run("verifier", draft[start:stop], cache)
            rows = xp.concatenate([ar_next[None], logits])
        cache.append(new_kv)
        # rows[k] is the verifier's prediction for position curr + start + k (its output row at
        # the position before: logits are shifted).
        ar = rows[: stop - start, : canvas.vocab_size]
        if not sampler.params.greedy:
            ar = ar / np.float32(sampler.params.temperature)
        # R = 0 must not meet the -inf of top-p/top-k filtered dLLM scores (0 * -inf is nan).
        mixed = ar if mixture_weight == 0 else mixture_weight * dllm_scores[start:stop] + (1 - mixture_weight) * ar
        target = pick(xp, mixed, None if noise is None else noise[start:stop])
        rejected = draft[start:stop] != target
        if start == 0:
            rejected[0] = False
        # One scalar to the host: the first rejection in this chunk, or the chunk's length.
        first = int(xp.argmax(xp.concatenate([rejected, xp.ones(1, dtype=bool)])))
        if first < stop - start or stop == size:
            accepted = start + first
            cache.crop(curr + accepted)
            # A copy: the engine may reuse its logits buffer in the next call.
            return accepted, rows[first].copy()
        ar_next, start, chunk = rows[-1].copy(), stop, chunk * 2
