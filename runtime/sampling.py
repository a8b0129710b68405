"""Sampling by the Gumbel-max trick, so that two distributions can share one noise draw.

`argmax(logits / T + G)` with G ~ Gumbel(0, 1) i.i.d. per vocabulary entry is a sample of
softmax(logits / T). APD draws G once per position and uses it for both the dLLM's draft and the
mixture target: where the two distributions agree the two samples agree, which is the coupling
the paper describes. At T = 0 there is no noise and everything is an argmax.

Every function here takes numpy or cupy arrays and works on the device the arrays live on.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Per-request sampling state: the parameters and the random generator (on the array
    module's device, so the same seed gives the same tokens on the same backend)."""

    def __init__(self, params: SamplingParams, vocab_size: int, xp: ModuleType = np) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.xp = xp
        self.seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rng = xp.random.default_rng(self.seed)

    def noise(self, rows: int):
        """Gumbel noise [rows, vocab], or None when greedy."""
        if self.params.greedy:
            return None
        uniform = self.rng.random((rows, self.vocab_size), dtype=np.float32)
        # Keep u away from 0 and 1, where -log(-log(u)) is infinite.
        uniform = self.xp.clip(uniform, np.float32(1e-20), np.float32(1.0 - 1e-7))
        return -self.xp.log(-self.xp.log(uniform))

    def scores(self, logits):
        """logits / T restricted to the top-k / top-p set (-inf elsewhere). At T = 0 the raw logits:
        filters cannot change an argmax, so they are skipped."""
        p, xp = self.params, self.xp
        if p.greedy:
            return logits
        scores = logits.astype(np.float32) / np.float32(p.temperature)
        if p.top_k is not None and p.top_k < scores.shape[-1]:
            kth = xp.partition(scores, -p.top_k, axis=-1)[:, -p.top_k][:, None]
            scores = xp.where(scores < kth, -np.inf, scores)
        if p.top_p is not None and p.top_p < 1.0:
            scores = top_p_filter(xp, scores, p.top_p)
        return scores

    def sample(self, logits):
        """One token per row of `logits` [rows, vocab]."""
        return pick(self.xp, self.scores(logits), self.noise(logits.shape[0]))


def pick(xp: ModuleType, scores, noise):
    return xp.argmax(scores if noise is None else scores + noise, axis=-1)


def top_p_filter(xp: ModuleType, scores, top_p: float):
    """Keep the smallest set of highest-probability tokens whose mass reaches top_p (at least one)."""
    order = xp.argsort(-scores, axis=-1)
    ordered = xp.take_along_axis(scores, order, axis=-1)
    probs = softmax(xp, ordered)
    drop_sorted = xp.cumsum(probs, axis=-1) - probs >= top_p
    drop = xp.empty_like(drop_sorted)
    drop[xp.arange(len(order))[:, None], order] = drop_sorted
    return xp.where(drop, -np.inf, scores)


def softmax(xp: ModuleType, scores):
    shifted = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
