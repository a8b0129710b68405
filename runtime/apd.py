"""Adaptive Parallel Decoding (../shared/APD.md, "One decoding run"): the dLLM drafts up to M
masked positions in one pass, the AR verifier scores the draft in one pass, and the longest
prefix on which the draft equals a sample of the mixture R·dLLM + (1-R)·AR is committed."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step, WindowedDLLM
from apd_deploy.runtime.engine import DecoderEngine
from apd_deploy.runtime.sampling import pick


def accepted_length(xp: ModuleType, draft, target) -> int:
    """The first drafted token is always accepted; then the prefix where draft == target.
    One scalar crosses to the host."""
    stop = xp.concatenate([draft[1:] != target[1:], xp.ones(1, dtype=bool)])
    return 1 + int(xp.argmax(stop))


def apd(canvas: Canvas, dllm: DecoderEngine, verifier: DecoderEngine,
        mixture_weight: float, kv_window: int, max_lookahead: int) -> Decoder:
    x, sampler, xp, end = canvas.x, canvas.sampler, canvas.xp, len(canvas.x)
    window = WindowedDLLM(dllm, canvas, kv_window)
    ar_cache = verifier.new_cache(end)
    curr = canvas.prompt_len
    ar_next = None  # the verifier's logits for position curr, saved from the previous step
    while curr < end:
        right = min(curr + max_lookahead, end)
        dllm_scores = sampler.scores(window.predict(curr, right))
        noise = sampler.noise(right - curr)
        draft = pick(xp, dllm_scores, noise)

        if ar_next is None:  # first step: prefill the prompt together with the draft
            fed = xp.concatenate([xp.asarray(x[:curr]), draft])
            logits, new_kv = canvas.run("verifier", verifier, fed, ar_cache)
            ar = logits[curr - 1 : right - 1]
        else:  # the cache holds [0, curr): feed the draft only
            logits, new_kv = canvas.run("verifier", verifier, draft, ar_cache)
            ar = xp.concatenate([ar_next[None], logits[: right - curr - 1]])
        ar = ar[:, : canvas.vocab_size]

        if not sampler.params.greedy:
            ar = ar / np.float32(sampler.params.temperature)
        # R = 0 must not meet the -inf of top-p/top-k filtered dLLM scores (0 * -inf is nan).
        target_scores = ar if mixture_weight == 0 else mixture_weight * dllm_scores + (1 - mixture_weight) * ar
        accepted = accepted_length(xp, draft, pick(xp, target_scores, noise))

        committed = to_host(draft[:accepted])
        x[curr : curr + accepted] = committed
        # Keep the verifier's cache up to the accepted prefix: those keys were computed from
        # exactly the tokens now committed.
        ar_cache.append(new_kv, curr + accepted - ar_cache.length)
        # The row predicting position curr + accepted is the output of position curr + accepted - 1.
        ar_next = logits[curr + accepted - 1 - (right - len(logits))]
        window.advance(curr)
        curr += accepted
        yield Step(accepted, committed)
