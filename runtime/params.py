"""Generation parameters, checked once before any engine call.

The Python API gets the same checks as the command line (where click refuses most of these
values first), so a service calling `Runtime.generate` gets a GenerationError, never a traceback
from deep inside the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.diffusion import ORDERS
from apd_deploy.runtime.sampling import SamplingParams

ALGORITHMS = ("apd", "leftright", "diffusion", "ar")
# Without --max-new-tokens: this many new tokens, or fewer when the prompt leaves less room.
DEFAULT_MAX_NEW_TOKENS = 128
# Seeds are reported and reused by other programs: keep them within a signed 64-bit integer.
SEED_LIMIT = 2**63


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def check_integer(flag: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise GenerationError unless `value` is an integer in [low, high] (no upper bound if None)."""
    if not is_integer(value):
        raise GenerationError(f"{flag} must be an integer, got {value!r}")
    if value < low:
        raise GenerationError(f"{flag} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise GenerationError(f"{flag} must be at most {high}, got {value}")


def check_number(flag: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """Raise GenerationError unless `value` is a finite number for which `ok` holds."""
    if not is_finite_number(value):
        raise GenerationError(f"{flag} must be a finite number, got {value!r}")
    if not ok(value):
        raise GenerationError(f"{flag} must be {allowed}, got {value}")


@dataclass(frozen=True)
class GenerationParams:
    alg: str = "apd"
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS, or what fits after the prompt
    apd_mixture_weight: float = 0.7
    kv_window: int = 16
    max_lookahead: int = 100
    tokens_per_step: int = 1
    steps: int | None = None  # diffusion; default: max_new_tokens (one token per step)
    diffusion_order: str = "confidence"
    sampling: SamplingParams = SamplingParams()
    ignore_eos: bool = False  # decode past EOS up to max_new_tokens (benchmarks of a fixed length)
    min_tokens: int = 0  # an EOS among the first min_tokens tokens does not end the generation

    def check(self) -> None:
        """Raise GenerationError naming the first bad parameter (as its CLI flag) and its range."""
        if self.alg not in ALGORITHMS:
            raise GenerationError(f"--alg must be one of {', '.join(ALGORITHMS)}, got {self.alg!r}")
        if self.max_new_tokens is not None:
            check_integer("--max-new-tokens", self.max_new_tokens, 1)
        check_number("--apd-mixture-weight", self.apd_mixture_weight, lambda r: 0 <= r <= 1, "in [0, 1]")
        check_integer("--kv-window", self.kv_window, 1)
        check_integer("--max-lookahead", self.max_lookahead, 1)
        check_integer("--tokens-per-step", self.tokens_per_step, 1)
        if self.steps is not None:
            check_integer("--steps", self.steps, 1)
            # Refused rather than clamped: steps beyond the number of new tokens are forward passes
            # that decide nothing, and a silently different step count would mislead a comparison.
            if self.alg == "diffusion" and self.max_new_tokens is not None and self.steps > self.max_new_tokens:
                raise GenerationError(
                    f"--steps {self.steps} is more than the {self.max_new_tokens} new tokens to decide "
                    f"(--max-new-tokens); use --steps {self.max_new_tokens} or less"
                )
        if not isinstance(self.ignore_eos, bool):
            raise GenerationError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        check_integer("min_tokens", self.min_tokens, 0)
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise GenerationError(f"min_tokens {self.min_tokens} is more than the {self.max_new_tokens} new tokens "
                                  f"asked for; use min_tokens {self.max_new_tokens} or less")
        if self.diffusion_order not in ORDERS:
            raise GenerationError(f"--diffusion-order must be one of {', '.join(ORDERS)}, got {self.diffusion_order!r}")
        s = self.sampling
        check_number("--temperature", s.temperature, lambda t: t >= 0, "at least 0")
        if s.top_p is not None:
            check_number("--top-p", s.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        if s.top_k is not None:
            check_integer("--top-k", s.top_k, 1)
        if s.seed is not None:
            check_integer("--seed", s.seed, 0, SEED_LIMIT - 1)
