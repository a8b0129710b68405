"""The verifier alone, one token per step with its KV cache: the speed reference."""

from __future__ import annotations

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step
from apd_deploy.runtime.engine import DecoderEngine


def autoregressive(canvas: Canvas, verifier: DecoderEngine) -> Decoder:
    x, end = canvas.x, len(canvas.x)
    cache = verifier.new_cache(end)
    fed_from = 0
    for curr in range(canvas.prompt_len, end):
        logits, new_kv = canvas.run("verifier", verifier, x[fed_from:curr], cache)
        cache.append(new_kv)
        token = to_host(canvas.sampler.sample(logits[-1:, : canvas.vocab_size]))
        x[curr] = token[0]
        fed_from = curr
        yield Step(1, token)
