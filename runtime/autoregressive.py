"""The verifier alone, one token per step with its KV cache: the speed reference."""

from __future__ import annotations

import numpy as np

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step


def autoregressive(canvas: Canvas) -> Decoder:
    x, end = canvas.x, len(canvas.x)
    cache = canvas.new_cache("verifier", end)
    fed_from = 0
    for curr in range(canvas.prompt_len, end):
        last_row = np.array([curr - fed_from - 1], dtype=np.int64)  # the prompt's other rows need no logits
        logits, new_kv = yield from canvas.run("verifier", x[fed_from:curr], cache, last_row)
        cache.append(new_kv)
        token = to_host(canvas.sampler.sample(logits[:, : canvas.vocab_size]))
        x[curr] = token[0]
        fed_from = curr
        yield Step(1, token)
