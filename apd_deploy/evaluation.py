"""`apd-deploy eval`: run several decoding algorithms on the same task problems and compare
accuracy (with its 95% interval), tokens per step, forward passes and speed, at one or several
generation lengths."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import ALGORITHMS, PARAM, check_integer
from apd_deploy.tasks import arithmetic

if TYPE_CHECKING:
    from apd_deploy.runtime import GenerationResult, Runtime

TASKS = {"arithmetic": arithmetic}
# The demo dLLM was trained on answers of 32 positions (the solution, EOS, EOS padding).
TASK_MAX_NEW_TOKENS = {"arithmetic": 32}
DEFAULT_ALGS = "apd,leftright:1,leftright:4,leftright:8,diffusion,ar"
ALG_NUMBER = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class AlgSpec:
    """A configuration that eval and bench run: an algorithm and its own parameters."""

    label: str  # as --algs names it ('leftright:4'), or bench's sweep point ('apd R=0.5 W=4')
    alg: str
    params: dict[str, Any]


@dataclass
class AlgResult:
    alg: str
    max_new_tokens: int
    problems: int
    correct: int
    accuracy: float
    accuracy_low: float  # the 95% Wilson score interval
    accuracy_high: float
    tokens_per_step: float
    dllm_forwards_per_problem: float
    verifier_forwards_per_problem: float
    tokens_per_second: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_algs(text: str) -> list[AlgSpec]:
    """'apd,leftright:4,diffusion:16' -> specs; the number is K for leftright, steps for diffusion."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, colon, number = item.partition(":")
        key = {"leftright": "tokens_per_step", "diffusion": "steps"}.get(name)
        if name not in ALGORITHMS or (colon and (key is None or not ALG_NUMBER.fullmatch(number))):
            raise GenerationError(f"--algs: '{item}' is not understood; use {', '.join(ALGORITHMS)}, "
                                  "leftright:K (K >= 1 tokens per step) or diffusion:S (S >= 1 steps), e.g. apd,leftright:4")
        specs.append(AlgSpec(item, name, {key: int(number)} if colon else {}))
    if not specs:
        raise GenerationError("--algs is empty; name at least one algorithm")
    return specs


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: unlike p ± z·se it stays inside [0, 1] and
    does not shrink to a point at 0 or n correct."""
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class EvalPlan:
    """Everything `evaluate` will run, checked: problems, their prompt ids, parameters per algorithm."""

    task: str
    problems: list[Any]
    prompts: list[np.ndarray]
    runs: list[tuple[AlgSpec, dict[str, Any]]]


def plan(runtime: Runtime, task: str = "arithmetic", split: str = "test", n: int = 200,
         algs: str | list[AlgSpec] = DEFAULT_ALGS,
         params: dict[str, Any] | None = None, lengths: list[int] | None = None) -> EvalPlan:
    """Check every argument against the runtime before any problem is solved. lengths: the
    max_new_tokens to run each algorithm at (default: the task's, or params' max_new_tokens)."""
    if task not in TASKS:
        raise GenerationError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    check_integer("--n", n, 1)
    if split not in arithmetic.SPLITS:
        raise GenerationError(f"--split must be one of {', '.join(arithmetic.SPLITS)}, got {split!r}")
    if runtime.tokenizer is None:
        raise GenerationError(f"{runtime.bundle}: the bundle has no tokenizer; task prompts are text")
    specs = parse_algs(algs) if isinstance(algs, str) else algs
    params = {"max_new_tokens": TASK_MAX_NEW_TOKENS[task], **{k: v for k, v in (params or {}).items() if v is not None}}
    problems = list(itertools.islice(TASKS[task].problems(split), n))
    chat = bool(runtime.tokenizer.chat_template)
    prompts = [runtime.prompt_ids(p.question, chat=chat) for p in problems]
    longest = max(len(p) for p in prompts)
    for length in lengths or []:
        PARAM["max_new_tokens"].check(length)
    runs = []
    for length in dict.fromkeys(lengths or [params["max_new_tokens"]]):  # in order, once each
        shared = {**params, "max_new_tokens": length}
        runtime.fit(runtime.params(**shared), longest)  # the shared options, named as given
        for spec in specs:
            chosen = {**shared, **spec.params}
            try:
                runtime.fit(runtime.params(alg=spec.alg, **chosen), longest)
            except GenerationError as exc:
                raise GenerationError(f"--algs '{spec.label}': {exc.template}", exc.param) from None
            runs.append((spec, chosen))
    return EvalPlan(task, problems, prompts, runs)


def run(runtime: Runtime, work: EvalPlan, progress: Callable[[], None] = lambda: None,
        batch_size: int = 1, lanes: int = 1) -> list[AlgResult]:
    """Solve the planned problems with each planned algorithm: one at a time, or `batch_size`
    decoding together (the same answers at temperature 0; seconds are then wall time)."""
    check_integer("--batch-size", batch_size, 1)
    results = []
    n = len(work.problems)
    for spec, params in work.runs:
        started = time.perf_counter()
        outs = _solve(runtime, work.prompts, {"alg": spec.alg, **params}, batch_size, lanes, progress)
        wall = time.perf_counter() - started
        correct = sum(TASKS[work.task].extract_answer(out.text) == problem.answer
                      for out, problem in zip(outs, work.problems))
        tokens, steps = sum(len(out.token_ids) for out in outs), sum(out.steps for out in outs)
        dllm, verifier = sum(out.dllm_forwards for out in outs), sum(out.verifier_forwards for out in outs)
        # Alone, the time spent generating; in a batch, the wall time (requests overlap).
        seconds = sum(out.seconds for out in outs) if batch_size == 1 else wall
        results.append(AlgResult(spec.label, params["max_new_tokens"], n, correct, correct / n,
                                 *wilson_interval(correct, n), tokens / max(steps, 1), dllm / n, verifier / n,
                                 tokens / seconds if seconds else 0.0, round(seconds, 3)))
    return results


def _solve(runtime: Runtime, prompts: list[np.ndarray], params: dict[str, Any], batch_size: int, lanes: int,
           progress: Callable[[], None]) -> list[GenerationResult]:
    if batch_size == 1:
        outs = []
        for prompt in prompts:
            outs.append(runtime.generate(prompt, **params))
            progress()
        return outs
    return runtime.generate_many(prompts, max_batch=batch_size, lanes=lanes, progress=progress, **params)


def evaluate(runtime: Runtime, task: str = "arithmetic", split: str = "test", n: int = 200,
             algs: str | list[AlgSpec] = DEFAULT_ALGS,
             params: dict[str, Any] | None = None, progress: Callable[[], None] = lambda: None,
             batch_size: int = 1, lanes: int = 1, lengths: list[int] | None = None) -> list[AlgResult]:
    """`plan`, then `run`: every argument is checked before the first problem is solved."""
    return run(runtime, plan(runtime, task, split, n, algs, params, lengths), progress, batch_size, lanes)


def format_table(results: list[AlgResult]) -> str:
    header = ("alg", "max new", "accuracy [95% interval]", "tokens/step", "dLLM fwd/problem", "verifier fwd/problem",
              "tokens/s")
    rows = [header] + [(r.alg, str(r.max_new_tokens),
                        f"{r.accuracy:.1%} ({r.correct}/{r.problems}) [{r.accuracy_low:.1%}, {r.accuracy_high:.1%}]",
                        f"{r.tokens_per_step:.2f}", f"{r.dllm_forwards_per_problem:.1f}",
                        f"{r.verifier_forwards_per_problem:.1f}", f"{r.tokens_per_second:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
