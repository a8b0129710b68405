"""Generation parameters: one declaration each (`PARAMS`), the owner of its name, type, range,
default and help. The runtime's checks, the command line's options, the server's body fields,
bench's sweeps and plot axes and the manifest's APD defaults all come from it.

A check's GenerationError names the parameter as `{name}` (`param`: its keyword): the command line
says the flag, the server the body field, the Python API the keyword. The Python API gets the same
checks as the command line, so a service calling `Runtime.generate` gets a GenerationError, never a
traceback from deep inside the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.diffusion import ORDERS
from apd_deploy.runtime.sampling import SamplingParams

ALGORITHMS = ("apd", "leftright", "diffusion", "ar")
# Without max_new_tokens: this many new tokens, or fewer when the prompt leaves less room.
DEFAULT_MAX_NEW_TOKENS = 128
# Seeds are reported and reused by other programs: keep them within a signed 64-bit integer.
SEED_LIMIT = 2**63


def check_integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise GenerationError unless `value` is an integer in [low, high] (no upper bound if None):
    a setting outside the table (threads, --repeat)."""
    Param(name, int, low, "", "", low=low, high=high).check(value)


@dataclass(frozen=True)
class Param:
    """One generation parameter."""

    name: str  # the keyword of Runtime.generate
    type: type  # int, float, str or bool
    default: Any  # None: settled later, as `default_help` says
    help: str  # one line, for --help
    # apd: R, W, M (the bundle's defaults, which bench sweeps); decoding: the algorithm's other
    # settings; sampling: SamplingParams'; length: how many tokens
    group: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is out of range
    choices: tuple[str, ...] = ()
    default_help: str | None = None  # the default in words, where it is not `default` itself
    cli: bool = True  # a command-line option, --name-with-dashes
    http_field: str | None = ""  # the request body's field: "" the keyword, None not taken over HTTP
    label: str | None = None  # a plot axis, its first word the short name: "W (KV window)"

    @property
    def flag(self) -> str | None:
        return f"--{self.name.replace('_', '-')}" if self.cli else None

    @property
    def field(self) -> str | None:
        return self.name if self.http_field == "" else self.http_field

    def check(self, value: Any, high: float | None = None) -> None:
        """Raise GenerationError (`param`: this one) unless `value` is in range; `high` tightens
        the upper bound (a server's limit). None is fine where the default is None."""
        if value is None and self.default is None:
            return
        high = self.high if high is None else high

        def refuse(message: str) -> None:
            raise GenerationError(message, self.name)

        if self.choices:
            if value not in self.choices:
                refuse(f"{{name}} must be one of {', '.join(self.choices)}, got {value!r}")
        elif self.type is bool:
            if not isinstance(value, bool):
                refuse(f"{{name}} must be true or false, got {value!r}")
        elif self.type is int:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                refuse(f"{{name}} must be an integer, got {value!r}")
            if value < self.low:
                refuse(f"{{name}} must be at least {self.low}, got {value}")
            if high is not None and value > high:
                refuse(f"{{name}} must be at most {high}, got {value}")
        elif (not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool)
              or not math.isfinite(value)):
            refuse(f"{{name}} must be a finite number, got {value!r}")
        elif value < self.low or value == self.low and self.low_open or high is not None and value > high:
            allowed = (f"at least {self.low:g}" if high is None else
                       f"in {'(' if self.low_open else '['}{self.low:g}, {high:g}]")
            refuse(f"{{name}} must be {allowed}, got {value}")


PARAMS: tuple[Param, ...] = (
    Param("alg", str, "apd", "apd, or a baseline: leftright (the dLLM, K tokens per step), diffusion (Dream's own), "
          "ar (the verifier).", "decoding", choices=ALGORITHMS),
    Param("max_new_tokens", int, None, "Tokens to generate at most", "length", low=1, http_field="max_tokens",
          default_help=f"{DEFAULT_MAX_NEW_TOKENS}, or fewer if the models' positions leave less room after the prompt"),
    Param("apd_mixture_weight", float, 0.7, "R: the dLLM's weight in the acceptance target; 1 accepts every drafted "
          "token", "apd", low=0, high=1, label="R (mixture weight)"),
    Param("kv_window", int, 16, "W: committed positions the dLLM recomputes each step", "apd", low=1,
          label="W (KV window)"),
    Param("max_lookahead", int, 100, "M: masked positions drafted and verified per step, at most", "apd", low=1,
          label="M (max lookahead)"),
    Param("tokens_per_step", int, 1, "K: tokens per step for --alg leftright", "decoding", low=1),
    Param("steps", int, None, "Steps for --alg diffusion, at most --max-new-tokens", "decoding", low=1,
          default_help="--max-new-tokens", http_field=None),
    Param("diffusion_order", str, "confidence", "Which positions --alg diffusion decides first: the dLLM's surest by "
          "this measure", "decoding", choices=ORDERS, http_field=None),
    Param("temperature", float, 0.0, "Sampling temperature; 0 takes the most likely token everywhere (no randomness).",
          "sampling", low=0),
    Param("top_p", float, None, "At T > 0, sample only among the most likely tokens whose probabilities add up to P.",
          "sampling", low=0, low_open=True, high=1, default_help="no limit"),
    Param("top_k", int, None, "At T > 0, sample only among the K most likely tokens.", "sampling", low=1,
          default_help="no limit"),
    Param("seed", int, None, "Random seed for T > 0: the same seed gives the same tokens", "sampling", low=0,
          high=SEED_LIMIT - 1, default_help="a fresh one, printed with the statistics"),
    Param("ignore_eos", bool, False, "Decode past EOS up to max_new_tokens (benchmarks of a fixed length)", "length",
          cli=False),
    Param("min_tokens", int, 0, "An EOS among the first min_tokens tokens does not end the generation", "length",
          low=0, cli=False),
)
PARAM = {p.name: p for p in PARAMS}
DEFAULTS = {p.name: p.default for p in PARAMS}


def called(keyword: str, attribute: str) -> str:
    """What a front end calls `keyword`: its parameter's `attribute` ('flag', 'field'), else the keyword."""
    return getattr(PARAM.get(keyword), attribute, None) or keyword


def group(name: str) -> dict[str, Param]:  # by keyword, in the table's order
    return {p.name: p for p in PARAMS if p.group == name}


@dataclass(frozen=True)
class GenerationParams:
    alg: str = DEFAULTS["alg"]
    max_new_tokens: int | None = DEFAULTS["max_new_tokens"]  # None: DEFAULT_MAX_NEW_TOKENS, or what fits after the prompt
    apd_mixture_weight: float = DEFAULTS["apd_mixture_weight"]
    kv_window: int = DEFAULTS["kv_window"]
    max_lookahead: int = DEFAULTS["max_lookahead"]
    tokens_per_step: int = DEFAULTS["tokens_per_step"]
    steps: int | None = DEFAULTS["steps"]  # diffusion; default: max_new_tokens (one token per step)
    diffusion_order: str = DEFAULTS["diffusion_order"]
    sampling: SamplingParams = SamplingParams()
    ignore_eos: bool = DEFAULTS["ignore_eos"]
    min_tokens: int = DEFAULTS["min_tokens"]

    def check(self) -> None:
        """Raise GenerationError naming the first bad parameter (`param`) and its range."""
        for p in PARAMS:
            p.check(getattr(self.sampling if p.group == "sampling" else self, p.name))
        n = self.max_new_tokens
        # Refused rather than clamped: steps beyond the number of new tokens are forward passes
        # that decide nothing, and a silently different step count would mislead a comparison.
        if self.alg == "diffusion" and self.steps is not None and n is not None and self.steps > n:
            raise GenerationError(f"{{name}} {self.steps} is more than the {n} new tokens to decide "
                                  f"({{max_new_tokens}}); use {{name}} {n} or less", "steps")
        if n is not None and self.min_tokens > n:
            raise GenerationError(f"{{name}} {self.min_tokens} is more than the {n} new tokens asked for; use "
                                  f"{{name}} {n} or less", "min_tokens")
