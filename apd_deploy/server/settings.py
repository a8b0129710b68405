"""`ServeSettings`: what `apd-deploy serve` serves and how, parsed once by the command line (or a Serve
config file's args) and read by the single-process server, its app and each Ray Serve replica."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeSettings:
    """`serve`'s flags, as plain data: with --ray it travels to every node."""

    bundle: str  # absolute for Ray: replicas do not share the driver's working directory
    engine: str | None = None
    host: str | None = "127.0.0.1"  # None: behind a proxy (Ray Serve's), any Host name is answered
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    lanes: int = 1
    threads: int | None = None
    api_key: str | None = None
    model_name: str | None = None  # default: the bundle folder's name
    max_tokens: int | None = None  # the largest max_tokens a request may ask for; default: the models' positions
    max_body_bytes: int = 1 << 20
    grace_seconds: float = 30.0
    header_timeout: float = 10.0  # seconds to send a request head
    max_header_bytes: int = 16384  # a request line and headers larger get 400
    keep_alive_seconds: float = 5.0  # an idle connection between requests is closed after this
    max_connections: int = 1024  # connections and requests in flight; beyond, 503
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides the bound address and localhost
    allowed_origins: tuple[str, ...] = ()  # browser origins taken ('*': any); requests from others get 403
    metrics_key_required: bool = False  # /metrics asks for the API key too
    manifest_sha256: str | None = None  # Ray: the manifest deployed; a node with another refuses to serve
    gpu: bool = False  # Ray: the engine runs on a GPU, so each replica reserves one

    @property
    def served_name(self) -> str:  # the model name clients send
        return self.model_name or Path(self.bundle).resolve().name
