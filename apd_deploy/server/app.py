"""The OpenAI-compatible HTTP API (FastAPI) over one loaded bundle and its batched scheduler.

Requests are decoded by the scheduler's threads; each request's chunks reach the event loop
through `call_soon_threadsafe`, so no thread waits per request and a slow client holds nothing
but its slot. A client that goes away (mid-stream, or before a non-streamed answer) cancels its
request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from apd_deploy.errors import GenerationError
from apd_deploy.runtime import QueueFull, Runtime, Scheduler, SchedulerClosed
from apd_deploy.runtime.params import PARAMS, GenerationParams
from apd_deploy.server.metrics import Metrics
from apd_deploy.server.protocol import OpenAIError, ParsedRequest, bad, parse_chat, parse_completion, refused
from apd_deploy.server.settings import ServeSettings
from apd_deploy.server.stops import StopText

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
RETRY_LATER = {"Retry-After": "1"}  # a 429's or 503's headers


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
JSON_ROUTES = {"/v1/completions", "/v1/chat/completions"}


def host_names(host: str | None, allowed: tuple[str, ...]) -> frozenset[str] | None:
    """The Host header names a server bound to `host` answers (a browser sent to another name by
    DNS rebinding is refused); None (any) for '*' or a wildcard address without --allowed-hosts."""
    if "*" in allowed or (host is None or is_wildcard(host)) and not allowed:
        return None
    return frozenset({*(a.lower().strip("[]") for a in allowed), *LOOPBACK_NAMES,
                      *([] if host is None or is_wildcard(host) else [host.lower().strip("[]")])})


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _max_prompt_chars(runtime: Runtime) -> int | None:
    """The most characters a prompt that fits the models' positions can have: positions times the
    longest token's text (a token's text covers at least as many characters as it holds). The
    tokenizer holds the GIL while it reads: a longer prompt is refused before it is read."""
    if runtime.tokenizer is None:
        return None
    vocab = runtime.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    return runtime.max_positions * max(map(len, vocab), default=1)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes a lone surrogate of the request
    still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


@dataclass
class Turn:
    """What one request needs while it is answered."""

    parsed: ParsedRequest
    params: GenerationParams  # as settled: the bundle's defaults where the body gave none
    prompt_tokens: int
    kind: str  # 'completion' or 'chat'
    id: str
    created: int


def create_app(runtime: Runtime, scheduler: Scheduler, settings: ServeSettings,
               render_metrics: Callable[[], Awaitable[bytes]] | None = None) -> FastAPI:
    """The app over `scheduler`, serving the model as `settings.served_name`, max_tokens capped at
    what the models' positions hold. render_metrics: what /metrics answers (a replica shows every
    replica's); by default this app's own metrics (`app.state.metrics`)."""
    model_name, positions = settings.served_name, runtime.max_positions
    max_tokens = min(settings.max_tokens or positions - 1, positions - 1)
    max_prompt_chars = _max_prompt_chars(runtime)
    app = FastAPI(title="apd-deploy", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = app.state.metrics = Metrics(lambda: scheduler.queued, lambda: scheduler.active)
    scheduler.on_iteration = metrics.iteration
    app.state.draining = False
    app.state.aborted = False  # past the grace period of a shutdown: what was cancelled gets 503

    def abort() -> None:
        """End every request now (queued or decoding): each is answered 503, or its stream an error event."""
        app.state.aborted = True
        scheduler.close(cancel=True, timeout=0)

    app.state.abort = abort

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            error = OpenAIError(405, f"{request.method} is not allowed on {request.url.path}; use "
                                f"{(exc.headers or {}).get('Allow', 'another method')}", code="method_not_allowed")
        elif exc.status_code == 404:
            error = OpenAIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail))
        return ErrorResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, __: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: /metrics counts it as the client's

    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "model": model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        page = await render_metrics() if render_metrics else generate_latest(metrics.registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, runtime)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise OpenAIError(404, f"model '{name}' does not exist; this server serves '{model_name}'",
                              param="model", code="model_not_found")
        return _model_card(model_name, runtime)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, "chat")

    def _read(body: bytes, kind: str):
        """The body checked and tokenized: run on a worker thread, so that a big or deep body does not
        hold up the event loop (/health, the streams of other requests)."""
        parse = parse_chat if kind == "chat" else parse_completion
        parsed = parse(_json(body), max_tokens)
        if parsed.model is not None and parsed.model != model_name:
            raise OpenAIError(404, f"model '{parsed.model}' does not exist; this server serves '{model_name}'",
                              param="model", code="model_not_found")
        return parsed, *_prepare(runtime, parsed, max_prompt_chars)

    async def _answer(request: Request, kind: str):
        body = await _read_body(request, settings.max_body_bytes)
        parsed, ids, params = await run_in_threadpool(_read, body, kind)
        turn = Turn(parsed, params, len(ids), kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                    int(time.time()))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        # A whole answer without stop strings needs no text per step, nor a wake-up of the loop per step.
        chunked = parsed.stream or bool(parsed.stops)

        def on_event(event) -> None:
            if chunked or event is None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the loop is closed: the server stopped past its grace period
                    pass

        try:
            handle = scheduler.submit_prepared(ids, params, chunk_text=chunked, on_event=on_event)
        except QueueFull as exc:
            raise OpenAIError(429, str(exc), code="queue_full", headers=RETRY_LATER) from None
        except SchedulerClosed as exc:
            raise OpenAIError(503, str(exc), code="shutting_down", headers=RETRY_LATER) from None
        if parsed.stream:
            return StreamingResponse(_stream(turn, handle, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _whole(request, turn, handle, events))

    def _finished(handle):
        """The request's result; a 503 for one that the end of a shutdown's grace period cancelled."""
        result = _result_or_error(handle)
        if result.finish_reason == "cancelled" and app.state.aborted:
            raise OpenAIError(503, "the server shut down before this request finished; retry on another "
                              "server or later", code="shutting_down", headers=RETRY_LATER)
        return result

    async def _whole(request: Request, turn: Turn, handle, events: asyncio.Queue) -> dict[str, Any]:
        stops, text = StopText(turn.parsed.stops), []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise OpenAIError(499, "the client closed the request") from None
                    continue
                if event is None:
                    break
                text.append(stops.push(event.text or ""))
                if stops.stopped:
                    handle.cancel()
        finally:  # the answer is complete, or the client went away (a host such as Ray Serve cancels the call)
            if not handle.done:
                metrics.cancelled.inc()
                handle.cancel()
        result = _finished(handle)
        if not turn.parsed.stops:
            text = [result.text or ""]
        elif not stops.stopped:
            text.append(stops.flush())
        finish = "stop" if stops.stopped else result.finish_reason
        metrics.finished(result, turn.prompt_tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                   "finish_reason": finish} if turn.kind == "chat" else
                  {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish})
        return {"id": turn.id, "object": "chat.completion" if turn.kind == "chat" else "text_completion",
                "created": turn.created, "model": model_name, "choices": [choice],
                "usage": _usage(turn, len(result.token_ids)), "apd": _apd_report(turn, result)}

    async def _stream(turn: Turn, handle, events: asyncio.Queue) -> AsyncIterator[str]:
        stops = StopText(turn.parsed.stops)
        obj = "chat.completion.chunk" if turn.kind == "chat" else "text_completion"

        generated = 0  # tokens so far, for usage in every chunk (continuous_usage_stats)

        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
            if turn.kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": turn.id, "object": obj, "created": turn.created, "model": model_name,
                       "choices": [choice]}
            if turn.parsed.continuous_usage:
                payload["usage"] = _usage(turn, generated)
            return _sse(payload)

        try:
            if turn.kind == "chat":
                yield chunk(None, role=True)
            while (event := await events.get()) is not None:
                generated += len(event.token_ids)
                piece = stops.push(event.text or "")
                if piece:
                    yield chunk(piece)
                if stops.stopped:
                    handle.cancel()
            try:
                result = _finished(handle)
            except OpenAIError as exc:  # the status line is sent already: the error goes in the stream
                yield _sse(exc.body())
                yield "data: [DONE]\n\n"
                return
            if not stops.stopped and (rest := stops.flush()):
                yield chunk(rest)
            metrics.finished(result, turn.prompt_tokens)
            yield chunk(None, "stop" if stops.stopped else result.finish_reason)
            if turn.parsed.include_usage:
                yield _sse({"id": turn.id, "object": obj, "created": turn.created, "model": model_name,
                            "choices": [], "usage": _usage(turn, len(result.token_ids)),
                            "apd": _apd_report(turn, result)})
            yield "data: [DONE]\n\n"
        finally:  # the answer is complete, or the client went away (the task is cancelled)
            if not handle.done:
                metrics.cancelled.inc()
            handle.cancel()

    return app


ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class Guard:
    """What is checked before a route runs, and the request counter for every route: the Host
    header (a keyless server on loopback is not driven through DNS rebinding), the Origin (a
    browser's cross-origin request), the API key for /v1 routes (and /metrics when asked), a JSON
    content type and the body limit on the POST routes. A plain ASGI middleware (Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.hosts = host_names(settings.host, settings.allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], [None]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            self._check(path, scope["method"], {k.decode("latin-1").lower(): v.decode("latin-1")
                                                for k, v in scope["headers"]})
        except OpenAIError as exc:
            await ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, counted)
        else:
            try:
                await self.app(scope, receive, counted)
            except asyncio.CancelledError:  # the client went away and the host cancels the call (Ray Serve does)
                status[0] = status[0] or 499
                raise
        finally:
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status[0] or 500)).inc()

    def _check(self, path: str, method: str, headers: dict[str, str]) -> None:
        config = self.settings
        host = _host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            raise OpenAIError(400, f"Host '{host}' is not a name of this server; start it with --allowed-hosts "
                              f"{host or 'NAME'} to answer that name", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in config.allowed_origins and "*" not in config.allowed_origins:
            raise OpenAIError(403, f"requests from the web origin '{origin}' are refused; start the server with "
                              f"--allowed-origins {origin} to take them", code="origin_not_allowed")
        # A CORS preflight carries no credentials: CORSMiddleware answers it for the allowed origins.
        guarded = path.startswith("/v1/") or path == "/metrics" and config.metrics_key_required
        if guarded and method != "OPTIONS":
            _check_key(headers.get("authorization", ""), config.api_key)
        if path in JSON_ROUTES and method == "POST":
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                raise OpenAIError(415, f"the request body must be JSON with 'Content-Type: application/json' (got "
                                  f"{media or 'no content type'!r})", code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
                raise OpenAIError(413, f"the request body is over {config.max_body_bytes} bytes",
                                  code="body_too_large")


def _host_name(header: str) -> str:
    """The name in a Host header, without its port ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


def _check_key(header: str, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell how much of a wrong key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise OpenAIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for piece in request.stream():  # a chunked body has no content-length to check up front
        body += piece
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is over {limit} bytes", code="body_too_large")
    return bytes(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: also an integer of over 4300 digits
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _prepare(runtime: Runtime, parsed: ParsedRequest, max_chars: int | None):
    """Prompt ids and settled parameters, or a 400 naming the body field at fault."""
    _check_length(runtime, parsed, max_chars)
    try:
        if parsed.messages is not None:
            if runtime.tokenizer is None or not runtime.tokenizer.chat_template:
                raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages",
                                  code="unsupported_endpoint")
            prompt: Any = runtime.tokenizer.apply_chat_template(parsed.messages)
        else:
            prompt = parsed.prompt
        return runtime.request(prompt, False, dict(parsed.params))
    except GenerationError as exc:
        raise refused(exc, parsed.messages is not None) from None


def _check_length(runtime: Runtime, parsed: ParsedRequest, max_chars: int | None) -> None:
    """Refuse a prompt that cannot fit the models' positions before the tokenizer reads it."""
    positions = runtime.max_positions
    if parsed.messages is not None:
        if len(parsed.messages) > positions:
            raise bad("messages", f"{len(parsed.messages)} messages cannot fit the model's {positions} positions")
        chars, param = sum(len(m["content"]) for m in parsed.messages), "messages"
    else:
        chars, param = (len(parsed.prompt) if isinstance(parsed.prompt, str) else 0), "prompt"
    if max_chars is not None and chars > max_chars:
        raise bad(param, f"{chars} characters cannot fit the model's {positions} positions (at most {max_chars} "
                  "characters); shorten the prompt")


def _result_or_error(handle):
    try:
        return handle.result()
    except GenerationError as exc:
        raise refused(exc) from None
    except Exception as exc:  # an engine fault: the server's, not the request's
        raise OpenAIError(500, f"generation failed: {exc}", code="engine_error") from None


def _usage(turn: Turn, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": turn.prompt_tokens + completion_tokens}


def _apd_report(turn: Turn, result) -> dict[str, Any]:
    """The APD parameters the request ran with (echoed, defaults included) and what decoding did."""
    return {**{p.field: getattr(turn.params, p.name) for p in PARAMS if p.group in ("apd", "decoding") and p.field},
            "steps": result.steps, "mean_tokens_per_step": len(result.token_ids) / result.steps if result.steps else 0.0,
            "dllm_forwards": result.dllm_forwards, "verifier_forwards": result.verifier_forwards}


def _model_card(name: str, runtime: Runtime) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(runtime.bundle.stat().st_mtime), "owned_by": "apd-deploy",
            "max_model_len": runtime.max_positions}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
