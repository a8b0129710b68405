"""`apd-deploy serve --ray` as users meet it: real Ray (a local one the command starts, and a
simulated two-node cluster), real replicas, driven by the `openai` client on free ports."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from apd_deploy.bench.serving import free_port
from apd_deploy.tasks.arithmetic import extract_answer
from test_cli_options import run
from test_server import CLI, KEY, QUESTIONS, client, server

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'apd-deploy[ray]'")


@pytest.fixture(scope="module")
def ray_tmp():
    """Ray's files (and its processes' command lines) under a folder of this module's own, so that
    what outlives a test can be found. Short: Ray's socket paths must fit in 107 bytes."""
    folder = tempfile.mkdtemp(prefix="apdray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder: str) -> list[int]:
    """Live processes started for the Ray whose files are under `folder` (Ray's servers name their
    session folder on the command line; its workers are their children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), folder in cmdline)
    roots = {pid for pid, (_, mine) in found.items() if mine}
    family, grown = set(roots), True
    while grown:
        children = {pid for pid, (ppid, _) in found.items() if ppid in family} - family
        family |= children
        grown = bool(children)
    return sorted(family)


@contextmanager
def ray_server(bundle, ray_tmp: str, *args: str, env: dict[str, str] | None = None, port: int | None = None):
    with server(bundle, "--engine", "onnxruntime-cpu-fp32", "--ray", "--served-model-name", "arith", *args,
                env={"RAY_TMPDIR": ray_tmp, **(env or {})}, start_seconds=120, port=port) as (url, proc):
        wait_until(lambda: f"apd_replicas {float(replicas_asked(args))}" in metrics(url), "every replica reports")
        yield url, proc


def replicas_asked(args: tuple[str, ...]) -> int:
    return int(args[args.index("--replicas") + 1]) if "--replicas" in args else 1


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def wait_until(check, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def per_replica(page: str, series: str) -> dict[str, float]:
    """`series` (a sample line's name and labels up to the replica's) summed by the replica label."""
    totals: Counter = Counter()
    for line in page.splitlines():
        if line.startswith(series):
            totals[re.search(r'replica="([^"]+)"', line).group(1)] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


def settled(url: str, series: str) -> dict[str, float]:
    """`per_replica` once every replica has pushed what it counted so far (each pushes every second)."""
    from apd_deploy.server.ray_replica import PUSH_SECONDS

    time.sleep(PUSH_SECONDS + 0.2)
    return per_replica(metrics(url), series)


def label_values(page: str, label: str) -> set[str]:
    return set(re.findall(rf'{label}="([^"]+)"', page))


def ask(c: openai.OpenAI, problem, **extra) -> str:
    return c.chat.completions.create(model="arith", messages=[{"role": "user", "content": problem.question}],
                                     max_tokens=32, temperature=0, **extra).choices[0].message.content


@pytest.fixture(scope="module")
def local_ray(demo_bundle, ray_tmp, cluster_starting):
    """`apd-deploy serve --ray --replicas 2`: the command starts a local Ray and stops it."""
    with ray_server(demo_bundle, ray_tmp, "--replicas", "2", "--max-batch", "8", env={"APD_API_KEY": KEY}) as served:
        yield served


def test_two_replicas_answer_stream_and_guard_like_the_server(local_ray, demo_runtime):
    url, _ = local_ray
    c = client(url, KEY)
    assert [m.id for m in c.models.list().data] == ["arith"]
    for problem in QUESTIONS[:3]:
        text = ask(c, problem)
        assert extract_answer(text) == problem.answer
        assert text == demo_runtime.generate(problem.question, chat=True, max_new_tokens=32).text
    stream = c.chat.completions.create(model="arith", messages=[{"role": "user", "content": QUESTIONS[3].question}],
                                       max_tokens=32, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == ask(c, QUESTIONS[3])
    # The key and the errors: the app's own, through Serve's proxy.
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "kv_window": 0},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_window"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=4)


def test_sixteen_clients_are_served_by_both_replicas(local_ray, demo_runtime):
    url, _ = local_ray
    c = client(url, KEY)
    series = 'apd_requests_total{endpoint="/v1/chat/completions",'
    before = settled(url, series)
    answers: dict[int, str] = {}

    def two_questions(i: int) -> None:
        for j in (i, i + 16):
            answers[j] = ask(c, QUESTIONS[j % 8])

    threads = [threading.Thread(target=two_questions, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected = [demo_runtime.generate(p.question, chat=True, max_new_tokens=32).text for p in QUESTIONS]
    assert [answers[j] for j in range(32)] == [expected[j % 8] for j in range(32)]

    def served() -> dict[str, float]:
        after = per_replica(metrics(url), series)
        return {replica: after[replica] - before.get(replica, 0) for replica in after}

    wait_until(lambda: sum(served().values()) >= 32, "the metrics count the 32 requests")
    counts = served()
    assert sum(counts.values()) == 32 and len(counts) == 2 and min(counts.values()) > 0, counts


def test_a_local_ray_listens_only_on_loopback(local_ray, ray_tmp):
    """Every socket that the command's Ray listens on (its servers, agents, workers and replicas)
    is on 127.0.0.1, as the proxy is without --host."""
    _, proc = local_ray
    pids = set(ray_processes(ray_tmp)) | {proc.pid}
    sockets = listening_sockets(pids)
    assert len(sockets) > 5, sockets  # the test sees Ray's servers
    assert all(ipaddress.ip_address(ip).is_loopback or ip.startswith("::ffff:127.") for ip, _, _ in sockets), sockets


def listening_sockets(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, command) of each TCP socket in LISTEN state held by one of `pids`."""
    owners = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:  # a worker that exited meanwhile
            continue
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owners:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            command = Path(f"/proc/{owners[fields[9]]}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            found.append((socket.inet_ntop(family, raw), int(port, 16), command))
    return found


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """A POST sent on a socket of its own, left unread: closing the socket is the client going away."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_a_client_that_goes_away_cancels_its_request(local_ray):
    """Through the proxy too: a stream and a whole answer whose clients give up are cancelled on
    their replicas, which free their slots; the whole answer counts as 499 (client closed)."""
    url, _ = local_ray
    page = metrics(url)
    cancelled_before = sum(per_replica(page, "apd_cancelled_requests_total").values())
    closed_before = counted(page, "/v1/completions", "499")
    long = {"prompt": "12 + 7 =", "max_tokens": 150, "alg": "diffusion"}  # 150 steps of a batch of two: seconds
    clients = [raw_request(url, "/v1/completions", {**long, "stream": True}), raw_request(url, "/v1/completions", long)]
    # Both go away once both decode (not before: one the proxy still held would never reach a replica).
    try:
        wait_until(lambda: sum(per_replica(metrics(url), "apd_active_requests").values()) == 2, "both requests decode")
    finally:
        for sock in clients:
            sock.close()

    def both_cancelled() -> bool:
        page = metrics(url)
        return (sum(per_replica(page, "apd_cancelled_requests_total").values()) == cancelled_before + 2
                and sum(per_replica(page, "apd_active_requests").values()) == 0)

    wait_until(both_cancelled, "both requests are cancelled and their slots free", 30)
    wait_until(lambda: counted(metrics(url), "/v1/completions", "499") == closed_before + 1,
               "the whole answer counts as 499", 10)
    assert counted(metrics(url), "/v1/completions", "500") == 0


def counted(page: str, endpoint: str, status: str) -> float:
    """apd_requests_total of `endpoint` and `status`, summed over the replicas."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith(f'apd_requests_total{{endpoint="{endpoint}",') and f'status="{status}"' in line)


def test_a_killed_replica_costs_no_whole_answer_and_ends_its_streams(local_ray):
    """32 whole answers from 8 clients while one replica is killed: each one it held is retried on
    the other; a stream it held ends with an error event and [DONE]. Serve replaces the replica."""
    url, _ = local_ray
    c = client(url, KEY)
    pids = pid_of_replica(metrics(url))
    assert len(pids) == 2
    # A long stream, whose replica (named in its headers) is the one killed.
    stream = httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"prompt": "12 + 7 =", "max_tokens": 150, "alg": "diffusion", "stream": True})
    response = stream.__enter__()
    victim = int(pids[response.headers["x-apd-replica"]])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line for line in response.iter_lines() if line))
    reader.start()
    outcomes: list[str] = []

    def four_questions(i: int) -> None:
        for j in range(4):
            try:
                ask(c.with_options(timeout=60), QUESTIONS[(i + j) % 8])
                outcomes.append("ok")
            except openai.APIError as exc:
                outcomes.append(type(exc).__name__)

    clients = [threading.Thread(target=four_questions, args=(i,)) for i in range(8)]
    for thread in clients:
        thread.start()
    wait_until(lambda: outcomes, "the load runs")
    assert reader.is_alive(), "the stream ended before the kill: make it longer"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    reader.join(timeout=60)
    stream.__exit__(None, None, None)
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "replica_died", lines[-3:]
    for thread in clients:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a request hung"
    assert outcomes == ["ok"] * 32, Counter(outcomes)
    wait_until(lambda: len(set(pid_of_replica(metrics(url)).values()) - {str(victim)}) == 2,
               "Serve starts a new replica", 90)
    print(f"\nkill test: {outcomes.count('ok')} of 32 answered; a new replica's metrics "
          f"{time.monotonic() - killed:.1f} s after the kill")
    for problem in QUESTIONS[:3] + QUESTIONS[4:5]:  # ones the demo pair answers right (it misses QUESTIONS[3])
        assert extract_answer(ask(c, problem)) == problem.answer


def pid_of_replica(page: str) -> dict[str, str]:
    """Each replica's id and the pid of its process, as /metrics labels them."""
    return {replica: pid for pid, replica in re.findall(r'pid="(\d+)",replica="([^"]+)"', page)}


def test_sigterm_leaves_no_ray_process(local_ray, ray_tmp):
    _, proc = local_ray
    assert ray_processes(ray_tmp), "the test cannot see Ray's processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    wait_until(lambda: not ray_processes(ray_tmp), "every Ray process is gone", 30)


# A simulated cluster in a process of its own: two Ray nodes on this machine, one CPU each, with
# Serve's proxy running on the head node at the port given (as on a cluster where Serve already
# runs; one proxy, as the command starts by default, rather than Serve's one per node). It prints its
# address once all is up, and shuts down when its stdin closes.
CLUSTER = """
import sys
import ray
from ray import serve
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
ray.shutdown()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def cluster_starting():
    """The cluster starts while the local-Ray tests run: Ray's start-up is mostly waiting."""
    folder, port = tempfile.mkdtemp(prefix="apdray-", dir="/tmp"), free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_TMPDIR": folder, "RAY_USAGE_STATS_ENABLED": "0"})
    proc.serve_port = port
    try:
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes(cluster_starting) -> tuple[str, int]:
    """The cluster's address, and the port of its Serve proxy."""
    address = cluster_starting.stdout.readline().strip()
    assert address, "the simulated cluster did not start"
    return address, cluster_starting.serve_port


def test_two_nodes_answer_as_the_single_process_server_and_refuse_a_damaged_bundle(two_nodes, demo_bundle,
                                                                                   demo_runtime, ray_tmp):
    address, port = two_nodes
    # A damaged copy of the bundle, served beside the good one: each node checks it and refuses.
    damaged = Path(tempfile.mkdtemp(dir=ray_tmp)) / "arith"
    shutil.copytree(demo_bundle, damaged)
    graph = damaged / "verifier.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    refused = subprocess.Popen([CLI, "serve", str(damaged), "--ray", "--ray-address", address, "--port",
                                str(free_port())], stderr=subprocess.PIPE, text=True)
    too_big = subprocess.Popen([CLI, "serve", str(demo_bundle), "--ray", "--ray-address", address, "--threads", "2",
                                "--port", str(free_port())], stderr=subprocess.PIPE, text=True)
    # The single-process server answers as Runtime.generate does (test_server.py checks it).
    expected = [demo_runtime.generate(p.question, chat=True, max_new_tokens=32).text for p in QUESTIONS]
    # Serve runs on the cluster already, its proxy on `port`: the command deploys there.
    with ray_server(demo_bundle, ray_tmp, "--replicas", "2", "--ray-address", address, port=port) as (url, proc):
        second = subprocess.Popen([CLI, "serve", str(demo_bundle), "--ray", "--ray-address", address, "--port",
                                   str(free_port())], stderr=subprocess.PIPE, text=True)
        c = client(url)
        answers: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(c, QUESTIONS[i]))) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [answers[i] for i in range(8)] == expected
        assert len(label_values(metrics(url), "node_id")) == 2  # Ray placed a replica on each node
        _, stderr = second.communicate(timeout=120)  # a second command leaves the running application alone
        assert second.returncode == 1 and "already serves an application 'apd-deploy'" in stderr, stderr
        assert [ask(c, p) for p in QUESTIONS[:2]] == expected[:2]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    _, stderr = refused.communicate(timeout=120)
    assert refused.returncode == 1
    refusals = re.findall(rf"node \S+ \(\S+, Ray node ([0-9a-f]+)\): {re.escape(str(graph))}: sha256 differs", stderr)
    assert len(set(refusals)) == 2, stderr  # each node names itself
    _, stderr = too_big.communicate(timeout=120)
    assert too_big.returncode == 1 and "no node of the Ray cluster has 2 CPUs for a replica (--threads 2)" in stderr


def test_a_serve_config_file_builds_the_same_application(demo_bundle):
    """docs/rayservice.yaml's Serve config is valid for Ray Serve and its args build the application
    (KubeRay itself is not run here)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from apd_deploy.server.ray_serve import build_app

    document = yaml.safe_load((Path(__file__).parents[1] / "docs" / "rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(document["spec"]["serveConfigV2"]))
    (entry,) = config.applications
    assert entry.import_path == "apd_deploy.server.ray_serve:build_app"
    gateway = build_app({**entry.args, "bundle": str(demo_bundle)})._bound_deployment
    assert gateway.name == "Gateway" and gateway._deployment_config.max_ongoing_requests == 4 * (8 + 64 + 1)
    deployment = gateway.init_args[0]._bound_deployment  # the replicas, behind the gateway
    assert deployment.ray_actor_options == {"num_cpus": 4, "num_gpus": 0}
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    assert deployment._deployment_config.max_ongoing_requests == 8 + 64 + 1
    for args, message in [({}, "field 'bundle'"), ({"bundle": str(demo_bundle), "replica": 2}, "unknown field 'replica'"),
                          ({"bundle": str(demo_bundle), "threads": "4"}, "'threads' must be an integer"),
                          ({"bundle": str(demo_bundle), "engine": "tensorrt-fp16"}, "no engine named 'tensorrt-fp16'")]:
        with pytest.raises(Exception, match=message):
            build_app(args)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas is for Ray Serve: add --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "give --replicas or --autoscale, not both"),
    (["--ray", "--autoscale", "3:1"], "MIN must be at most MAX"),
    (["--ray", "--autoscale", "two"], "expected MIN:MAX"),
])
def test_cli_refuses_ray_flags_that_do_not_fit(demo_bundle, args, message):
    code, _, err = run("serve", str(demo_bundle), *args)  # in-process: refused before anything starts
    assert code == 2 and message in err, err
