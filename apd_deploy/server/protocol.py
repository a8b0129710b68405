"""OpenAI's request bodies, checked field by field, and its error shape.

A body becomes a `ParsedRequest`: the prompt (text, token ids or chat messages), the runtime's
generation parameters, and what the response needs (stream, stop strings, usage in the stream).
Every field OpenAI defines that this server does not implement is refused with a 400 naming it,
unless it is given at its no-op value (n=1, echo=false, logprobs null, penalties 0): a client
must never get silently different behaviour. APD's own parameters are extra body fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apd_deploy.errors import GenerationError
from apd_deploy.runtime.params import PARAMS, called

# Body field -> the generation parameter it sets, checked as the table declares it.
BODY_PARAMS = {p.field: p for p in PARAMS if p.field is not None}
# Fields accepted only at the value that changes nothing.
NO_OP_FIELDS = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": None, "suffix": None, "parallel_tool_calls": None,
                "tools": None, "tool_choice": None, "functions": None, "function_call": None}
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}  # bookkeeping, no effect on the output
MAX_STOPS = 4


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = error_type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


def field_of(keyword: str) -> str:
    """What a request body calls a parameter (its keyword where it is no generation parameter)."""
    return called(keyword, "field")


def refused(exc: GenerationError, chat: bool = False) -> OpenAIError:
    """A 400 naming the body field of the parameter at fault (a chat's prompt is its messages)."""
    def name_of(keyword: str) -> str:
        return "messages" if chat and keyword == "prompt" else field_of(keyword)

    return OpenAIError(400, exc.in_terms_of(name_of), param=exc.param and name_of(exc.param), code="invalid_value")


@dataclass
class ParsedRequest:
    model: str | None
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat
    params: dict[str, Any] = field(default_factory=dict)  # for Runtime.request
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # usage in every chunk (vLLM's stream_options.continuous_usage_stats)
    stops: list[str] = field(default_factory=list)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(param: str, value: Any) -> bool:
    """Whether `value` is a string; a lone surrogate (JSON lets one through as \\ud800) is refused:
    no tokenizer or UTF-8 response can carry it."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(param, f"has a lone surrogate (\\u{ord(value[exc.start]):04x}) at character {exc.start}; "
                  "send valid UTF-16 pairs") from None
    return True


def _common(body: dict[str, Any], known: set[str], max_tokens_limit: int) -> ParsedRequest:
    unknown = sorted(set(body) - known - set(BODY_PARAMS) - set(NO_OP_FIELDS) - IGNORED_FIELDS
                     - {"model", "stream", "stream_options", "stop", "response_format"})
    if unknown:
        raise bad(unknown[0], f"unknown or unsupported field '{unknown[0]}'", "unsupported_parameter")
    for name, no_op in NO_OP_FIELDS.items():
        if name in body and body[name] != no_op and not (no_op is None and body[name] in ([], {})):
            raise bad(name, f"'{name}' is not supported by this server (only {no_op!r})", "unsupported_parameter")
    model = body.get("model")
    if model is not None and not _text("model", model):
        raise bad("model", "must be a string")
    parsed = ParsedRequest(model)
    limits = {"max_tokens": max_tokens_limit}  # this server's; the others are the table's
    for name, param in BODY_PARAMS.items():
        if body.get(name) is not None:
            try:
                param.check(body[name], limits.get(name))
            except GenerationError as exc:
                raise refused(exc) from None
            parsed.params[param.name] = body[name]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    parsed.stream = stream
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options", "is only allowed with stream: true")
        flags = ("include_usage", "continuous_usage_stats")
        if not isinstance(options, dict) or set(options) - set(flags) or not all(isinstance(options.get(f, False), bool)
                                                                                  for f in flags):
            raise bad("stream_options", "only {\"include_usage\": true|false, \"continuous_usage_stats\": true|false} "
                      "is supported")
        parsed.include_usage = options.get("include_usage", False)
        parsed.continuous_usage = options.get("continuous_usage_stats", False)
    response_format = body.get("response_format")
    if response_format not in (None, {}, {"type": "text"}):
        raise bad("response_format", "only {\"type\": \"text\"} is supported by this server", "unsupported_parameter")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(_text("stop", s) and s for s in stops) or len(stops) > MAX_STOPS:
            raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOPS} of them")
        parsed.stops = stops
    return parsed


def parse_completion(body: Any, max_tokens_limit: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    parsed = _common(body, {"prompt"}, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if _text("prompt", prompt):
        if not prompt:
            raise bad("prompt", "is empty")
        parsed.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        parsed.prompt = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "several prompts in one request are not supported; send one request per prompt",
                  "unsupported_parameter")
    else:
        raise bad("prompt", "must be a non-empty string or a list of token ids", "missing_required_parameter"
                  if prompt is None else "invalid_value")
    return parsed


def parse_chat(body: Any, max_tokens_limit: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    if "max_completion_tokens" in body:  # the newer name of max_tokens
        if "max_tokens" in body:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
        del body["max_completion_tokens"]
    parsed = _common(body, {"messages"}, max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects",
                  "missing_required_parameter" if messages is None else "invalid_value")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", "must be 'system', 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and _text(f"messages[{i}].content", p.get("text"))
                       for p in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not _text(f"messages[{i}].content", content):
            raise bad(f"messages[{i}].content", "must be a string")
        checked.append({"role": message["role"], "content": content})
    parsed.messages = checked
    return parsed
