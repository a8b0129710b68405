"""What runs on Ray Serve: the gateway, which takes each HTTP request from Serve's proxy and hands
it to a replica; the replicas (the bundle checked on its node, the runtime and its batched
scheduler, the server's own FastAPI app); and the metrics board that lets any replica's /metrics
show every replica's figures.

The gateway calls a replica through a deployment handle, so it learns when the replica dies under
a request: a whole answer, of which the client has received nothing yet, is sent once more to
another replica; a stream, whose client has its first chunks, ends with an error event and
`data: [DONE]`.

Each replica pushes its collected metrics to the board every `PUSH_SECONDS`; a /metrics request
pushes the answering replica's first, so its own figures are current and the others' at most that
old. A replica silent for `STALE_SECONDS` (it died) drops off the page.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from prometheus_client.metrics_core import Metric
from ray import serve

from apd_deploy.errors import BundleError, GenerationError
from apd_deploy.runtime import Runtime
from apd_deploy.server.app import create_app
from apd_deploy.server.metrics import labelled_page
from apd_deploy.server.protocol import OpenAIError
from apd_deploy.server.settings import ServeSettings


def _serve_grpc_on_loopback() -> None:
    """In a Ray for one machine (`serve --ray` without --ray-address: Ray's processes listen on
    127.0.0.1), a Serve replica's own gRPC server listens there too; Serve 2.60 binds it to every
    interface ('[::]:0') whatever the node's address. Called by each deployment's constructor: Serve
    starts that server after it, in the same process."""
    from ray._private import ray_constants
    from ray.serve._private import replica

    if ray_constants.ENABLE_RAY_CLUSTER:
        return
    add_port = replica.add_port_to_grpc_server
    replica.add_port_to_grpc_server = lambda server, address: add_port(
        server, "127.0.0.1:0" if address == "[::]:0" else address)

PUSH_SECONDS = 1.0
STALE_SECONDS = 10.0
DROP_SECONDS = 0.25
DRAIN_POLL_SECONDS = 0.25
HEALTH_CHECK_SECONDS = 2.0


def for_ray(settings: ServeSettings) -> ServeSettings:
    """`settings` as every replica reads them: the bundle's absolute path, its manifest's sha256 and
    whether the engine needs a GPU, the model's name, a thread at least (read here, so that a wrong
    path or engine fails before anything is deployed)."""
    path = Path(settings.bundle).resolve()
    _, record = Runtime.check_files(path, settings.engine, verify="skip")
    return replace(settings, bundle=str(path), model_name=settings.served_name, threads=settings.threads or 1,
                   manifest_sha256=hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest(),
                   gpu=record is not None and record.get("device") != "cpu")


def deployment_options(settings: ServeSettings, replicas: int | None = None,
                       autoscale: tuple[int, int] | None = None) -> dict[str, Any]:
    """Serve's options for the replicas.

    A replica reserves `threads` CPUs (and a GPU for a GPU engine), so Ray places no more
    replicas on a node than it has cores for. It takes one request more than its scheduler
    holds (a full batch and a full queue): a full replica answers 429 itself, as the
    single-process server does, instead of Serve's proxy queueing requests without bound.
    Autoscaling aims at a full batch decoding on each replica.
    """
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.threads, "num_gpus": 1 if settings.gpu else 0},
        "max_ongoing_requests": settings.max_batch + settings.max_queue + 1,
        "graceful_shutdown_timeout_s": settings.grace_seconds,
        # How often a stopping replica looks whether its requests are done (Serve's default: 2 s).
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_SECONDS,
        # Serve learns that a replica's process died from its next health check (default every
        # 10 s): the check is a flag's read, so a dead replica is replaced within about 2 s.
        "health_check_period_s": HEALTH_CHECK_SECONDS,
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas or 1
    return options


def node_name() -> str:
    """This node as a user can find it: host name, IP address and Ray node id."""
    return (f"node {socket.gethostname()} ({ray.util.get_node_ip_address()}, "
            f"Ray node {ray.get_runtime_context().get_node_id()})")


def check_here(settings: ServeSettings) -> None:
    """The bundle on this node, checked before it takes traffic: its manifest must be the driver's,
    and every file the engine reads must match the manifest's sha256, hashed in full (this node's
    copy may differ in content while its size and time match). Errors name the node and the file."""
    manifest = Path(settings.bundle) / "manifest.json"
    try:
        if not manifest.is_file():
            raise BundleError(f"{manifest}: missing; the bundle must be readable at this path on every node "
                              "(a shared file system, or a copy at the same path)")
        if hashlib.sha256(manifest.read_bytes()).hexdigest() != settings.manifest_sha256:
            raise BundleError(f"{manifest}: differs from the manifest the application was deployed with; copy "
                              "the same bundle to this node")
        Runtime.check_files(settings.bundle, settings.engine, verify="full")
    except BundleError as exc:
        raise BundleError(f"{node_name()}: {exc}") from None


def check_every_node(settings: ServeSettings) -> None:
    """`check_here` at once on every node that could hold a replica (enough CPUs, a GPU if the
    engine needs one), before anything is deployed: one error lists each node whose bundle is
    missing or differs. A node that joins later is checked by the replicas Serve places on it.
    The driver's own node is checked in this process (a Ray task would start a worker for it),
    unless the driver is a Ray Client, whose files are not the cluster's."""
    from ray.util.client import ray as ray_client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def could_hold_a_replica(node: dict[str, Any]) -> bool:
        resources = node["Resources"]
        return (node["Alive"] and resources.get("CPU", 0) >= settings.threads
                and (not settings.gpu or resources.get("GPU", 0) >= 1))

    nodes = [node for node in ray.nodes() if could_hold_a_replica(node)]
    if not nodes:
        need = f"{settings.threads} CPU{'s' * (settings.threads > 1)}" + (" and a GPU" if settings.gpu else "")
        raise GenerationError(f"no node of the Ray cluster has {need} for a replica (--threads {settings.threads}); "
                              "use fewer --threads, or add a node (`ray status` lists what each node has)")
    here = None if ray_client.is_connected() else ray.get_runtime_context().get_node_id()
    check = ray.remote(num_cpus=0, max_retries=0)(check_here)
    pending = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(settings)
               for node in nodes if node["NodeID"] != here]
    failures = []
    if any(node["NodeID"] == here for node in nodes):
        try:
            check_here(settings)
        except BundleError as exc:
            failures.append(str(exc))
    for task in pending:
        try:
            ray.get(task)
        except ray.exceptions.RayTaskError as exc:
            failures.append(str(exc.cause) if isinstance(exc.cause, BundleError) else str(exc))
    if failures:
        raise BundleError("\n".join(failures))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  graceful_shutdown_wait_loop_s=DRAIN_POLL_SECONDS)
class MetricsBoard:
    """The latest metrics each replica pushed."""

    def __init__(self) -> None:
        _serve_grpc_on_loopback()
        self.latest: dict[str, tuple[float, dict[str, str], list[Metric]]] = {}

    def push(self, replica: str, labels: dict[str, str], collected: list[Metric]) -> None:
        self.latest[replica] = (time.monotonic(), labels, collected)

    def drop(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def page(self) -> bytes:
        now = time.monotonic()
        self.latest = {k: v for k, v in self.latest.items() if now - v[0] < STALE_SECONDS}
        return labelled_page({k: (labels, collected) for k, (_, labels, collected) in self.latest.items()})


@serve.deployment
class Replica:
    """One copy of the server, which the gateway calls once per HTTP request (`http`)."""

    async def __init__(self, settings: ServeSettings, board) -> None:
        _serve_grpc_on_loopback()
        self.settings, self.board = settings, board
        check_here(settings)
        self.runtime = Runtime.load(settings.bundle, engine=settings.engine, threads=settings.threads, verify="skip")
        self.scheduler = self.runtime.scheduler(max_batch=settings.max_batch, max_queue=settings.max_queue,
                                                lanes=settings.lanes)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.labels = {"replica": self.id, "node": socket.gethostname(),
                       "node_id": ray.get_runtime_context().get_node_id(), "pid": str(os.getpid())}
        # Behind Serve's proxy: any Host name is answered (the flags that would narrow them are refused with --ray).
        self.app = create_app(self.runtime, self.scheduler, replace(settings, host=None), render_metrics=self.page)
        self.registry = self.app.state.metrics.registry
        self.pusher = asyncio.get_running_loop().create_task(self.push_forever())

    async def http(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        """One HTTP request (its ASGI scope and whole body) through the app: the ASGI messages the
        app sends, its response's start naming this replica (`x-apd-replica`). Cancelling the call
        (the client went away) cancels the app's request."""
        sent: asyncio.Queue = asyncio.Queue()
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()  # nothing more comes: a client that goes away cancels the call

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-apd-replica", self.id.encode())]}
            sent.put_nowait(message)

        request = asyncio.get_running_loop().create_task(self.app(scope, receive, send))
        request.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                yield message
        finally:
            if not request.done():
                request.cancel()
                await asyncio.wait([request])  # its own cleanup: the scheduler's slot, the metrics

    async def push(self) -> None:
        await self.board.push.remote(self.id, self.labels, list(self.registry.collect()))

    async def push_forever(self) -> None:
        while True:
            try:
                await self.push()
            except Exception:  # the board restarts with its deployment: the next push refills it
                pass
            await asyncio.sleep(PUSH_SECONDS)

    async def page(self) -> bytes:
        await self.push()
        return await self.board.page.remote()

    def check_health(self) -> None:
        """Serve restarts a replica whose scheduling loops stopped."""
        if not self.scheduler.alive:
            raise RuntimeError(f"{node_name()}: the scheduler of replica {self.id} stopped")

    async def __del__(self) -> None:
        self.pusher.cancel()
        try:  # the board may be gone first when the whole application is deleted
            await asyncio.wait_for(self.board.drop.remote(self.id), DROP_SECONDS)
        except Exception:
            pass
        await asyncio.to_thread(self.scheduler.close, True, self.settings.grace_seconds)


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=DRAIN_POLL_SECONDS,
                  health_check_period_s=HEALTH_CHECK_SECONDS)
@serve.ingress()
class Gateway:
    """The HTTP ingress: each request goes to a replica through a handle (Serve's routing, to the
    replica with fewer requests in flight of two it samples)."""

    def __init__(self, replicas, max_body_bytes: int) -> None:
        _serve_grpc_on_loopback()
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes = max_body_bytes

    async def __serve_build_asgi_app__(self):
        async def app(scope: dict[str, Any], receive, send) -> None:  # a function: uvicorn takes a method for ASGI 2
            await self.forward(scope, receive, send)

        return app

    async def forward(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:  # the replica's app checks the size: more than its limit is never needed to refuse it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes or not message.get("more_body"):
                break
        plain = {key: scope[key] for key in ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
                                             "query_string", "root_path", "headers", "client", "server") if key in scope}
        for attempt in (1, 2):
            started = streaming = False
            response = self.replicas.http.remote(plain, body)
            try:
                async for message in response:
                    if message["type"] == "http.response.start":
                        started = True
                        streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                        for k, v in message["headers"])
                    await send(message)
                return
            except ray.exceptions.RayActorError:  # the replica's process or node died
                if not started and attempt == 1:
                    continue  # nothing reached the client: the same request, to another replica
                died = OpenAIError(503, "the replica answering this request stopped (its process or node died) and "
                                   "the answer is incomplete; send the request again", code="replica_died")
                if started:
                    event = f"data: {json.dumps(died.body())}\n\ndata: [DONE]\n\n" if streaming else ""
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
                else:
                    await send({"type": "http.response.start", "status": died.status,
                                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
                    await send({"type": "http.response.body", "body": json.dumps(died.body()).encode()})
                return
            finally:
                response.cancel()  # the client went away: the replica's request goes too (a no-op once done)


def application(settings: ServeSettings, replica_options: dict[str, Any]):
    """The Serve application: the gateway, the replicas (with `replica_options`) and their metrics
    board. The gateway takes as many requests as every replica can hold: a full replica answers
    429 itself."""
    scale = replica_options.get("autoscaling_config")
    most = scale["max_replicas"] if scale else replica_options["num_replicas"]
    replicas = Replica.options(**replica_options).bind(settings, MetricsBoard.bind())
    return Gateway.options(max_ongoing_requests=most * replica_options["max_ongoing_requests"],
                           graceful_shutdown_timeout_s=settings.grace_seconds).bind(replicas, settings.max_body_bytes)
