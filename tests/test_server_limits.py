"""`apd-deploy serve` against hostile or careless clients, and at its limits: a real server on a
free loopback port, driven by httpx and raw sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from test_server import CLI, KEY, server


@contextmanager
def logged_server(bundle, *args: str, env: dict[str, str] | None = None):
    """`server(...)` whose stderr is read as it comes (a full pipe would stall the server):
    yields (url, process, log lines); after the stop, no line of the log may be a traceback."""
    with server(bundle, *args, env=env) as (url, proc):
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        yield url, proc, log
    reader.join(timeout=30)
    assert not [line for line in log if "Traceback" in line or "Exception in ASGI" in line], "".join(log)


@pytest.fixture(scope="module")
def open_server(tiny_bundle):
    """No key, 8 slots and a queue of one, bodies up to 8 MB."""
    with logged_server(tiny_bundle, "--max-batch", "8", "--max-queue", "1", "--max-body-bytes", "8000000") as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def limited_server(tiny_bundle):
    """Short header timeout, small headers, a key that /metrics needs too, a named host and origin."""
    with logged_server(tiny_bundle, "--header-timeout", "1", "--max-header-bytes", "8192", "--allowed-hosts",
                       "api.example", "--allowed-origins", "http://ok.example", "--metrics-key-required",
                       env={"APD_API_KEY": KEY}) as (url, _, _):
        yield url


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _raw(url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=data, headers={"Content-Type": "application/json"},
                      timeout=60)


# Bodies that must be 400s, not 500s.
def test_hostile_json_bodies_get_openai_400s(open_server):
    digits = _raw(open_server, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}")
    assert "digits" in _error(digits, 400)["message"]
    surrogate = _raw(open_server, b'{"messages": [{"role": "user", "content": "\\ud800 x"}], "max_tokens": 4}')
    assert _error(surrogate, 400)["param"] == "messages[0].content"
    deep = _raw(open_server, b"[" * 100_000 + b"]" * 100_000)
    assert "deep" in _error(deep, 400)["message"]
    # A lone surrogate in a field name reaches the error message: it is escaped, not a 500.
    named = _raw(open_server, b'{"prompt": "hi", "\\udc00": 1}')
    assert _error(named, 400)["code"] == "unsupported_parameter"
    completion = httpx.post(f"{open_server}/v1/completions", content=b'{"prompt": "a", "stop": ["\\ud800"]}',
                            headers={"Content-Type": "application/json"}, timeout=60)
    assert _error(completion, 400)["param"] == "stop"


# A client that closes mid-body.
def test_a_client_gone_mid_body_is_counted_as_499(open_server):
    host, port = urlparse(open_server).hostname, urlparse(open_server).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b" " * 300)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while 'endpoint="/v1/chat/completions",status="499"' not in (page := httpx.get(f"{open_server}/metrics").text):
        assert time.monotonic() < deadline, page
        time.sleep(0.05)
    assert 'status="500"' not in page


# A client that goes away before its whole (non-streamed) answer.
def _count(url: str, sample: str) -> float:
    page = httpx.get(f"{url}/metrics").text
    return next((float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(sample)), 0.0)


def test_a_client_gone_before_a_whole_answer_cancels_it(open_server):
    gone = 'apd_requests_total{endpoint="/v1/completions",status="499"}'
    cancelled, gone_before = _count(open_server, "apd_cancelled_requests_total"), _count(open_server, gone)
    # Diffusion over 480 masks takes seconds; the client waits half of one.
    body = {"prompt": [5, 6, 7], "max_tokens": 480, "alg": "diffusion"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{open_server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 30
    while (_count(open_server, "apd_cancelled_requests_total"), _count(open_server, gone)) != (cancelled + 1,
                                                                                                gone_before + 1):
        assert time.monotonic() < deadline, httpx.get(f"{open_server}/metrics").text
        time.sleep(0.05)
    assert _count(open_server, "apd_active_requests") == 0
    answered = httpx.post(f"{open_server}/v1/completions", json={"prompt": [5], "max_tokens": 4}, timeout=60)
    assert answered.status_code == 200
    assert _count(open_server, "apd_cancelled_requests_total") == cancelled + 1  # a finished answer is no cancel


# A route called with another method.
def test_a_wrong_method_is_a_405_with_allow(open_server):
    response = httpx.get(f"{open_server}/v1/chat/completions")
    error = _error(response, 405)
    assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    assert _error(httpx.get(f"{open_server}/v2/nothing"), 404)["code"] == "not_found"


# Admission counts the free slots, not only the queue.
def test_the_scheduler_admits_a_burst_of_free_slots_plus_queue(runtime):
    with runtime.scheduler(max_batch=8, max_queue=1) as scheduler:
        with scheduler._wake:  # the lane cannot move anything into a slot while the burst arrives
            handles = [scheduler.submit([5, 6], max_new_tokens=8) for _ in range(9)]
            with pytest.raises(Exception, match="queue is full"):
                scheduler.submit([5, 6], max_new_tokens=8)
        assert [h.result(timeout=60).finish_reason in ("stop", "length") for h in handles] == [True] * 9


def test_a_burst_of_max_batch_requests_is_answered_over_http(open_server):
    statuses: list[int] = []
    body = {"prompt": [5, 6, 7], "max_tokens": 8}
    go = threading.Barrier(8)

    def ask() -> None:
        with httpx.Client(timeout=60) as c:
            c.get(f"{open_server}/health")  # connected before the burst
            go.wait()
            statuses.append(c.post(f"{open_server}/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 8


# Big prompts are prepared off the event loop, and refused before tokenizing.
def test_health_stays_responsive_while_big_prompts_are_prepared(open_server):
    big = {"messages": [{"role": "user", "content": "hello world " * 85_000}], "max_tokens": 4}
    many = {"messages": [{"role": "user", "content": "a"}] * 100_000, "max_tokens": 4}
    results: list[httpx.Response] = []
    senders = [threading.Thread(target=lambda b=b: results.append(
        httpx.post(f"{open_server}/v1/chat/completions", json=b, timeout=120))) for b in (big, big, big, big, many)]
    for t in senders:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in senders):
        started = time.perf_counter()
        assert httpx.get(f"{open_server}/health", timeout=30).status_code == 200
        worst = max(worst, time.perf_counter() - started)
        time.sleep(0.02)
    for t in senders:
        t.join()
    assert sorted(_error(r, 400)["param"] for r in results) == ["messages"] * 5
    assert worst < 0.5, f"/health took {worst:.2f} s while big prompts were prepared"


# A browser's requests.
def test_browser_requests_are_refused(open_server):
    url = f"{open_server}/v1/chat/completions"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    plain = httpx.post(url, content=body, headers={"Content-Type": "text/plain"})
    assert _error(plain, 415)["code"] == "unsupported_media_type"
    assert httpx.post(url, content=body, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    rebound = httpx.post(url, content=body, headers={"Content-Type": "application/json", "Host": "evil.example"})
    assert _error(rebound, 400)["code"] == "host_not_allowed"
    assert httpx.get(f"{open_server}/health", headers={"Host": "localhost:1"}).status_code == 200
    cross = httpx.post(url, content=body, headers={"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert _error(cross, 403)["code"] == "origin_not_allowed"


def test_allowed_hosts_and_origins(limited_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{limited_server}/v1/models", headers={**auth, "Host": "api.example"}).status_code == 200
    allowed = httpx.get(f"{limited_server}/v1/models", headers={**auth, "Origin": "http://ok.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ok.example"
    assert httpx.get(f"{limited_server}/v1/models", headers={**auth, "Origin": "http://evil.example"}).status_code == 403


# The metrics page behind the key.
def test_metrics_need_the_key_when_asked(limited_server):
    assert _error(httpx.get(f"{limited_server}/metrics"), 401)["code"] == "invalid_api_key"
    page = httpx.get(f"{limited_server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert page.status_code == 200 and "apd_requests_total" in page.text
    assert httpx.get(f"{limited_server}/health").status_code == 200


# The request head is bounded in time and size.
def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while piece := sock.recv(65536):
            received += piece
    except socket.timeout:
        pytest.fail(f"the connection was still open after {seconds} s (got {received[:80]!r})")
    except ConnectionResetError:
        pass
    return received


def test_slow_and_silent_request_heads_are_closed(limited_server):
    address = (urlparse(limited_server).hostname, urlparse(limited_server).port)
    with socket.create_connection(address) as silent, socket.create_connection(address) as half:
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        _closed_within(silent, 8)
        _closed_within(half, 8)
        assert time.monotonic() - started < 8
    with socket.create_connection(address) as slow:  # slowloris: a header byte now and then
        started = time.monotonic()
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            for _ in range(20):
                slow.sendall(b"X")
                time.sleep(0.25)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _closed_within(slow, 8)
        assert time.monotonic() - started < 6
    # A connection that keeps its requests coming is not cut.
    with httpx.Client() as c:
        for _ in range(3):
            assert c.get(f"{limited_server}/health").status_code == 200
            time.sleep(0.6)


def test_a_huge_header_is_refused(limited_server):
    address = (urlparse(limited_server).hostname, urlparse(limited_server).port)
    with socket.create_connection(address) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _closed_within(sock, 8)
    assert re.match(rb"HTTP/1.1 (400|431)", answer), answer[:200]


# Past the grace period.
def test_requests_past_the_grace_period_get_503_or_an_error_event(tiny_bundle):
    with logged_server(tiny_bundle, "--grace-seconds", "2", "--max-batch", "8") as (url, proc, log):
        body = {"prompt": [5, 6, 7], "max_tokens": 480, "alg": "diffusion", "ignore_eos": True}
        whole: list[httpx.Response] = []
        streams: list[list[str]] = []

        def ask() -> None:
            whole.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120))

        def stream() -> None:
            lines: list[str] = []
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                assert r.status_code == 200
                lines.extend(filter(None, r.iter_lines()))
            streams.append(lines)

        threads = [threading.Thread(target=f) for f in [ask] * 8 + [stream] * 8]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while "apd_queue_depth 8.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    assert len(whole) == 8 and len(streams) == 8
    for response in whole:
        assert response.headers["retry-after"] and _error(response, 503)["code"] == "shutting_down"
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down", lines[-3:]


# The extensions benchmark clients send.
def test_benchmark_clients_extensions(open_server):
    url = f"{open_server}/v1/completions"
    ran = httpx.post(url, json={"prompt": [5, 6], "max_tokens": 40, "ignore_eos": True, "min_tokens": 2,
                                "response_format": {"type": "text"}}, timeout=60)
    assert ran.status_code == 200, ran.text
    assert ran.json()["usage"]["completion_tokens"] == 40 and ran.json()["choices"][0]["finish_reason"] == "length"
    with httpx.stream("POST", url, json={"prompt": [5, 6], "max_tokens": 12, "stream": True, "ignore_eos": True,
                                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                      timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert all("usage" in e for e in events) and events[-1]["usage"]["completion_tokens"] == 12
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[0] < 12
    assert _error(httpx.post(url, json={"prompt": "a", "response_format": {"type": "json_object"}}), 400)["param"] \
        == "response_format"
    assert _error(httpx.post(url, json={"prompt": "a", "max_tokens": 4, "min_tokens": 5}), 400)["param"] == "min_tokens"
    assert _error(httpx.post(url, json={"prompt": "a", "ignore_eos": "yes"}), 400)["param"] == "ignore_eos"


def test_ignore_eos_and_min_tokens_in_the_runtime(runtime):
    every_token_ends = replace(runtime, eos_ids=frozenset(range(runtime.vocab_size)))
    assert len(every_token_ends.generate([5, 6], alg="leftright", max_new_tokens=10).token_ids) == 1
    assert len(every_token_ends.generate([5, 6], alg="leftright", max_new_tokens=10, min_tokens=4).token_ids) == 5
    kept = every_token_ends.generate([5, 6], alg="leftright", max_new_tokens=10, ignore_eos=True)
    assert len(kept.token_ids) == 10 and kept.finish_reason == "length"
    with every_token_ends.scheduler(max_batch=2) as scheduler:
        batched = scheduler.submit([5, 6], alg="leftright", max_new_tokens=10, ignore_eos=True).result(timeout=60)
    assert batched.token_ids == kept.token_ids
    with pytest.raises(Exception, match="min_tokens"):
        runtime.generate([5, 6], max_new_tokens=3, min_tokens=4)


@pytest.fixture(scope="session")
def guidellm() -> str:
    """guidellm 0.8.1 pins click and pulls in torch, datasets and sanic, so it lives in a venv of its own,
    named by $GUIDELLM or found on PATH. Session-scoped so that it skips before the demo bundle is built."""
    found = os.environ.get("GUIDELLM") or shutil.which("guidellm")
    if not found or not Path(found).is_file():
        pytest.skip("guidellm not found: python3 -m venv /work/guidellm-venv && /work/guidellm-venv/bin/pip install "
                    "guidellm==0.8.1, then GUIDELLM=/work/guidellm-venv/bin/guidellm (or put it on PATH)")
    return found


@pytest.mark.slow
def test_guidellm_finds_no_errored_request(guidellm, demo_bundle, tmp_path):
    with logged_server(demo_bundle, "--engine", "onnxruntime-cpu-fp32", "--max-batch", "8") as (url, _, _):
        out = tmp_path / "guidellm.json"
        run = subprocess.run([guidellm, "run", "--backend",
                              f"kind=openai_http,target={url},request_format=/v1/chat/completions",
                              "--profile", "kind=concurrent,streams=4",
                              "--data", "kind=synthetic_text,prompt_tokens=30,output_tokens=32",
                              "--tokenizer", f"kind=huggingface_auto,model={demo_bundle / 'tokenizer'}",
                              "--constraint", "kind=max_requests,count=32", "--output", f"kind=json,path={out}",
                              "--disable-progress"],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [benchmark] = json.loads(out.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": 32, "errored": 0, "incomplete": 0, "total": 32}, totals
    # Every request streamed the 32 tokens asked for (ignore_eos), counted by the server's usage.
    assert benchmark["metrics"]["output_token_count"]["successful"]["total_sum"] == 32 * 32


# The announced address, and a port in use.
def test_port_zero_announces_the_bound_port(tiny_bundle):
    proc = subprocess.Popen([CLI, "serve", str(tiny_bundle), "--threads", "1", "--port", "0"], stderr=subprocess.PIPE,
                            text=True)
    try:
        while "serving" not in (line := proc.stderr.readline()):
            assert line, "the server ended before it announced its address"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        assert port != 0, line
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_port_in_use_is_one_error_line(tiny_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            run = subprocess.run([CLI, "serve", str(tiny_bundle), "--threads", "1", "--host", host, "--port", str(port)],
                                 capture_output=True, text=True, timeout=60)
            errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
            assert run.returncode == 1 and len(errors) == 1 and str(port) in errors[0], run.stderr
            assert "Errno" not in run.stderr and not re.search(r"^serving ", run.stderr, re.M)
            assert ("warning:" in run.stderr) == (host == "0.0.0.0"), run.stderr
