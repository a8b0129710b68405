"""The Triton path against `apd-deploy serve` on one bundle: streamed requests from closed-loop
clients at each concurrency, the same questions to both (chat, T=0), answers compared; then the
questions one at a time, each to Triton, to serve and to `Runtime.generate` in this process, for the
overhead per request (median of the paired differences). bench-serve speaks OpenAI's API; this
speaks Triton's generate_stream (SSE over HTTP, as curl does).

    .venv/bin/python scripts/bench_triton.py out/arithmetic-bundle --engine onnxruntime-cpu-fp32 \\
        --python-env .venv-triton --levels 1,4,16 --requests 64
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import httpx

from apd_deploy.bench.concurrency import closed_loop, percentile
from apd_deploy.bench.serving import free_port, launched_server
from apd_deploy.runtime import Runtime
from apd_deploy.tasks.arithmetic import problems


def triton_request(client: httpx.Client, question: str, max_tokens: int) -> tuple[float, float, str]:
    """Seconds to the last event and to the first text, and the text."""
    started, first, text = time.perf_counter(), None, ""
    with client.stream("POST", "/v2/models/apd/generate_stream",
                       json={"text_input": question, "chat": True, "max_tokens": max_tokens}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                text += event["text_output"]
                first = first or (time.perf_counter() - started if event["text_output"] else None)
    return time.perf_counter() - started, first or 0.0, text


def serve_request(client: httpx.Client, question: str, max_tokens: int) -> tuple[float, float, str]:
    started, first, text = time.perf_counter(), None, ""
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                text += piece
                first = first or (time.perf_counter() - started if piece else None)
    return time.perf_counter() - started, first or 0.0, text


def level(url: str, send, questions: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        samples, seconds = closed_loop(clients, requests,
                                       lambda i: send(client, questions[i % len(questions)], max_tokens))
    latencies, firsts, texts = zip(*samples)
    return {"concurrency": clients, "requests": requests, "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(percentile(list(latencies), 50) * 1e3, 1),
            "p95_ms": round(percentile(list(latencies), 95) * 1e3, 1),
            "first_text_p50_ms": round(percentile(list(firsts), 50) * 1e3, 1), "texts": list(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--engine")
    parser.add_argument("--python-env", required=True, help="The Triton environment (.venv-triton).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    questions = [p.question for p in islice(problems("test"), args.requests)]
    engine = ["--engine", args.engine] if args.engine else []
    apd = str(Path(sys.executable).with_name("apd-deploy"))
    results: dict = {"settings": vars(args), "levels": []}
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        subprocess.run([apd, "triton-repo", args.bundle, str(repo), *engine, "--model-name", "apd", "--max-batch",
                        str(args.max_batch), "--threads", str(args.threads), "--python-env", args.python_env], check=True)
        ports = [free_port() for _ in range(3)]
        triton = subprocess.Popen([apd, "triton-serve", str(repo), "--http-port", str(ports[0]), "--grpc-port",
                                   str(ports[1]), "--metrics-port", str(ports[2])], stderr=subprocess.DEVNULL)
        triton_url = f"http://127.0.0.1:{ports[0]}"
        try:
            while not _ready(triton_url):
                if triton.poll() is not None:
                    raise SystemExit("triton-serve did not start")
                time.sleep(0.2)
            with launched_server([args.bundle, *engine, "--threads", str(args.threads), "--max-batch",
                                  str(args.max_batch), "--max-queue", "256"]) as (serve_url, _):
                for clients in map(int, args.levels.split(",")):
                    t = level(triton_url, triton_request, questions, clients, args.requests, args.max_tokens)
                    s = level(serve_url, serve_request, questions, clients, args.requests, args.max_tokens)
                    same = t.pop("texts") == s.pop("texts")
                    results["levels"].append({"triton": t, "serve": s, "same_answers": same})
                    print(f"concurrency {clients}: triton {t['requests_per_s']} req/s, p50 {t['p50_ms']} ms, first "
                          f"text {t['first_text_p50_ms']} ms | serve {s['requests_per_s']} req/s, p50 {s['p50_ms']} "
                          f"ms, first text {s['first_text_p50_ms']} ms | same answers: {same}", flush=True)
                runtime = Runtime.load(args.bundle, engine=args.engine, threads=args.threads)
                pairs = []
                with httpx.Client(base_url=triton_url, timeout=600) as tc, httpx.Client(base_url=serve_url,
                                                                                        timeout=600) as sc:
                    for question in questions[:32]:
                        started = time.perf_counter()
                        runtime.generate(question, chat=True, max_new_tokens=args.max_tokens)
                        alone = time.perf_counter() - started
                        pairs.append((triton_request(tc, question, args.max_tokens)[0],
                                      serve_request(sc, question, args.max_tokens)[0], alone))
                t_ms, s_ms, a_ms = (statistics.median(p[i] for p in pairs) * 1e3 for i in range(3))
                results["one_at_a_time"] = {
                    "pairs": len(pairs), "triton_p50_ms": round(t_ms, 2), "serve_p50_ms": round(s_ms, 2),
                    "runtime_p50_ms": round(a_ms, 2),
                    "triton_overhead_ms": round(statistics.median(p[0] - p[2] for p in pairs) * 1e3, 2),
                    "serve_overhead_ms": round(statistics.median(p[1] - p[2] for p in pairs) * 1e3, 2)}
                print(json.dumps(results["one_at_a_time"]), flush=True)
        finally:
            triton.send_signal(signal.SIGTERM)
            triton.wait(timeout=120)
    print(json.dumps(results))


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False

if __name__ == "__main__":
    main()
