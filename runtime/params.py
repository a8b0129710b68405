"""Generation parameters, checked once before any engine call."""

from __future__ import annotations

from dataclasses import dataclass

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.diffusion import ORDERS
from apd_deploy.runtime.sampling import SamplingParams

ALGORITHMS = ("apd", "leftright", "diffusion", "ar")


@dataclass(frozen=True)
class GenerationParams:
    alg: str = "apd"
    max_new_tokens: int = 128
    apd_mixture_weight: float = 0.7
    kv_window: int = 16
    max_lookahead: int = 100
    tokens_per_step: int = 1
    steps: int | None = None  # diffusion; default: max_new_tokens (one token per step)
    diffusion_order: str = "confidence"
    sampling: SamplingParams = SamplingParams()

    def check(self) -> None:
        """Raise GenerationError naming the first bad parameter (as its CLI flag) and its range."""
        s = self.sampling
        checks = [
            (self.alg in ALGORITHMS, "--alg", f"one of {', '.join(ALGORITHMS)}", self.alg),
            (self.max_new_tokens >= 1, "--max-new-tokens", "at least 1", self.max_new_tokens),
            (0.0 <= self.apd_mixture_weight <= 1.0, "--apd-mixture-weight", "in [0, 1]", self.apd_mixture_weight),
            (self.kv_window >= 1, "--kv-window", "at least 1", self.kv_window),
            (self.max_lookahead >= 1, "--max-lookahead", "at least 1", self.max_lookahead),
            (self.tokens_per_step >= 1, "--tokens-per-step", "at least 1", self.tokens_per_step),
            (self.steps is None or self.steps >= 1, "--steps", "at least 1", self.steps),
            (self.diffusion_order in ORDERS, "--diffusion-order", f"one of {', '.join(ORDERS)}", self.diffusion_order),
            (s.temperature >= 0, "--temperature", "at least 0", s.temperature),
            (s.top_p is None or 0 < s.top_p <= 1, "--top-p", "in (0, 1]", s.top_p),
            (s.top_k is None or s.top_k >= 1, "--top-k", "at least 1", s.top_k),
        ]
        for ok, flag, allowed, value in checks:
            if not ok:
                raise GenerationError(f"{flag} must be {allowed}, got {value}")
