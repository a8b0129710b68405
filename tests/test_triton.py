"""The bundle on a real tritonserver (`triton-repo`, `triton-serve`), driven by Triton's clients:
tritonclient.grpc streams (run in the Triton environment, `triton_client.py`) and HTTP
generate_stream (SSE, httpx). One server per module, two models: `apd` (16 slots) and
`apd_one_slot` (one slot, one queue place) for cancellation and a full queue.

Skipped, with the reason, where the Triton environment (.venv-triton, or $APD_TRITON_ENV, with the
[triton] extra: bash scripts/install.sh makes it) is missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from apd_deploy.bench.serving import free_port, wait_ready
from apd_deploy.errors import ApdDeployError
from apd_deploy.tasks.arithmetic import problems
from apd_deploy.triton.environment import PythonEnv
from apd_deploy.triton.repository import write_repository

ROOT = Path(__file__).resolve().parents[1]
TRITON_ENV = Path(os.environ.get("APD_TRITON_ENV", ROOT / ".venv-triton"))
CLIENT = Path(__file__).with_name("triton_client.py")
ENGINE = "onnxruntime-cpu-fp32"
QUESTIONS = [p.question for p, _ in zip(problems("test"), range(16))]
SHM_REGIONS = "triton_python_backend_shm_region_"
# Long requests (2-3 s each on the demo pair): a slot held while the test acts.
LONG = {"alg": "diffusion", "ignore_eos": True, "max_tokens": 120}


def apd_deploy(*args: str, **kwargs) -> list[str]:
    return [str(Path(sys.executable).with_name("apd-deploy")), *args]


@pytest.fixture(scope="module")
def triton_env() -> PythonEnv:
    if not (TRITON_ENV / "bin" / "python").exists():
        pytest.skip(f"no Triton environment at {TRITON_ENV}: bash scripts/install.sh makes .venv-triton")
    env = PythonEnv.inspect(TRITON_ENV)
    if env.pytriton is None:
        pytest.skip(f"{TRITON_ENV} lacks nvidia-pytriton: pip install 'apd-deploy[triton]' there")
    return env


class Triton:
    def __init__(self, repo: Path, proc: subprocess.Popen, log: Path, ports: dict[str, int], shm_before: set[str]):
        self.repo, self.proc, self.log, self.ports, self.shm_before = repo, proc, log, ports, shm_before
        self.http = f"http://127.0.0.1:{ports['http']}"
        self.grpc = f"127.0.0.1:{ports['grpc']}"

    def grpc_client(self, scenario: str, spec) -> dict | list:
        run = subprocess.run([str(TRITON_ENV / "bin" / "python"), str(CLIENT), self.grpc, scenario, json.dumps(spec)],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def generate_stream(self, model: str, body: dict) -> tuple[int, list[dict]]:
        """POST generate_stream: the status and each server-sent event's JSON."""
        with httpx.stream("POST", f"{self.http}/v2/models/{model}/generate_stream", json=body, timeout=60) as response:
            events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
        return response.status_code, events


def shm_regions() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_REGIONS)}


def processes_of(repo: Path) -> list[str]:
    """Command lines of the processes that name the repository (tritonserver, its stubs)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(repo) in cmdline and "pytest" not in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def triton(triton_env, demo_bundle, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    run = subprocess.run(apd_deploy("triton-repo", str(demo_bundle), str(repo), "--engine", ENGINE, "--model-name",
                                    "apd", "--max-batch", "16", "--threads", "1", "--python-env", str(TRITON_ENV)),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    write_repository(demo_bundle, repo, "apd_one_slot", ENGINE, max_batch=1, max_queue=1, threads=1,
                     python_env=TRITON_ENV)
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    log = repo.parent / "triton.log"
    shm_before = shm_regions()
    with log.open("w") as out:
        proc = subprocess.Popen(apd_deploy("triton-serve", str(repo), "--http-port", str(ports["http"]), "--grpc-port",
                                           str(ports["grpc"]), "--metrics-port", str(ports["metrics"])),
                                stdout=out, stderr=subprocess.STDOUT)
    server = Triton(repo, proc, log, ports, shm_before)
    assert wait_ready(f"{server.http}/v2/health/ready", proc, 120), log.read_text()
    yield server
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def answers(demo_runtime):
    return [demo_runtime.generate(q, chat=True, max_new_tokens=64) for q in QUESTIONS]


def test_grpc_stream_equals_generate(triton, answers):
    (got,) = triton.grpc_client("streams", [{"model": "apd", "inputs": {"text_input": QUESTIONS[0], "chat": True,
                                                                          "max_tokens": 64}}])
    assert got["token_ids"] == answers[0].token_ids
    assert got["text"] == answers[0].text
    assert got["finish_reason"] == "stop"
    assert got["steps"] == [answers[0].steps] and sum(got["accepted_per_step"]) == len(answers[0].token_ids)


def test_http_generate_stream_equals_generate(triton, answers):
    status, events = triton.generate_stream("apd", {"text_input": QUESTIONS[1], "chat": True, "max_tokens": 64})
    assert status == 200
    *chunks, last = events
    ids = [i for event in chunks for i in (event["token_ids"] if isinstance(event["token_ids"], list)
                                            else [event["token_ids"]])]
    assert ids == answers[1].token_ids
    assert "".join(event["text_output"] for event in events) == answers[1].text
    assert last["finish_reason"] == "stop" and last["steps"] == answers[1].steps


def test_the_docs_grpc_client_example_prints_its_answer(triton):
    page = (ROOT / "docs" / "serving.md").read_text()
    (example,) = [block for block in re.findall(r"^```text\n(.*?)^```$", page, re.M | re.S) if "tritonclient.grpc" in block]
    run = subprocess.run([str(TRITON_ENV / "bin" / "python"), "-c", example.replace("127.0.0.1:8001", triton.grpc)],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout == "76 - 28 = 48. 48 - 40 = 8. Answer: 8. stop\n", run.stderr


def test_16_concurrent_grpc_streams_get_their_own_answers(triton, answers):
    got = triton.grpc_client("streams", [{"model": "apd", "inputs": {"text_input": q, "chat": True, "max_tokens": 64}}
                                         for q in QUESTIONS])
    assert [g["token_ids"] for g in got] == [a.token_ids for a in answers]


def test_16_streams_that_end_in_one_step_are_all_answered_and_counted(triton):
    # Their responders increment one metric at once: unserialized, that crashed tritonserver.
    def finished() -> int:
        page = httpx.get(f"http://127.0.0.1:{triton.ports['metrics']}/metrics").text
        found = re.search(r'apd_requests_finished_total\{finish_reason="length",model="apd"\} (\d+)', page)
        return int(found.group(1)) if found else 0

    before = finished()
    for _ in range(3):
        got = triton.grpc_client("streams", [{"model": "apd", "inputs": {"text_input": "12 + 7 =", "max_tokens": 2,
                                                                          "ignore_eos": True}}] * 16)
        assert [g.get("finish_reason") for g in got] == ["length"] * 16, got
    assert finished() - before == 48
    assert triton.proc.poll() is None, triton.log.read_text()


def test_a_bad_parameter_is_an_error_naming_its_field(triton, answers):
    (got,) = triton.grpc_client("streams", [{"model": "apd", "inputs": {"text_input": QUESTIONS[0], "kv_window": 0}}])
    assert got["error"] == "kv_window must be at least 1, got 0"
    status, events = triton.generate_stream("apd", {"text_input": QUESTIONS[0], "max_tokens": 0})
    assert status == 400 and events == [{"error": "max_tokens must be at least 1, got 0"}]
    status, events = triton.generate_stream("apd", {"text_input": QUESTIONS[0], "alg": "fastest"})
    assert "alg must be one of apd, leftright, diffusion, ar, got 'fastest'" in events[0]["error"]
    # The instance lives on.
    (got,) = triton.grpc_client("streams", [{"model": "apd", "inputs": {"text_input": QUESTIONS[0], "chat": True,
                                                                          "max_tokens": 64}}])
    assert got["token_ids"] == answers[0].token_ids


def test_stop_strings_end_the_text(triton):
    status, events = triton.generate_stream("apd", {"text_input": QUESTIONS[0], "chat": True, "stop": ["="]})
    text = "".join(event["text_output"] for event in events)
    assert status == 200 and "=" not in text and text and events[-1]["finish_reason"] == "stop"


def test_a_cancelled_stream_frees_its_slot_and_a_full_queue_says_retry(triton, answers):
    got = triton.grpc_client("cancel", {"model": "apd_one_slot", "long": {"text_input": QUESTIONS[0], "chat": True, **LONG},
                                        "queued": {"text_input": QUESTIONS[2], "chat": True, "max_tokens": 64}})
    assert "the queue is full" in got["refused"]["error"] and "retry later" in got["refused"]["error"]
    assert got["queued"]["token_ids"] == answers[2].token_ids
    metrics = httpx.get(f"http://127.0.0.1:{triton.ports['metrics']}/metrics").text
    cancelled = re.search(r'apd_requests_finished_total\{finish_reason="cancelled",model="apd_one_slot"\} (\d+)', metrics)
    assert cancelled and cancelled.group(1) == "1", metrics


def test_sigterm_with_requests_in_flight_exits_0_and_leaves_nothing(triton):
    results, started = [], threading.Barrier(3)

    def request() -> None:
        with httpx.stream("POST", f"{triton.http}/v2/models/apd/generate_stream", timeout=60,
                          json={"text_input": QUESTIONS[3], "chat": True, **LONG, "alg": "leftright"}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started.wait()
            results.append([first, *(line for line in lines if line.startswith("data: "))])

    clients = [threading.Thread(target=request) for _ in range(2)]
    for client in clients:
        client.start()
    started.wait(timeout=60)
    triton.proc.send_signal(signal.SIGTERM)
    assert triton.proc.wait(timeout=60) == 0, triton.log.read_text()
    for client in clients:
        client.join(timeout=60)
    assert [json.loads(r[-1][len("data: "):])["finish_reason"] for r in results] == ["length", "length"]
    assert processes_of(triton.repo) == []
    for port in triton.ports.values():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # free again (for a server that restarts)
    assert shm_regions() - triton.shm_before == set()


def test_triton_repo_refuses_an_environment_with_numpy_2(demo_bundle, tmp_path):
    with pytest.raises(ApdDeployError, match=r"--python-env .*numpy 2\..*numpy < 2"):
        write_repository(demo_bundle, tmp_path / "repo", python_env=sys.prefix)
    assert not (tmp_path / "repo").exists()


def test_triton_serve_refuses_a_bundle_that_does_not_check(triton_env, demo_bundle, tmp_path):
    model = write_repository(demo_bundle, tmp_path / "repo", "apd", ENGINE, python_env=TRITON_ENV, copy_bundle=True)
    graph = model / "1" / "bundle" / "engines" / ENGINE / "verifier.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(data)
    run = subprocess.run(apd_deploy("triton-serve", str(tmp_path / "repo"), "--http-port", str(free_port()),
                                    "--grpc-port", str(free_port()), "--metrics-port", str(free_port())),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "verifier.onnx" in run.stderr, run.stderr
    assert processes_of(tmp_path / "repo") == []
