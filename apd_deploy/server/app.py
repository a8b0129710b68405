"""The OpenAI-compatible HTTP API (FastAPI) over one loaded bundle and its batched scheduler.

Requests are decoded by the scheduler's threads; each request's chunks reach the event loop
through `call_soon_threadsafe`, so no thread waits per request and a slow client holds nothing
but its slot. A client that goes away (mid-stream, or before a non-streamed answer) cancels its
request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from apd_deploy.errors import GenerationError
from apd_deploy.runtime import QueueFull, Runtime, Scheduler, SchedulerClosed
from apd_deploy.runtime.params import GenerationParams
from apd_deploy.server.metrics import Metrics
from apd_deploy.server.protocol import APD_FIELDS, OpenAIError, ParsedRequest, parse_chat, parse_completion
from apd_deploy.server.stops import StopText

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    retry_after_seconds: int = 1

    @classmethod
    def for_runtime(cls, runtime: Runtime, model_name: str | None, api_key: str | None, max_body_bytes: int,
                    max_tokens: int | None) -> ServerConfig:
        """The settings of `apd-deploy serve`: the model named after the bundle's folder unless
        given, max_tokens capped at what the models' positions hold."""
        limit = min(max_tokens or runtime.max_positions - 1, runtime.max_positions - 1)
        return cls(model_name or runtime.bundle.resolve().name, api_key, max_body_bytes, limit)


@dataclass
class Turn:
    """What one request needs while it is answered."""

    parsed: ParsedRequest
    params: GenerationParams  # as settled: the bundle's defaults where the body gave none
    prompt_tokens: int
    kind: str  # 'completion' or 'chat'
    id: str
    created: int


def create_app(runtime: Runtime, scheduler: Scheduler, config: ServerConfig,
               render_metrics: Callable[[], Awaitable[bytes]] | None = None) -> FastAPI:
    """The app over `scheduler`. render_metrics: what /metrics answers (a replica shows every
    replica's); by default this app's own metrics (`app.state.metrics`)."""
    app = FastAPI(title="apd-deploy", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = app.state.metrics = Metrics(lambda: scheduler.queued, lambda: scheduler.active)
    scheduler.on_iteration = metrics.iteration
    app.state.draining = False

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(OpenAIError(exc.status_code, message, code="not_found").body(), status_code=exc.status_code)

    app.add_middleware(Guard, config=config, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "model": config.model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        page = await render_metrics() if render_metrics else generate_latest(metrics.registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config.model_name, runtime)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        if name != config.model_name:
            raise OpenAIError(404, f"model '{name}' does not exist; this server serves '{config.model_name}'",
                              param="model", code="model_not_found")
        return _model_card(config.model_name, runtime)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, "chat")

    async def _answer(request: Request, kind: str):
        body = await _read_json(request, config.max_body_bytes)
        parse = parse_chat if kind == "chat" else parse_completion
        parsed = parse(body, config.max_tokens_limit)
        if parsed.model is not None and parsed.model != config.model_name:
            raise OpenAIError(404, f"model '{parsed.model}' does not exist; this server serves '{config.model_name}'",
                              param="model", code="model_not_found")
        ids, params = _prepare(runtime, parsed)
        turn = Turn(parsed, params, len(ids), kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                    int(time.time()))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        # A whole answer without stop strings needs no text per step, nor a wake-up of the loop per step.
        chunked = parsed.stream or bool(parsed.stops)

        def on_event(event) -> None:
            if chunked or event is None:
                loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = scheduler.submit_prepared(ids, params, chunk_text=chunked, on_event=on_event)
        except QueueFull as exc:
            raise OpenAIError(429, str(exc), code="queue_full",
                              headers={"Retry-After": str(config.retry_after_seconds)}) from None
        except SchedulerClosed as exc:
            raise OpenAIError(503, str(exc), code="shutting_down",
                              headers={"Retry-After": str(config.retry_after_seconds)}) from None
        if parsed.stream:
            return StreamingResponse(_stream(turn, handle, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _whole(request, turn, handle, events))

    async def _whole(request: Request, turn: Turn, handle, events: asyncio.Queue) -> dict[str, Any]:
        stops, text = StopText(turn.parsed.stops), []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        metrics.cancelled.inc()
                        raise OpenAIError(499, "the client closed the request") from None
                    continue
                if event is None:
                    break
                text.append(stops.push(event.text or ""))
                if stops.stopped:
                    handle.cancel()
        except asyncio.CancelledError:  # the client went away and the host cancels the call (Ray Serve does)
            handle.cancel()
            metrics.cancelled.inc()
            raise
        result = _result_or_error(handle)
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
                "created": turn.created, "model": config.model_name, "choices": [choice],
                "usage": _usage(turn, result), "apd": _apd_report(turn, result)}

    async def _stream(turn: Turn, handle, events: asyncio.Queue) -> AsyncIterator[str]:
        stops = StopText(turn.parsed.stops)
        obj = "chat.completion.chunk" if turn.kind == "chat" else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
            if turn.kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": turn.id, "object": obj, "created": turn.created, "model": config.model_name,
                         "choices": [choice]})

        try:
            if turn.kind == "chat":
                yield chunk(None, role=True)
            while (event := await events.get()) is not None:
                piece = stops.push(event.text or "")
                if piece:
                    yield chunk(piece)
                if stops.stopped:
                    handle.cancel()
            try:
                result = _result_or_error(handle)
            except OpenAIError as exc:  # the status line is sent already: the error goes in the stream
                yield _sse(exc.body())
                yield "data: [DONE]\n\n"
                return
            if not stops.stopped and (rest := stops.flush()):
                yield chunk(rest)
            metrics.finished(result, turn.prompt_tokens)
            yield chunk(None, "stop" if stops.stopped else result.finish_reason)
            if turn.parsed.include_usage:
                yield _sse({"id": turn.id, "object": obj, "created": turn.created, "model": config.model_name,
                            "choices": [], "usage": _usage(turn, result), "apd": _apd_report(turn, result)})
            yield "data: [DONE]\n\n"
        finally:  # the answer is complete, or the client went away (the task is cancelled)
            if not handle.done:
                metrics.cancelled.inc()
            handle.cancel()

    return app


ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class Guard:
    """The API key and the body limit for /v1 routes, and the request counter for every route: a
    plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

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
            if path.startswith("/v1/"):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                _check_key(headers.get("authorization", ""), self.config.api_key)
                length = headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
                    raise OpenAIError(413, f"the request body is over {self.config.max_body_bytes} bytes",
                                      code="body_too_large")
        except OpenAIError as exc:
            await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, counted)
        else:
            try:
                await self.app(scope, receive, counted)
            except asyncio.CancelledError:  # the client went away and the host cancels the call (Ray Serve does)
                status[0] = status[0] or 499
                raise
        finally:
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status[0] or 500)).inc()


def _check_key(header: str, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell how much of a wrong key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise OpenAIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: Request, limit: int) -> Any:
    body = b""
    async for piece in request.stream():  # a chunked body has no content-length to check up front
        body += piece
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is over {limit} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _prepare(runtime: Runtime, parsed: ParsedRequest):
    """Prompt ids and settled parameters, or a 400 naming the field (the runtime's message names
    its command-line flag, which maps back to the body field)."""
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
        message = str(exc)
        param = next((field for field, flag in FLAG_FIELDS.items() if flag in message), None)
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


# The runtime's messages name the command-line flag; the body field it came from.
FLAG_FIELDS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
               "top_k": "--top-k", "seed": "--seed", "alg": "--alg", "apd_mixture_weight": "--apd-mixture-weight",
               "kv_window": "--kv-window", "max_lookahead": "--max-lookahead", "tokens_per_step": "--tokens-per-step",
               "prompt": "prompt"}


def _result_or_error(handle):
    try:
        return handle.result()
    except GenerationError as exc:
        raise OpenAIError(400, str(exc)) from None
    except Exception as exc:  # an engine fault: the server's, not the request's
        raise OpenAIError(500, f"generation failed: {exc}", code="engine_error") from None


def _usage(turn: Turn, result) -> dict[str, int]:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": turn.prompt_tokens + len(result.token_ids)}


def _apd_report(turn: Turn, result) -> dict[str, Any]:
    """The APD parameters the request ran with (echoed, defaults included) and what decoding did."""
    return {**{name: getattr(turn.params, key) for name, key in APD_FIELDS.items()},
            "steps": result.steps, "mean_tokens_per_step": len(result.token_ids) / result.steps if result.steps else 0.0,
            "dllm_forwards": result.dllm_forwards, "verifier_forwards": result.verifier_forwards}


def _model_card(name: str, runtime: Runtime) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(runtime.bundle.stat().st_mtime), "owned_by": "apd-deploy",
            "max_model_len": runtime.max_positions}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
