"""Option types and checks shared by the CLI's commands: a bad value is a usage error (exit status
2, with the usage line) found before any bundle is loaded or any work starts."""

from __future__ import annotations

import math
import re
from typing import Any

import click

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import SEED_LIMIT
from apd_deploy.runtime.threads import THREADS_PER_CORE, too_many_threads

# -h as well as --help, on the group and on every command.
CONTEXT = {"help_option_names": ["-h", "--help"]}
DIGITS = re.compile(r"[0-9]+")


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click's FloatRange lets `inf` through when there is no
    upper bound, and `nan` through always (every comparison with nan is false)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class IntList(click.ParamType):
    """Comma-separated integers of at least `minimum` (spaces allowed), e.g. `1,2,3`."""

    name = "ints"

    def __init__(self, minimum: int, noun: str, example: str) -> None:
        self.minimum, self.noun, self.example = minimum, noun, example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):  # click's contract: converting a converted value returns it
            return value
        items = [item.strip() for item in value.split(",")]
        for position, item in enumerate(items, 1):
            if not DIGITS.fullmatch(item) or int(item) < self.minimum:
                what = "empty" if not item else f"{item!r}, not a {self.noun}"
                self.fail(f"{value!r}: item {position} is {what}; give comma-separated {self.noun}s, e.g. "
                          f"{self.example}.", param, ctx)
        return [int(item) for item in items]


def library_checked(check: Any) -> Any:
    """A click callback that runs `check` (a library function that raises GenerationError naming the
    option) on the value, turning its error into a usage error; the value passes on unchanged."""

    def unchanged(value: Any) -> Any:
        check(value)
        return value

    return library_parsed(unchanged)


def library_parsed(parse: Any) -> Any:
    """A click callback that turns the value into `parse(value)`; a GenerationError (which names
    the option) becomes a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return None if value is None else parse(value)
        except GenerationError as exc:
            raise click.UsageError(str(exc), ctx) from None

    return callback


def apd_options(command: Any) -> Any:
    """R, W and M, as generate and eval take them."""
    options = [
        click.option("--apd-mixture-weight", "apd_mixture_weight", type=FiniteFloat(0, 1),
                     help="R: the dLLM's weight in the acceptance target; 1 accepts every drafted token  "
                          "[default: the bundle's, 0.7]"),
        click.option("--kv-window", type=click.IntRange(min=1),
                     help="W: committed positions the dLLM recomputes each step  [default: the bundle's, 16]"),
        click.option("--max-lookahead", type=click.IntRange(min=1),
                     help="M: masked positions drafted and verified per step, at most  [default: the bundle's, 100]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command: Any) -> Any:
    """Temperature, top-p, top-k and seed, as generate and eval take them."""
    options = [
        click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
                     help="Sampling temperature; 0 takes the most likely token everywhere (no randomness)."),
        click.option("--top-p", type=FiniteFloat(0, 1, min_open=True),
                     help="At T > 0, sample only among the most likely tokens whose probabilities add up to P.  "
                          "[default: no limit]"),
        click.option("--top-k", type=click.IntRange(min=1),
                     help="At T > 0, sample only among the K most likely tokens.  [default: no limit]"),
        click.option("--seed", type=click.IntRange(0, SEED_LIMIT - 1),
                     help="Random seed for T > 0: the same seed gives the same tokens  "
                          "[default: a fresh one, printed with the statistics]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class ThreadCount(click.IntRange):
    """Threads for this machine: at least 1, at most THREADS_PER_CORE x the cores this process may
    run on (see apd_deploy.runtime.threads)."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        reason = too_many_threads(number)
        if reason is not None:
            self.fail(f"{reason}.", param, ctx)
        return number


THREADS_BOUND = f"at most {THREADS_PER_CORE}x the cores"


def local_threads_option(command: Any) -> Any:
    """--threads of a command that runs the models in this process."""
    return click.option("--threads", type=ThreadCount(),
                        help=f"onnxruntime threads per model, {THREADS_BOUND}  "
                             "[default: every core this process may run on]")(command)


def threads_option(command: Any) -> Any:
    """serve's --threads: with --ray the replicas run on other machines, which check it against
    their own cores (Runtime.load) and the Ray cluster's CPUs."""
    return click.option("--threads", type=click.IntRange(min=1),
                        help="onnxruntime threads per model  [default: every core this process may run on]")(command)
