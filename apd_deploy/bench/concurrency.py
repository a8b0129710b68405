"""Throughput against concurrency: `apd-deploy bench --concurrency 1,2,4,8,16`.

At each level c, c clients send the prompts through one batched scheduler (max_batch = c), each
client its next prompt as soon as its last one is answered (a closed loop, as c users of a
service would). A row `alone` first decodes the prompts one after another with
`Runtime.generate`, the path a single request takes without a scheduler: level 1 against it is
what the scheduler costs a lone request. Reported per level: total tokens/s over the wall time,
each request's own tokens/s, latency and time to the first chunk (p50/p95, from submission), the
mean batch the scheduler ran, accuracy where the task checks answers, and whether every request
got the tokens it got alone.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import check_integer

if TYPE_CHECKING:
    from apd_deploy.bench.runner import Prompt
    from apd_deploy.runtime import GenerationResult, Runtime

MAX_CONCURRENCY = 1024


@dataclass
class LevelResult:
    concurrency: str  # 'alone', or the number of concurrent clients
    requests: int
    tokens: int
    seconds: float  # wall time of the level (median run by throughput)
    tokens_per_second: float  # total: tokens / seconds
    tokens_per_second_min: float
    tokens_per_second_max: float
    per_request_tokens_per_second: float  # mean over requests of their own tokens / latency
    latency_p50_ms: float
    latency_p95_ms: float
    first_chunk_p50_ms: float
    first_chunk_p95_ms: float
    mean_batch: float  # requests per scheduler iteration
    accuracy: float | None
    same_tokens_as_alone: bool | None
    speedup_vs_level_1: float | None = None

    def row(self) -> dict[str, Any]:
        return asdict(self)


def parse_levels(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (distinct, ascending)."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise GenerationError(f"--concurrency '{text}': give whole numbers separated by commas, e.g. 1,2,4,8") from None
    if not levels:
        raise GenerationError("--concurrency is empty; give levels such as 1,2,4,8")
    for level in levels:
        check_integer("--concurrency", level, 1, MAX_CONCURRENCY)
    return levels


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def aligned(table: list[tuple[str, ...]]) -> str:
    """Rows of cells as text, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def run_alone(runtime: Runtime, prompts: list[Prompt], params: dict[str, Any],
              progress: Callable[[], None]) -> tuple[list[GenerationResult], float, float]:
    started = time.perf_counter()
    results = []
    for prompt in prompts:
        results.append(runtime.generate(prompt.ids, **params))
        progress()
    return results, time.perf_counter() - started, 1.0


def closed_loop(clients: int, count: int, serve: Callable[[int], Any],
                progress: Callable[[], None] = lambda: None) -> tuple[list[Any], float]:
    """Items 0..count-1 served by `clients` threads, each taking the next as soon as its last is
    done, as that many users of a service would; returns what `serve` gave for each, in order, and
    the wall seconds. An error stops its thread and is raised once every thread has stopped."""
    out: list[Any] = [None] * count
    errors: list[BaseException] = []
    next_index = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            try:
                out[index] = serve(index)
            except Exception as exc:  # reported after the level, not lost in a thread
                errors.append(exc)
                return
            progress()

    threads = [threading.Thread(target=client) for _ in range(min(clients, count))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return out, time.perf_counter() - started


def run_level(runtime: Runtime, prompts: list[Prompt], params: dict[str, Any], clients: int, lanes: int,
              progress: Callable[[], None]) -> tuple[list[GenerationResult], float, float]:
    """`clients` closed-loop clients over one scheduler; results in prompt order, wall seconds,
    mean batch size."""
    requests = [runtime.request(prompt.ids, False, dict(params)) for prompt in prompts]
    longest = max(len(ids) + p.max_new_tokens for ids, p in requests)
    with runtime.scheduler(clients, max_queue=clients, max_seq_len=longest, lanes=min(lanes, clients)) as scheduler:
        results, seconds = closed_loop(
            clients, len(requests), lambda i: scheduler.submit_prepared(*requests[i], chunk_text=False).result(), progress)
        sizes = scheduler.batch_sizes
        mean_batch = sum(size * count for size, count in sizes.items()) / max(sum(sizes.values()), 1)
    return results, seconds, mean_batch


def summarise(label: str, runs: list[tuple[list[GenerationResult], float, float]], prompts: list[Prompt],
              extract: Callable[[str], int | None] | None, alone_tokens: list[list[int]] | None) -> LevelResult:
    speeds = [sum(len(r.token_ids) for r in results) / seconds for results, seconds, _ in runs]
    results, seconds, mean_batch = runs[speeds.index(statistics.median_high(speeds))]
    tokens = sum(len(r.token_ids) for r in results)
    latencies = [1000 * r.seconds for r in results]
    first = [1000 * r.first_chunk_seconds for r in results if r.first_chunk_seconds is not None]
    accuracy = None
    if extract is not None and all(p.answer is not None for p in prompts):
        accuracy = sum(extract(r.text or "") == p.answer for r, p in zip(results, prompts)) / len(prompts)
    same = None if alone_tokens is None else [r.token_ids for r in results] == alone_tokens
    return LevelResult(label, len(results), tokens, round(seconds, 4), tokens / seconds, min(speeds), max(speeds),
                       statistics.mean(r.tokens_per_second for r in results),
                       percentile(latencies, 50), percentile(latencies, 95), percentile(first, 50), percentile(first, 95),
                       mean_batch, accuracy, same)


def benchmark_concurrency(runtime: Runtime, levels: list[int], prompts: list[Prompt], params: dict[str, Any],
                          repeat: int, extract: Callable[[str], int | None] | None, lanes: int = 1,
                          progress_total: Callable[[int], None] = lambda _: None,
                          progress: Callable[[], None] = lambda: None) -> list[LevelResult]:
    """The `alone` row, then one row per level; each run `repeat` times (the median run is reported)."""
    check_integer("--repeat", repeat, 1)
    progress_total(len(prompts) * repeat * (len(levels) + 1))
    alone_runs = [run_alone(runtime, prompts, params, progress) for _ in range(repeat)]
    alone = summarise("alone", alone_runs, prompts, extract, None)
    alone_tokens = [r.token_ids for r in alone_runs[0][0]]
    alone.same_tokens_as_alone = all([r.token_ids for r in results] == alone_tokens for results, _, _ in alone_runs)
    rows = [alone]
    for level in levels:
        runs = [run_level(runtime, prompts, params, level, lanes, progress) for _ in range(repeat)]
        rows.append(summarise(str(level), runs, prompts, extract, alone_tokens))
    base = next((r for r in rows if r.concurrency == "1"), None)
    for row in rows:
        row.speedup_vs_level_1 = row.tokens_per_second / base.tokens_per_second if base else None
    return rows


def format_levels(rows: list[LevelResult]) -> str:
    header = ("concurrency", "tokens/s", "range", "vs 1", "per request tok/s", "latency p50/p95 ms",
              "first chunk p50/p95 ms", "batch", "acc", "same tokens")
    cells = [(r.concurrency, f"{r.tokens_per_second:.1f}",
              f"{r.tokens_per_second_min:.1f}-{r.tokens_per_second_max:.1f}",
              "-" if r.speedup_vs_level_1 is None else f"{r.speedup_vs_level_1:.2f}x",
              f"{r.per_request_tokens_per_second:.1f}", f"{r.latency_p50_ms:.0f}/{r.latency_p95_ms:.0f}",
              f"{r.first_chunk_p50_ms:.0f}/{r.first_chunk_p95_ms:.0f}", f"{r.mean_batch:.1f}",
              "-" if r.accuracy is None else f"{r.accuracy:.1%}",
              "-" if r.same_tokens_as_alone is None else ("yes" if r.same_tokens_as_alone else "NO")) for r in rows]
    return aligned([header, *cells])
