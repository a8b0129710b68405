"""Run benchmark configurations: each algorithm / parameter combination over the same prompts,
repeated, with the runtime's per-step time split into dLLM engine, verifier engine and host logic,
and the PyTorch-eager loop on the same checkpoints for the ratio."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apd_deploy.errors import GenerationError
from apd_deploy.evaluation import TASK_MAX_NEW_TOKENS, TASKS, AlgSpec
from apd_deploy.runtime.params import check_integer, group

if TYPE_CHECKING:
    from apd_deploy.runtime import Runtime

SWEEPABLE = group("apd")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    answer: int | None = None  # for tasks with checkable answers


@dataclass
class ConfigResult:
    label: str
    alg: str
    params: dict[str, Any]
    tokens_per_second: float  # median over repeats
    tokens_per_second_min: float
    tokens_per_second_max: float
    tokens_per_step: float
    dllm_forwards_per_prompt: float
    verifier_forwards_per_prompt: float
    step_ms: float  # mean wall time of one step
    dllm_ms_per_step: float
    verifier_ms_per_step: float
    host_ms_per_step: float
    accuracy: float | None
    eager_tokens_per_second: float | None = None
    speedup_vs_eager: float | None = None
    same_tokens_as_eager: bool | None = None
    tokens: list[list[int]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tokens")
        out["params"] = json.dumps(self.params, sort_keys=True)
        return out


def parse_sweep(sweep: str) -> tuple[str, list]:
    """'kv_window=4,16' -> ('kv_window', [4, 16]) (APD parameters only)."""
    key, _, values = sweep.partition("=")
    param = SWEEPABLE.get(key.strip().replace("-", "_"))
    if param is None or not values:
        raise GenerationError(f"--sweep '{sweep}': use NAME=V1,V2 with NAME one of {', '.join(SWEEPABLE)}")
    try:
        grid = [param.type(v) for v in values.split(",")]
    except ValueError:
        raise GenerationError(f"--sweep '{sweep}': values must be {param.type.__name__}s") from None
    for value in grid:
        try:
            param.check(value)
        except GenerationError as exc:
            raise GenerationError(f"--sweep '{sweep}': {exc.template}", exc.param) from None
    return param.name, grid


def configs(specs: list[AlgSpec], grid: dict[str, list]) -> list[AlgSpec]:
    """The configurations to run: each algorithm, APD once per point of the sweeps' grid."""
    out = []
    for spec in specs:
        if spec.alg != "apd" or not grid:
            out.append(spec)
            continue
        keys = sorted(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            params = dict(zip(keys, values))
            label = " ".join(f"{SWEEPABLE[k].label.split()[0]}={v}" for k, v in params.items())
            out.append(AlgSpec(f"apd {label}", "apd", params))
    return out


def load_prompts(runtime, task: str | None, prompts_file: str | None, random_prompts: int | None,
                 n: int, seed: int = 0) -> list[Prompt]:
    """Exactly one source: a task's test problems, a file (one text prompt per line), or random ids."""
    check_prompt_source(task, prompts_file, random_prompts, n)
    if task is not None:
        chat = bool(runtime.tokenizer and runtime.tokenizer.chat_template)
        problems = itertools.islice(TASKS[task].problems("test"), n)
        return [Prompt(runtime.prompt_ids(p.question, chat=chat).tolist(), p.answer) for p in problems]
    if prompts_file is not None:
        return [Prompt(runtime.prompt_ids(line).tolist()) for line in read_prompt_lines(prompts_file)]
    rng = random.Random(seed)
    vocab = runtime.vocab_size
    excluded = runtime.eos_ids | {runtime.mask_id}
    return [Prompt([t for t in (rng.randrange(vocab) for _ in range(64)) if t not in excluded][:16])
            for _ in range(random_prompts)]


def check_prompt_source(task: str | None, prompts_file: str | None, random_prompts: int | None, n: int) -> None:
    """The prompt options, before anything is loaded."""
    if sum(x is not None for x in (task, prompts_file, random_prompts)) != 1:
        raise GenerationError("give exactly one of --task, --prompts FILE or --random-prompts N")
    if task is not None and task not in TASKS:
        raise GenerationError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    check_integer("--n", n, 1)
    if random_prompts is not None:
        check_integer("--random-prompts", random_prompts, 1)
    if prompts_file is not None:
        read_prompt_lines(prompts_file)


def read_prompt_lines(path: str) -> list[str]:
    """The prompts of a --prompts file: its non-blank lines, stripped; UTF-8 text, at least one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GenerationError(f"--prompts {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise GenerationError(f"--prompts {path}: cannot read it ({exc.strerror})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise GenerationError(f"--prompts {path}: no prompts; give one per line")
    return lines


def check_benchmark(runtime: Runtime, specs: list[AlgSpec], grid: dict[str, list], prompts: list[Prompt],
                    max_new_tokens: int, repeat: int) -> list[AlgSpec]:
    """Every configuration, checked against the runtime and the longest prompt before any is timed."""
    check_integer("--repeat", repeat, 1)
    chosen = configs(specs, grid)
    longest = max(len(p.ids) for p in prompts)
    for config in chosen:
        try:
            runtime.fit(runtime.params(alg=config.alg, max_new_tokens=max_new_tokens, **config.params), longest)
        except GenerationError as exc:
            raise GenerationError(f"{config.label}: {exc.template}", exc.param) from None
    return chosen


def run_config(runtime, config: AlgSpec, prompts: list[Prompt], max_new_tokens: int, repeat: int,
               extract: Callable[[str], int | None] | None, progress: Callable[[], None]) -> ConfigResult:
    def generate_all(runtime) -> list:
        outs = []
        for prompt in prompts:
            outs.append(runtime.generate(prompt.ids, alg=config.alg, max_new_tokens=max_new_tokens, **config.params))
            progress()
        return outs

    speeds, last = [], None
    for _ in range(repeat):
        last = generate_all(runtime)
        speeds.append(sum(len(o.token_ids) for o in last) / sum(o.seconds for o in last))
    timed = last
    if runtime.xp.__name__ != "numpy":
        # GPU engine calls return before their work ends: one more pass, waiting for each call,
        # splits the step into dLLM, verifier and host time (its speed is not reported).
        timed = generate_all(runtime.timed())
    steps = sum(o.steps for o in last)
    tokens = sum(len(o.token_ids) for o in last)
    dllm_s, verifier_s = sum(o.dllm_seconds for o in timed), sum(o.verifier_seconds for o in timed)
    total_s = sum(o.seconds for o in timed)
    accuracy = None
    if extract is not None and all(p.answer is not None for p in prompts):
        accuracy = sum(extract(o.text or "") == p.answer for o, p in zip(last, prompts)) / len(prompts)
    return ConfigResult(
        config.label, config.alg, config.params, statistics.median(speeds), min(speeds), max(speeds),
        tokens / steps, sum(o.dllm_forwards for o in last) / len(prompts), sum(o.verifier_forwards for o in last) / len(prompts),
        1000 * total_s / steps, 1000 * dllm_s / steps, 1000 * verifier_s / steps, 1000 * (total_s - dllm_s - verifier_s) / steps,
        accuracy, tokens=[o.token_ids for o in last])


def run_eager(eager, runtime, result: ConfigResult, prompts: list[Prompt], max_new_tokens: int, repeat: int,
              progress: Callable[[], None]) -> None:
    """Fill in the eager figures of an APD configuration (temperature 0)."""
    defaults = runtime.defaults
    p = {"apd_mixture_weight": defaults.apd_mixture_weight, "kv_window": defaults.kv_window,
         "max_lookahead": defaults.max_lookahead, **result.params}
    speeds, tokens = [], []
    for _ in range(repeat):
        outs = []
        for prompt in prompts:
            outs.append(eager.generate(prompt.ids, max_new_tokens, p["apd_mixture_weight"], p["kv_window"],
                                       p["max_lookahead"], runtime.mask_id, runtime.eos_ids))
            progress()
        speeds.append(sum(len(o.token_ids) for o in outs) / sum(o.seconds for o in outs))
        tokens = [o.token_ids for o in outs]
    result.eager_tokens_per_second = statistics.median(speeds)
    result.speedup_vs_eager = result.tokens_per_second / result.eager_tokens_per_second
    result.same_tokens_as_eager = tokens == result.tokens


def default_max_new_tokens(task: str | None) -> int:
    return TASK_MAX_NEW_TOKENS.get(task, 256) if task else 256


def benchmark(runtime, specs: list[AlgSpec], grid: dict[str, list], prompts: list[Prompt], max_new_tokens: int,
              repeat: int, task: str | None, eager=None, progress_total: Callable[[int], None] = lambda _: None,
              progress: Callable[[], None] = lambda: None) -> list[ConfigResult]:
    """Every configuration on the runtime; with `eager`, the APD ones on the PyTorch loop too."""
    chosen = check_benchmark(runtime, specs, grid, prompts, max_new_tokens, repeat)
    with_eager = [c for c in chosen if c.alg == "apd"] if eager is not None else []
    breakdown_pass = runtime.xp.__name__ != "numpy"  # see run_config
    progress_total(len(prompts) * ((repeat + breakdown_pass) * len(chosen) + repeat * len(with_eager)))
    extract = TASKS[task].extract_answer if task else None
    results = []
    for config in chosen:
        result = run_config(runtime, config, prompts, max_new_tokens, repeat, extract, progress)
        if config in with_eager:
            run_eager(eager, runtime, result, prompts, max_new_tokens, repeat, progress)
        results.append(result)
    return results


def step_profile(runtime, prompt: Prompt, positions: tuple[int, ...], params: dict[str, Any],
                 span: int = 32) -> dict[int, float]:
    """Median wall time (ms) of APD steps that start within `span` generated tokens of each position.

    One generation per position, long enough that every timed step still has its full lookahead
    window. Each is brought to its position untimed; then they take steps in turn, so a change in
    the machine's load during the profile hits every position alike. Where one step commits more
    than the whole span (models that agree on long runs), that step is the position's sample."""
    import time

    lookahead = params.get("max_lookahead", runtime.defaults.max_lookahead)
    longest = max(positions) + span
    if len(prompt.ids) + longest + lookahead > runtime.max_positions:
        raise GenerationError(f"a step profile up to {longest} tokens needs {len(prompt.ids) + longest + lookahead} "
                              f"positions; the models have {runtime.max_positions}")
    streams = {p: iter(runtime.stream(prompt.ids, alg="apd", max_new_tokens=p + span + lookahead, ignore_eos=True,
                                      **params)) for p in positions}
    generated = dict.fromkeys(positions, 0)
    times: dict[int, list[float]] = {p: [] for p in positions}

    def step(p: int) -> float:
        started = time.perf_counter()
        generated[p] += len(next(streams[p]).token_ids)
        return 1000 * (time.perf_counter() - started)

    for p in positions:
        while generated[p] < p - span:
            last = step(p)
        if generated[p] > p + span:  # one step leapt over the whole span: it is the sample
            times[p].append(last)
    while active := [p for p in positions if generated[p] <= p + span]:
        for p in active:
            times[p].append(step(p))
    return {p: statistics.median(times[p]) for p in positions}
