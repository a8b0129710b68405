"""`apd-deploy serve --ray`: the server as Ray Serve replicas behind one HTTP endpoint.

This process is the driver: it starts a local Ray (or joins the cluster at `--ray-address`),
checks the bundle on every node, starts Serve's HTTP proxy, deploys the application
(`ray_replica`) and waits. SIGTERM or Ctrl-C deletes the application, which lets each replica
finish its requests for up to `grace_seconds`, and then stops what this process started: a local
Ray wholly; on a cluster, Serve if it was not running before, never the cluster.

`build_app` is the same application for Serve config files (`serve deploy`, KubeRay's RayService).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import Param, check_integer

APP_NAME = "apd-deploy"


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' replicas, 0 <= MIN <= MAX, MAX >= 1."""
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise GenerationError(f"--autoscale {text!r}: expected MIN:MAX replicas, e.g. 1:4")
    bounds = int(low), int(high)
    if bounds[0] > bounds[1] or bounds[1] < 1:
        raise GenerationError(f"--autoscale {text!r}: MIN must be at most MAX, and MAX at least 1")
    return bounds


def build_app(args: dict[str, Any]):
    """The application from a Serve config file's `args`: `bundle` (required), `engine`,
    `replicas` or `autoscale` ('MIN:MAX'), and `apd-deploy serve`'s flags in snake case
    (threads, max_batch, max_queue, lanes, served_model_name, api_key, max_tokens, max_body_bytes,
    grace_seconds); without api_key, APD_API_KEY where Serve builds the application. Each replica
    checks the bundle on its node before it serves."""
    from apd_deploy.server.ray_replica import application, deployment_options, for_ray
    from apd_deploy.server.settings import ServeSettings

    known = {"bundle", "engine", "replicas", "autoscale", "threads", "max_batch", "max_queue", "lanes",
             "served_model_name", "api_key", "max_tokens", "max_body_bytes", "grace_seconds"}
    unknown = sorted(set(args) - known)
    if unknown or "bundle" not in args:
        raise GenerationError(f"Serve config 'args' of {build_app.__module__}:build_app: "
                              + (f"unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})" if unknown
                                 else "field 'bundle' (the bundle's path on every node) is required"))
    for field in ("threads", "max_batch", "max_queue", "lanes", "max_body_bytes", "replicas", "max_tokens"):
        if args.get(field) is not None:
            check_integer(f"Serve config 'args' field '{field}'", args[field], 1)
    if args.get("grace_seconds") is not None:
        Param("Serve config 'args' field 'grace_seconds'", float, 0, "", "", low=0).check(args["grace_seconds"])
    server = {k: v for k, v in args.items() if k not in ("replicas", "autoscale", "served_model_name")}
    # A key from the environment (a Secret's) rather than the config file, as the CLI's APD_API_KEY.
    server["api_key"] = args.get("api_key") or os.environ.get("APD_API_KEY")
    settings = for_ray(ServeSettings(model_name=args.get("served_model_name"), **server))
    autoscale = parse_autoscale(args["autoscale"]) if args.get("autoscale") else None
    return application(settings, deployment_options(settings, args.get("replicas"), autoscale))


def serve_on_ray(settings, options: dict[str, Any], ray_address: str | None, proxy_every_node: bool) -> None:
    """Serve `settings` (a ServeSettings, `for_ray`) as Serve deployment `options` until SIGTERM/SIGINT."""
    host, port = settings.host, settings.port
    # Ray reports usage to its developers unless told not to; the user may still opt in.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from apd_deploy.server.ray_replica import application, check_every_node

    if ray_address is None:
        # A Ray for one machine, as Ray runs on macOS and Windows: every process it starts (its
        # servers, agents and workers) listens on 127.0.0.1 instead of every interface. Ray reads
        # the variable when imported: its processes do, and this one, which imported Ray already,
        # is told the same.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # 'local': a Ray of this command's own, even where `ray start` left a cluster running here.
    ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=True)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    started_serve, serving = ray_address is not None and not _serve_running(), False
    try:
        if ray_address is not None and not started_serve and APP_NAME in serve.status().applications:
            raise GenerationError(f"the Ray cluster at {ray_address} already serves an application '{APP_NAME}' "
                                  "(another `apd-deploy serve --ray`); stop that one first (SIGTERM, or `serve "
                                  "shutdown` for what a config file deployed)")
        check_every_node(settings)
        serve.start(proxy_location="EveryNode" if proxy_every_node else "HeadOnly",
                    http_options={"host": host, "port": port})
        serving = True
        try:
            serve.run(application(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise GenerationError(f"the replicas did not start: {_replica_error(exc)}") from None
        scale = options.get("autoscaling_config")
        count = (f"{scale['min_replicas']} to {scale['max_replicas']} replicas (autoscaling)" if scale
                 else f"{options['num_replicas']} replica{'s' * (options['num_replicas'] > 1)}")
        print(f"serving {settings.bundle} as '{settings.model_name}' on http://{host}:{port} through Ray Serve: "
              f"{count}, {settings.threads} CPU{'s' * (settings.threads > 1)} each (max batch {settings.max_batch}, "
              f"queue {settings.max_queue}{', API key required' if settings.api_key else ''}); Ray at "
              f"{ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
        print("draining", file=sys.stderr, flush=True)
    finally:
        try:
            if serving:
                serve.delete(APP_NAME)  # each replica drains first
                if started_serve:
                    serve.shutdown()
        finally:
            ray.shutdown()  # a Ray this process started stops with it; a cluster's goes on
    print("stopped", file=sys.stderr, flush=True)


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _replica_error(failure: RuntimeError) -> str:
    """The replicas' own error, out of the deployment's status (Serve's exception only says that
    the deployment failed; its status holds the replica's traceback)."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    reports = [d.message for d in app.deployments.values() if d.message] if app else []
    for line in reversed("\n".join(reports).splitlines()):
        if "BundleError: " in line:
            return line.split("BundleError: ", 1)[1]
    return "\n".join(reports) or str(failure)
