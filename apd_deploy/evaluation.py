"""`apd-deploy eval`: run several decoding algorithms on the same task problems and compare
accuracy, tokens per step, forward passes and speed."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from apd_deploy.errors import GenerationError
from apd_deploy.tasks import arithmetic

TASKS = {"arithmetic": arithmetic}
# The demo dLLM was trained on answers of 32 positions (the solution, EOS, EOS padding).
TASK_MAX_NEW_TOKENS = {"arithmetic": 32}
DEFAULT_ALGS = "apd,leftright:1,leftright:4,leftright:8,diffusion,ar"


@dataclass(frozen=True)
class AlgSpec:
    label: str
    alg: str
    params: dict[str, Any]


@dataclass
class AlgResult:
    alg: str
    problems: int
    correct: int
    accuracy: float
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
        name, _, number = item.partition(":")
        key = {"leftright": "tokens_per_step", "diffusion": "steps"}.get(name)
        if number and (key is None or not number.isdigit()):
            raise GenerationError(f"--algs: '{item}' is not understood; use e.g. apd, leftright:4, diffusion:16, ar")
        specs.append(AlgSpec(item, name, {key: int(number)} if number else {}))
    if not specs:
        raise GenerationError("--algs is empty; name at least one algorithm")
    return specs


def evaluate(runtime, task: str = "arithmetic", split: str = "test", n: int = 200, algs: str = DEFAULT_ALGS,
             params: dict[str, Any] | None = None, progress: Callable[[], None] = lambda: None) -> list[AlgResult]:
    if task not in TASKS:
        raise GenerationError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if n < 1:
        raise GenerationError(f"--n must be at least 1, got {n}")
    if split not in arithmetic.SPLITS:
        raise GenerationError(f"--split must be one of {', '.join(arithmetic.SPLITS)}, got {split!r}")
    if runtime.tokenizer is None:
        raise GenerationError(f"{runtime.bundle}: the bundle has no tokenizer; task prompts are text")
    specs = parse_algs(algs)
    params = {"max_new_tokens": TASK_MAX_NEW_TOKENS[task], **{k: v for k, v in (params or {}).items() if v is not None}}
    problems = list(itertools.islice(TASKS[task].problems(split), n))
    chat = bool(runtime.tokenizer.chat_template)
    prompts = [runtime.prompt_ids(p.question, chat=chat) for p in problems]
    results = []
    for spec in specs:
        correct = tokens = steps = dllm = verifier = 0
        seconds = 0.0
        for problem, prompt in zip(problems, prompts):
            out = runtime.generate(prompt, alg=spec.alg, **{**params, **spec.params})
            correct += TASKS[task].extract_answer(out.text) == problem.answer
            tokens, steps, seconds = tokens + len(out.token_ids), steps + out.steps, seconds + out.seconds
            dllm, verifier = dllm + out.dllm_forwards, verifier + out.verifier_forwards
            progress()
        results.append(AlgResult(spec.label, n, correct, correct / n, tokens / max(steps, 1), dllm / n, verifier / n,
                                 tokens / seconds if seconds else 0.0, round(seconds, 3)))
    return results


def format_table(results: list[AlgResult]) -> str:
    header = ("alg", "accuracy", "tokens/step", "dLLM fwd/problem", "verifier fwd/problem", "tokens/s")
    rows = [header] + [(r.alg, f"{r.accuracy:.1%} ({r.correct}/{r.problems})", f"{r.tokens_per_step:.2f}",
                        f"{r.dllm_forwards_per_problem:.1f}", f"{r.verifier_forwards_per_problem:.1f}",
                        f"{r.tokens_per_second:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
