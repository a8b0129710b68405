"""`apd-deploy serve --ray` as users meet it: real Ray (a local one the command starts, and a
simulated two-node cluster), real replicas, driven by the `openai` client on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
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
from tests.test_hardening_cli import run
from tests.test_server import CLI, KEY, QUESTIONS, client, server

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


def test_a_client_that_goes_away_cancels_its_request(local_ray):
    """Through the proxy too: a stream and a whole answer whose clients give up are cancelled on
    their replicas, which free their slots."""
    url, _ = local_ray
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": "12 + 7 =", "max_tokens": 100, "alg": "diffusion"}  # 100 steps: seconds
    # Both give up long before the answer (about a second here). Not after a stream's first chunk:
    # diffusion commits the demo dLLM's first tokens last, so that chunk comes at the end.
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, headers=auth,
                          timeout=0.3) as response:
            next(response.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=long, headers=auth, timeout=0.3)

    def both_cancelled() -> bool:
        page = metrics(url)
        return (sum(per_replica(page, "apd_cancelled_requests_total").values()) == 2
                and sum(per_replica(page, "apd_active_requests").values()) == 0)

    wait_until(both_cancelled, "both requests are cancelled and their slots free", 30)


def test_a_killed_replica_fails_only_its_requests_and_comes_back(local_ray):
    url, _ = local_ray
    c = client(url, KEY)
    before = label_values(metrics(url), "pid")
    assert len(before) == 2
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                ask(c.with_options(timeout=60), QUESTIONS[len(outcomes) % 8])
                outcomes.append("ok")
            except openai.APIError as exc:  # the replica died under it: an error, not a hang
                outcomes.append(type(exc).__name__)

    clients = [threading.Thread(target=load) for _ in range(4)]
    for thread in clients:
        thread.start()
    wait_until(lambda: len(outcomes) >= 4, "the load runs")
    victim = int(sorted(before)[0])
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: label_values(metrics(url), "pid") - before - {str(victim)}, "Serve starts a new replica", 90)
    stop.set()
    for thread in clients:
        thread.join(timeout=90)
        assert not thread.is_alive(), "a request hung"
    assert outcomes.count("ok") > len(outcomes) // 2, Counter(outcomes)
    for problem in QUESTIONS[:3] + QUESTIONS[4:5]:  # ones the demo pair answers right (it misses QUESTIONS[3])
        assert extract_answer(ask(c, problem)) == problem.answer


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
    app = build_app({**entry.args, "bundle": str(demo_bundle)})
    deployment = app._bound_deployment
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
