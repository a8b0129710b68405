"""Dream's own decoding: the whole canvas every step (no cache), and over `steps` steps the
masked positions the dLLM is most sure of are unmasked first, following Dream's schedule
(timesteps linspace(1, eps, steps + 1); at step i, unmask a 1 - s/t share of what is masked)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.canvas import Canvas, Decoder, Step
from apd_deploy.runtime.sampling import pick, softmax

ORDERS = ("confidence", "entropy", "margin")
EPS = 1e-3


def confidence(xp: ModuleType, probs, tokens, order: str):
    """How sure the dLLM is of each sampled token (higher first), as Dream scores it."""
    if order == "confidence":  # Dream's maskgit_plus
        return xp.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
    if order == "margin":  # topk_margin
        top2 = xp.partition(probs, -2, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    return (probs * xp.log(probs + 1e-10)).sum(axis=-1)  # entropy: negative entropy


def diffusion(canvas: Canvas, steps: int, order: str) -> Decoder:
    x, sampler, xp = canvas.x, canvas.sampler, canvas.xp
    empty = canvas.new_cache("dllm", 0)
    timesteps = np.linspace(1, EPS, steps + 1)
    decided = canvas.prompt_len  # end of the contiguous unmasked prefix
    for i in range(steps):
        masked = np.flatnonzero(x == canvas.mask_id)
        masked = masked[masked >= canvas.prompt_len]
        if len(masked) == 0:
            return
        # Shifted logits: the row of position j-1 predicts j.
        logits, _ = yield from canvas.run("dllm", x, empty, masked - 1)
        scores = sampler.scores(logits[:, : canvas.vocab_size])
        tokens = pick(xp, scores, sampler.noise(len(masked)))
        sure = confidence(xp, softmax(xp, scores), tokens, order)
        t, s = timesteps[i], timesteps[i + 1]
        count = int(len(masked) * (1 - s / t)) if i < steps - 1 else len(masked)
        chosen = xp.argsort(-sure, kind="stable")[:count]
        positions = masked[to_host(chosen)]
        x[positions] = to_host(tokens[chosen])
        start = decided
        while decided < len(x) and x[decided] != canvas.mask_id:
            decided += 1
        yield Step(count, x[start:decided].copy(), positions)
