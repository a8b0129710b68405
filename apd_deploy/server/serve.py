"""`apd-deploy serve`: load the bundle once, start the scheduler, run the app on uvicorn.

The port is bound before the bundle loads (a port in use is one error line), and the address
announced is the one bound (`--port 0` picks a free port). Connections run on h11 with bounded
request heads (size, and time: `head_timeout.py`), idle keep-alive and connection counts.

SIGTERM (or Ctrl-C): /ready turns 503, uvicorn stops accepting connections and lets the requests
in flight finish for up to `grace_seconds`; then what still runs is cancelled and answered 503
(a stream: an error event, then [DONE]), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import socket
import signal
import sys
import uvicorn

from apd_deploy.errors import ApdDeployError
from apd_deploy.runtime import Runtime
from apd_deploy.server.app import create_app, is_loopback, is_wildcard
from apd_deploy.server.head_timeout import head_timeout_protocol
from apd_deploy.server.settings import ServeSettings

# Past the grace period the requests still running are cancelled; this long is left for their 503s
# to be written before uvicorn cancels what remains.
ABORT_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it drains as soon as the signal arrives, and ending the
    requests still running once the grace period is over."""

    def __init__(self, config: uvicorn.Config, app, grace_seconds: float) -> None:
        super().__init__(config)
        self.app, self.grace_seconds = app, grace_seconds

    def handle_exit(self, sig, frame) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.grace_seconds, self.app.state.abort)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or ApdDeployError naming the --port or --host to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise ApdDeployError(f"port {port} on {host} is in use; stop what listens there or choose another "
                                 "--port (--port 0: any free port)") from None
        raise ApdDeployError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server that anyone on the network may use."""
    if api_key is None and not is_loopback(host):
        where = "every interface" if is_wildcard(host) else host
        return (f"warning: serving on {where} without an API key: anyone who can reach this port can use the "
                "model; set --api-key (or APD_API_KEY), or bind --host 127.0.0.1")
    return None


def serve(settings: ServeSettings) -> None:
    s = settings
    if (warning := exposure_warning(s.host, s.api_key)) is not None:
        print(warning, file=sys.stderr, flush=True)
    sock = bind(s.host, s.port)
    runtime = Runtime.load(s.bundle, engine=s.engine, threads=s.threads)
    scheduler = runtime.scheduler(max_batch=s.max_batch, max_queue=s.max_queue, lanes=s.lanes)
    app = create_app(runtime, scheduler, s)
    server = DrainingServer(uvicorn.Config(
        app, http=head_timeout_protocol(s.header_timeout), h11_max_incomplete_event_size=s.max_header_bytes,
        timeout_keep_alive=s.keep_alive_seconds, limit_concurrency=s.max_connections, log_level="warning",
        access_log=False, timeout_graceful_shutdown=s.grace_seconds + ABORT_SECONDS, lifespan="off"), app,
        s.grace_seconds)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {s.bundle} as '{s.served_name}' on http://{shown}:{bound_port} (max batch {s.max_batch}, "
          f"queue {s.max_queue}{', API key required' if s.api_key else ''})", file=sys.stderr, flush=True)
    # uvicorn re-raises a signal it caught once its graceful shutdown is over, to the handler that
    # was there before it: by then the drain is done, so that handler only lets the process exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close(cancel=True, timeout=s.grace_seconds)
    print("stopped", file=sys.stderr, flush=True)
