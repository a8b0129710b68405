"""Progress on stderr for the CLI's long stages: click's bar in a terminal; elsewhere (a log, a CI
job, a pipe) where the bar leaves only its label, a line when a stage starts and one when it ends."""

from __future__ import annotations

import sys
import time
from typing import Any

import click


def counted(count: int, noun: str) -> str:
    """'1 token', '2 tokens'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class StageLines:
    """click's progress bar interface (`with`, `update`, a settable `length`), as two plain lines:
    `LABEL N UNITs ...` once the size is known, `LABEL: done in S s` at the end."""

    def __init__(self, length: int | None, label: str, unit: str) -> None:
        self.label, self.unit = label, unit
        self._length = length
        self._started = time.perf_counter()

    @property
    def length(self) -> int | None:
        return self._length

    @length.setter
    def length(self, total: int) -> None:
        self._length = total
        self._announce()

    def _announce(self) -> None:
        click.echo(f"{self.label} {counted(self._length, self.unit)} ...", err=True)

    def __enter__(self) -> StageLines:
        self._started = time.perf_counter()
        if self._length is not None:
            self._announce()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            click.echo(f"{self.label}: done in {time.perf_counter() - self._started:.1f} s", err=True)

    def update(self, steps: int) -> None:
        pass


def progress_bar(length: int | None, label: str, unit: str) -> Any:
    """A progress bar on stderr over `length` UNITs (None: set `length` once known)."""
    if sys.stderr.isatty():
        return click.progressbar(length=length or 1, label=label, file=sys.stderr)
    return StageLines(length, label, unit)
