"""`apd-deploy serve`: load the bundle once, start the scheduler, run the app on uvicorn.

SIGTERM (or Ctrl-C): /ready turns 503, uvicorn stops accepting connections and lets the requests
in flight finish for up to `grace_seconds`, then the scheduler is closed (what still runs is
cancelled) and the process exits 0.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from apd_deploy.runtime import Runtime
from apd_deploy.server.app import ServerConfig, create_app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it drains as soon as the signal arrives."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def serve(bundle: str, engine: str | None, host: str, port: int, max_batch: int, max_queue: int, lanes: int,
          threads: int | None, api_key: str | None, model_name: str | None, max_tokens: int | None,
          max_body_bytes: int, grace_seconds: float) -> None:
    runtime = Runtime.load(bundle, engine=engine, threads=threads)
    scheduler = runtime.scheduler(max_batch=max_batch, max_queue=max_queue, lanes=lanes)
    config = ServerConfig.for_runtime(runtime, model_name, api_key, max_body_bytes, max_tokens)
    app = create_app(runtime, scheduler, config)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=grace_seconds, lifespan="off"), app)
    print(f"serving {bundle} as '{config.model_name}' on http://{host}:{port} (max batch {max_batch}, "
          f"queue {max_queue}{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    # uvicorn re-raises a signal it caught once its graceful shutdown is over, to the handler that
    # was there before it: by then the drain is done, so that handler only lets the process exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        scheduler.close(cancel=True, timeout=grace_seconds)
    print("stopped", file=sys.stderr, flush=True)
