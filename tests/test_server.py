"""`apd-deploy serve` as users meet it: a real server on a free port, driven by the `openai` client
(and by plain HTTP where the point is the status line or the raw stream)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from apd_deploy.bench.serving import launched_server
from apd_deploy.tasks.arithmetic import extract_answer, problems

CLI = str(Path(sys.executable).with_name("apd-deploy"))
KEY = "test-key-0123456789"


@contextmanager
def server(bundle, *args: str, env: dict[str, str] | None = None, start_seconds: float = 60, port: int | None = None):
    """`apd-deploy serve` on a free port (or `port`); yields (base URL, process); stopped with SIGTERM after."""
    with launched_server([str(bundle), "--threads", "1", *args], port, env, start_seconds) as served:
        yield served


@pytest.fixture(scope="module")
def demo_server(demo_bundle):
    with server(demo_bundle, "--engine", "onnxruntime-cpu-fp32", "--max-batch", "8", "--served-model-name", "arith") as (url, _):
        yield url


@pytest.fixture(scope="module")
def guarded_server(tiny_bundle):
    """The tiny random pair: one slot, a queue of one, a key, a small body limit."""
    with server(tiny_bundle, "--max-batch", "1", "--max-queue", "1", "--max-body-bytes", "4096",
                "--max-tokens", "480", env={"APD_API_KEY": KEY}) as (url, _):
        yield url


QUESTIONS = list(itertools.islice(problems("test"), 8))


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_completions_and_chat_answer_arithmetic(demo_server, demo_runtime):
    c = client(demo_server)
    assert [m.id for m in c.models.list().data] == ["arith"]
    problem = QUESTIONS[0]
    chat = c.chat.completions.create(model="arith", messages=[{"role": "user", "content": problem.question}],
                                     max_tokens=32, temperature=0)
    assert extract_answer(chat.choices[0].message.content) == problem.answer
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens > 0
    alone = demo_runtime.generate(problem.question, chat=True, max_new_tokens=32)
    assert chat.choices[0].message.content == alone.text
    assert chat.model_extra["apd"]["steps"] == alone.steps and chat.model_extra["apd"]["kv_window"] == 16
    # The same conversation as a raw prompt, through /v1/completions, with APD's own fields.
    ids = demo_runtime.prompt_ids(problem.question, chat=True).tolist()
    completion = c.completions.create(model="arith", prompt=ids, max_tokens=32,
                                      extra_body={"kv_window": 4, "apd_mixture_weight": 0.5})
    assert completion.choices[0].text == demo_runtime.generate(ids, max_new_tokens=32, kv_window=4,
                                                               apd_mixture_weight=0.5).text
    assert completion.model_extra["apd"]["kv_window"] == 4


def test_streams_add_up_to_the_whole_answer(demo_server, demo_runtime):
    c = client(demo_server)
    problem = QUESTIONS[1]
    pieces, finish = [], None
    for chunk in c.chat.completions.create(model="arith", messages=[{"role": "user", "content": problem.question}],
                                           max_tokens=32, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    text = "".join(pieces)
    assert text == demo_runtime.generate(problem.question, chat=True, max_new_tokens=32).text
    assert finish == "stop" and usage.completion_tokens > 0 and extract_answer(text) == problem.answer
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="arith", prompt="12 + 7 =", max_tokens=16,
                                                                         stream=True))
    assert streamed == c.completions.create(model="arith", prompt="12 + 7 =", max_tokens=16).choices[0].text
    # A stop string ends the answer before it, streamed or not.
    whole = c.chat.completions.create(model="arith", messages=[{"role": "user", "content": problem.question}],
                                      max_tokens=32, stop=[" = "])
    assert whole.choices[0].message.content == text[: text.index(" = ")] and whole.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_the_answers_of_sequential_ones(demo_server):
    c = client(demo_server)

    def ask(problem) -> str:
        return c.chat.completions.create(model="arith", messages=[{"role": "user", "content": problem.question}],
                                         max_tokens=32).choices[0].message.content

    sequential = [ask(p) for p in QUESTIONS]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(QUESTIONS[i]))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(8)] == sequential
    metrics = httpx.get(f"{demo_server}/metrics").text
    assert 'apd_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "apd_batch_size_bucket" in metrics and "apd_time_to_first_token_seconds_count" in metrics


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 481}, 400, "max_tokens"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "hi", "frobnicate": True}, 400, "frobnicate"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"prompt": "hi", "kv_window": 0}, 400, "kv_window"),
    ({"prompt": "hi", "alg": "magic"}, 400, "alg"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x" * 5000}, 413, None),
])
def test_bad_requests_get_openai_errors(guarded_server, body, status, param):
    response = httpx.post(f"{guarded_server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_an_error_names_the_body_field(guarded_server):
    """The runtime's check names max_new_tokens; over HTTP it is max_tokens (no command-line flag)."""
    response = httpx.post(f"{guarded_server}/v1/completions", json={"prompt": [5] * 40, "max_tokens": 480},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert response.json()["error"]["message"] == ("prompt of 40 tokens + max_tokens 480 exceeds the models' 512 "
                                                   "positions; use max_tokens 472 or less")


def test_keys_routes_and_plain_errors(guarded_server, demo_server):
    assert httpx.post(f"{guarded_server}/v1/completions", json={"prompt": "hi"}).status_code == 401
    wrong = httpx.get(f"{guarded_server}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(guarded_server, "nope").models.list()
    assert len(client(guarded_server, KEY).models.list().data) == 1
    assert httpx.get(f"{demo_server}/v1/models").status_code == 200  # no key set: none asked for
    assert httpx.get(f"{demo_server}/v2/anything").status_code == 404
    assert httpx.post(f"{demo_server}/v1/completions", content=b"{not json",
                      headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.post(f"{demo_server}/v1/completions", content=b"{not json").status_code == 415
    assert httpx.get(f"{demo_server}/ready").json()["status"] == "ready"
    assert httpx.get(f"{guarded_server}/health").status_code == 200  # probes need no key


def _wait_for(url: str, line: str) -> None:
    deadline = time.monotonic() + 30
    while line not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"never saw {line!r} in /metrics"
        time.sleep(0.02)


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(guarded_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    # Diffusion over 480 masks takes seconds: it holds the one slot while the rest happens.
    long = {"prompt": [5, 6, 7], "max_tokens": 480, "alg": "diffusion", "stream": True}
    short = {"prompt": [5], "max_tokens": 4}
    statuses = []
    with httpx.stream("POST", f"{guarded_server}/v1/completions", json=long, headers=auth, timeout=60) as response:
        assert response.status_code == 200
        _wait_for(guarded_server, "apd_active_requests 1.0")
        queued = threading.Thread(target=lambda: statuses.append(
            httpx.post(f"{guarded_server}/v1/completions", json=short, headers=auth, timeout=60).status_code))
        queued.start()
        _wait_for(guarded_server, "apd_queue_depth 1.0")
        full = httpx.post(f"{guarded_server}/v1/completions", json=short, headers=auth)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
    # The client went away mid-stream: its request is cancelled and the queued one takes the slot.
    queued.join(timeout=30)
    assert statuses == [200]
    _wait_for(guarded_server, "apd_cancelled_requests_total 1.0")
    _wait_for(guarded_server, "apd_active_requests 0.0")


def test_sigterm_lets_requests_in_flight_finish(tiny_bundle):
    with server(tiny_bundle, "--grace-seconds", "60") as (url, proc):
        body = {"prompt": [5, 6], "max_tokens": 200, "alg": "leftright", "stream": True}
        received = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in filter(None, response.iter_lines()):
                received.append(line)
                if len(received) == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
        assert received[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)


def test_bench_serve_measures_levels_and_the_overhead(demo_server, demo_bundle, tmp_path):
    out = tmp_path / "serve"
    result = subprocess.run([CLI, "bench-serve", demo_server, "--concurrency", "1,2", "--requests", "4", "--stream",
                             "--compare-bundle", str(demo_bundle), "--engine", "onnxruntime-cpu-fp32", "--threads", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["requests"] == 4 and row["errors"] == "{}" and row["tokens_per_second"] > 0
        assert 0 < row["first_token_p50_ms"] <= row["latency_p95_ms"] and row["accuracy"] >= 0.75
    baseline = data["settings"]["baseline"]
    assert baseline["same_answers"] is True and baseline["baseline_p50_ms"] > 0 and baseline["pairs"] == 4
    assert (out / "serve_vs_concurrency.png").is_file() and "overhead" in result.stdout


def test_bench_serve_counts_errors(guarded_server, tmp_path):
    """Without the key every request is refused: counted by status, one error line, not a crash."""
    result = subprocess.run([CLI, "bench-serve", guarded_server, "--concurrency", "1", "--requests", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "APD_API_KEY"})
    assert result.returncode == 1 and "(401: 2)" in result.stderr and "Traceback" not in result.stderr, result.stderr
