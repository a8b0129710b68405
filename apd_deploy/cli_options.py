"""Option types and checks shared by the CLI's commands: a bad value is a usage error (exit status
2, with the usage line) found before any bundle is loaded or any work starts."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import click

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import PARAM, called
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


def in_cli_terms(exc: GenerationError) -> str:
    """The error's message naming flags."""
    return exc.in_terms_of(lambda keyword: called(keyword, "flag"))


class Parsed(click.ParamType):
    """A value parsed once, by a library function that raises GenerationError (a usage error here)."""

    def __init__(self, parse: Callable[[str], Any], name: str) -> None:
        self.parse, self.name = parse, name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # click's contract: converting a converted value returns it
            return value
        try:
            return self.parse(value)
        except GenerationError as exc:
            raise click.UsageError(in_cli_terms(exc), ctx) from None


def param_option(name: str, **changes: Any) -> Callable[[Any], Any]:
    """The option of a generation parameter, as the table declares it (`changes`: this command's)."""
    p = PARAM[name]
    kind = (click.Choice(p.choices) if p.choices else click.IntRange(p.low, p.high) if p.type is int
            else FiniteFloat(p.low, p.high, min_open=p.low_open))
    shown = p.default_help or (f"the bundle's, {p.default}" if p.group == "apd" else p.default)
    return click.option(p.flag, p.name, **{"type": kind, "default": None if p.group == "apd" else p.default,
                                           "help": f"{p.help}  [default: {shown}]", **changes})


def param_options(*names: str) -> Callable[[Any], Any]:
    def decorate(command: Any) -> Any:
        for name in reversed(names):
            command = param_option(name)(command)
        return command

    return decorate


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


def slot_options(full_queue: str) -> Callable[[Any], Any]:
    """--max-batch and --max-queue of a command serving requests through the batched scheduler;
    `full_queue` says what a request gets when the queue is full."""

    def add(command: Any) -> Any:
        command = click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
                               help=f"Requests waiting for a slot; beyond it {full_queue}.")(command)
        return click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
                            help="Requests decoded together (the scheduler's slots).")(command)

    return add


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
