"""Sampling by the Gumbel-max trick, so that two distributions can share one noise draw.

`argmax(logits / T + G)` with G ~ Gumbel(0, 1) i.i.d. per vocabulary entry is a sample of
softmax(logits / T). APD draws G once per position and uses it for both the dLLM's draft and the
mixture target: where the two distributions agree the two samples agree, which is the coupling
the paper describes. At T = 0 there is no noise and everything is an argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Per-request sampling state: the parameters and the random generator."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rng = np.random.default_rng(self.seed)

    def noise(self, rows: int) -> np.ndarray | None:
        """Gumbel noise [rows, vocab], or None when greedy."""
        if self.params.greedy:
            return None
        uniform = self.rng.random((rows, self.vocab_size), dtype=np.float32)
        # Keep u away from 0 and 1, where -log(-log(u)) is infinite.
        np.clip(uniform, np.float32(1e-20), np.float32(1.0 - 1e-7), out=uniform)
        return -np.log(-np.log(uniform))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """logits / T restricted to the top-k / top-p set (-inf elsewhere). At T = 0 the raw logits:
        filters cannot change an argmax, so they are skipped."""
        p = self.params
        if p.greedy:
            return logits
        scores = logits.astype(np.float32) / np.float32(p.temperature)
        if p.top_k is not None and p.top_k < scores.shape[-1]:
            kth = np.partition(scores, -p.top_k, axis=-1)[:, -p.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if p.top_p is not None and p.top_p < 1.0:
            scores = _top_p(scores, p.top_p)
        return scores

    def sample(self, logits: np.ndarray) -> np.ndarray:
        """One token per row of `logits` [rows, vocab]."""
        return pick(self.scores(logits), self.noise(logits.shape[0]))


def pick(scores: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    return np.argmax(scores if noise is None else scores + noise, axis=-1)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of highest-probability tokens whose mass reaches top_p (at least one)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=-1)
    probs = np.exp(ordered - ordered[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    mass_before = np.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
