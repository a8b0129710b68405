"""`apd-deploy bench-serve URL`: load on a running server, as its clients make it.

At each concurrency level c, c clients send requests in a closed loop (each its next request as
soon as its last is answered) until `requests` are answered. Per level: total tokens/s over the
wall time, latency and time to first token (p50/p95; without --stream the first token comes with
the answer), errors by status. With a bundle to compare against, each prompt is then sent alone and
run through `Runtime.generate` in this process right after: the server's overhead at
concurrency 1 (HTTP, JSON, scheduling) is the median of the paired differences. With a second
server instead, each prompt goes to both, one after the other: what one way of serving costs over
the other (Ray Serve's proxy and routing over the single-process server).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from apd_deploy.bench.concurrency import aligned, closed_loop, percentile
from apd_deploy.errors import ApdDeployError

# What to check when every request of a level failed, by status.
FAILURE_HINTS = {"401": "check --api-key", "403": "check --api-key",
                 "404": "check the URL (the server's base, without /v1) and --model",
                 "transport": "check that the server is still running"}


@dataclass
class Sample:
    latency: float
    first_token: float | None
    tokens: int
    status: int
    answer: str = ""
    error: str = ""  # what the server or the connection said, when status is not 200


@dataclass
class ServeLevel:
    concurrency: int
    requests: int
    errors: dict[str, int]  # HTTP status (or 'transport') -> count
    seconds: float
    tokens_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    first_token_p50_ms: float
    first_token_p95_ms: float
    speedup_vs_level_1: float | None = None
    accuracy: float | None = None
    answers: list[str] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("answers")
        out["errors"] = json.dumps(self.errors, sort_keys=True)
        return out


@dataclass(frozen=True)
class Job:
    path: str  # /v1/chat/completions or /v1/completions
    body: dict[str, Any]
    answer: int | None = None


def jobs_from(questions: list[str] | None, prompts: list[str] | None, answers: list[int | None], max_tokens: int,
              model: str | None) -> list[Job]:
    """Chat requests for task questions, completions for raw prompts."""
    base = {"max_tokens": max_tokens, "temperature": 0, **({"model": model} if model else {})}
    if questions is not None:
        return [Job("/v1/chat/completions", {**base, "messages": [{"role": "user", "content": q}]}, a)
                for q, a in zip(questions, answers)]
    return [Job("/v1/completions", {**base, "prompt": p}) for p in prompts]


def one_request(client: httpx.Client, job: Job, stream: bool) -> Sample:
    started = time.perf_counter()
    body = {**job.body, **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
    try:
        if not stream:
            response = client.post(job.path, json=body)
            latency = time.perf_counter() - started
            if response.status_code != 200:
                return Sample(latency, None, 0, response.status_code, error=response.text[:200])
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            return Sample(latency, latency, data["usage"]["completion_tokens"], 200, text)
        first, tokens, pieces = None, 0, []
        with client.stream("POST", job.path, json=body) as response:
            if response.status_code != 200:
                response.read()
                return Sample(time.perf_counter() - started, None, 0, response.status_code, error=response.text[:200])
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        first = first if first is not None else time.perf_counter() - started
                        pieces.append(piece)
        return Sample(time.perf_counter() - started, first, tokens, 200, "".join(pieces))
    except httpx.TransportError as exc:
        return Sample(time.perf_counter() - started, None, 0, -1, error=str(exc))


def check_reachable(url: str) -> None:
    """Raise ApdDeployError unless a server answers at `url`, whatever its status: before a run
    that would otherwise measure only failed connections."""
    try:
        httpx.get(f"{url}/v1/models", timeout=30)
    except httpx.TransportError as exc:
        raise ApdDeployError(f"cannot reach {url} ({exc}); start the server (apd-deploy serve BUNDLE) or check "
                             "the URL") from None


def check_answered(concurrency: int, samples: list[Sample]) -> None:
    """Raise ApdDeployError if no request of a level got an answer."""
    if any(s.status == 200 for s in samples):
        return
    errors = Counter("transport" if s.status == -1 else str(s.status) for s in samples)
    first = samples[0]
    status = "transport" if first.status == -1 else str(first.status)
    raise ApdDeployError(
        f"{'the only request' if len(samples) == 1 else f'every one of the {len(samples)} requests'} at "
        f"concurrency {concurrency} failed "
        f"({', '.join(f'{k}: {v}' for k, v in errors.items())}); the first: {status} {first.error.strip()!r}; "
        f"{FAILURE_HINTS.get(status, 'see the server log')}")


def run_level(url: str, jobs: list[Job], clients: int, requests: int, stream: bool, api_key: str | None,
              progress=lambda: None) -> tuple[list[Sample], float]:
    """`requests` requests (the jobs in turn) from `clients` closed-loop clients; samples in job order."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=url, headers=headers, timeout=600, limits=limits) as client:  # thread-safe
        return closed_loop(clients, requests, lambda i: one_request(client, jobs[i % len(jobs)], stream), progress)


def summarise(level: int, samples: list[Sample], seconds: float, jobs: list[Job], extract) -> ServeLevel:
    ok = [s for s in samples if s.status == 200]
    errors = Counter("transport" if s.status == -1 else str(s.status) for s in samples if s.status != 200)
    latencies = [1000 * s.latency for s in ok]
    firsts = [1000 * s.first_token for s in ok if s.first_token is not None]
    accuracy = None
    if extract is not None and all(j.answer is not None for j in jobs):
        scored = [(s, jobs[i % len(jobs)]) for i, s in enumerate(samples)]
        accuracy = sum(s.status == 200 and extract(s.answer) == j.answer for s, j in scored) / len(samples)
    return ServeLevel(level, len(samples), dict(errors), round(seconds, 4), sum(s.tokens for s in ok) / seconds,
                      percentile(latencies, 50), percentile(latencies, 95), percentile(firsts, 50),
                      percentile(firsts, 95), accuracy=accuracy, answers=[s.answer for s in samples])


class RuntimeBaseline:
    """`Runtime.generate` in this process: the server's whole overhead (HTTP, JSON, scheduling)."""

    def __init__(self, bundle: str, engine: str | None, threads: int | None) -> None:
        from apd_deploy.runtime import Runtime

        self.runtime = Runtime.load(bundle, engine=engine, threads=threads)
        self.name = f"Runtime.generate on {bundle}" + (f" ({engine})" if engine else "")

    def __call__(self, job: Job, stream: bool) -> Sample:
        body = job.body
        prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        started = time.perf_counter()
        result = self.runtime.generate(prompt, chat="messages" in body, max_new_tokens=body["max_tokens"])
        return Sample(time.perf_counter() - started, None, len(result.token_ids), 200, result.text)


class ServerBaseline:
    """Another server (the single-process one, beside a Ray Serve one): the difference between two
    ways of serving."""

    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)
        self.name = url

    def __call__(self, job: Job, stream: bool) -> Sample:
        return one_request(self.client, job, stream)


def paired_overhead(url: str, jobs: list[Job], stream: bool, api_key: str | None, baseline) -> dict[str, Any]:
    """Each job through the server (alone) and then through `baseline` (a RuntimeBaseline or a
    ServerBaseline) right after, so that both see the machine in the same state: the server's
    overhead is the median of the paired differences."""
    served, alone, same = [], [], True
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                      timeout=600) as client:
        for job in jobs:
            sample, reference = one_request(client, job, stream), baseline(job, stream)
            served.append(sample.latency)
            alone.append(reference.latency)
            same = same and sample.status == reference.status == 200 and sample.answer == reference.answer
    differences = [s - a for s, a in zip(served, alone)]
    server_ms, baseline_ms = 1000 * statistics.median(served), 1000 * statistics.median(alone)
    overhead_ms = 1000 * statistics.median(differences)
    return {"baseline": baseline.name, "pairs": len(jobs), "server_p50_ms": server_ms, "baseline_p50_ms": baseline_ms,
            "overhead_ms": overhead_ms, "overhead_share": overhead_ms / server_ms, "same_answers": same}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float) -> bool:
    """Whether `url` answers 200 within `seconds` while `proc` (the server) is alive."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


@contextmanager
def launched_server(args: list[str], port: int | None = None, env: dict[str, str] | None = None,
                    start_seconds: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """`apd-deploy serve ARGS --port PORT` (a free port unless given) in a process of its own, once
    /ready answers: yields its base URL and the process, and stops it with SIGTERM after (benchmarks
    and tests, which meet the server as users do)."""
    port = port or free_port()
    command = [str(Path(sys.executable).with_name("apd-deploy")), "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(f"{url}/ready", proc, start_seconds):
            raise RuntimeError(f"{' '.join(command)} did not start: {proc.communicate(timeout=60)[1]}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


def format_serve(rows: list[ServeLevel]) -> str:
    header = ("concurrency", "requests", "errors", "tokens/s", "vs 1", "latency p50/p95 ms", "first token p50/p95 ms", "acc")
    cells = [(str(r.concurrency), str(r.requests), ",".join(f"{k}:{v}" for k, v in r.errors.items()) or "0",
              f"{r.tokens_per_second:.1f}", "-" if r.speedup_vs_level_1 is None else f"{r.speedup_vs_level_1:.2f}x",
              f"{r.latency_p50_ms:.0f}/{r.latency_p95_ms:.0f}",
              f"{r.first_token_p50_ms:.0f}/{r.first_token_p95_ms:.0f}",
              "-" if r.accuracy is None else f"{r.accuracy:.1%}") for r in rows]
    return aligned([header, *cells])
