"""The dLLM alone, left to right, a fixed K tokens per step, with APD's windowing.
K = 1 is the quality reference; larger K shows what naive parallel decoding costs."""

from __future__ import annotations

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step, WindowedDLLM


def leftright(canvas: Canvas, tokens_per_step: int, kv_window: int, max_lookahead: int) -> Decoder:
    x, end = canvas.x, len(canvas.x)
    window = WindowedDLLM(canvas, kv_window)
    curr = canvas.prompt_len
    while curr < end:
        right = min(curr + max_lookahead, end)
        count = min(tokens_per_step, right - curr)
        tokens = to_host(canvas.sampler.sample((yield from window.predict(curr, right, count))))
        x[curr : curr + count] = tokens
        window.advance(curr)
        curr += count
        yield Step(count, tokens)
