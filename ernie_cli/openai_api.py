"""OpenAI's chat-completions wire format, both ways: request JSON -> domain objects, events -> JSON.

Pure and torch-free: `ernie serve` (the server) and `--server` (the client) both speak through it,
and its tests need neither a model nor a socket.

Requests follow OpenAI's chat format plus the extensions vLLM accepts for ERNIE-4.5-VL: content
parts `video_url`, sampling fields `top_k`, `min_p`, `repetition_penalty`, and
`chat_template_kwargs: {"enable_thinking": ...}`; the reasoning comes back in `reasoning_content`.
Fields we cannot honour (n > 1, tools, logprobs, a JSON response format) are refused with a 400,
never silently ignored. Unknown fields are ignored, as OpenAI clients send many optional ones.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ernie_cli.settings import GenerationSettings, Message, Part

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16


class ApiError(Exception):
    """An error in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class MediaRef:
    """A media part as the request gave it: kind and URL (http(s) or data:), resolved later."""

    kind: str  # "image" | "video"
    url: str


@dataclass
class ChatRequest:
    """A validated request. Media parts in `messages` hold `MediaRef`s until the server resolves them."""

    model: str | None
    messages: list[Message]
    media: list[tuple[Part, MediaRef]]
    settings: GenerationSettings
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


# --- request -> domain objects -----------------------------------------------------------------------

def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; ApiError(400) names the first problem and its field."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, found {_kind(body)}")
    _refuse_unsupported(body)
    model = _optional(body, "model", str)
    messages, media = _messages(body.get("messages"))
    stream = bool(_optional(body, "stream", bool) or False)
    options = _optional(body, "stream_options", dict)
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool(options and _optional(options, "include_usage", bool, "stream_options.include_usage"))
    return ChatRequest(model, messages, media, _settings(body), stream, include_usage)


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad(f"n must be 1 (one answer per request), found {n!r}", "n")
    if body.get("tools"):
        raise bad("tools are not supported by this server", "tools")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format other than {\"type\": \"text\"} is not supported", "response_format")


def _messages(raw: Any) -> tuple[list[Message], list[tuple[Part, MediaRef]]]:
    if not isinstance(raw, list) or not raw:
        raise bad(f"messages must be a non-empty array, found {_kind(raw)}", "messages")
    messages, media = [], []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object with role and content, found {_kind(item)}", where)
        role = item.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {sorted(ROLES)}, found {role!r}", f"{where}.role")
        if item.get("content") is None and ROLES[role] != "assistant":  # only an assistant turn may be empty
            raise bad(f"{where}.content must be a string or an array of content parts, found "
                      f"{_kind(item.get('content'))}", f"{where}.content")
        parts = _content(item.get("content"), f"{where}.content", media, allow_media=ROLES[role] == "user")
        thinking = item.get("reasoning_content", item.get("reasoning"))
        if thinking is not None and not isinstance(thinking, str):
            raise bad(f"{where}.reasoning_content must be a string, found {_kind(thinking)}", f"{where}.reasoning_content")
        messages.append(Message(ROLES[role], parts, thinking if ROLES[role] == "assistant" and thinking else None))
    if messages[-1].role == "assistant":
        raise bad("the last message must not be the assistant's (nothing to answer)", f"messages[{len(raw) - 1}].role")
    return messages, media


def _content(raw: Any, where: str, media: list, allow_media: bool) -> list[Part]:
    if isinstance(raw, str):
        return [Part("text", raw)]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad(f"{where} must be a string or an array of content parts, found {_kind(raw)}", where)
    parts = []
    for j, item in enumerate(raw):
        here = f"{where}[{j}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise bad(f"{here}.text must be a string, found {_kind(item.get('text'))}", f"{here}.text")
            parts.append(Part("text", item["text"]))
        elif kind in ("image_url", "video_url"):
            if not allow_media:
                raise bad(f"{here}: only user messages may carry images or videos", here)
            ref = MediaRef(kind[:-4], _url(item.get(kind), f"{here}.{kind}"))
            part = Part(ref.kind, "", media_label(ref.url))
            parts.append(part)
            media.append((part, ref))
        else:
            raise bad(f"{here}.type must be text, image_url or video_url, found {kind!r}", f"{here}.type")
    return parts


def media_label(url: str) -> str:
    """How a media URL is named in results and errors: itself, or `data:MIME` for inline data."""
    return url.split(";", 1)[0].split(",", 1)[0] if url.startswith("data:") else url


def _url(raw: Any, where: str) -> str:
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str) or not url:
        raise bad(f"{where} must be {{\"url\": \"...\"}} with an http(s) or data: URL", where)
    if not url.startswith(("http://", "https://", "data:")):
        raise bad(f"{where}.url must be an http(s) or data: URL, found {url[:40]!r}", where)
    return url


def _settings(body: dict) -> GenerationSettings:
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    top_k = _optional(body, "top_k", int)
    kwargs = _chat_template_kwargs(body)
    return GenerationSettings(
        max_new_tokens=_at_least(max_tokens, 1, "max_tokens"),
        temperature=_between(_optional(body, "temperature", float), 0.0, 2.0, "temperature"),
        top_p=_between(_optional(body, "top_p", float), 0.0, 1.0, "top_p", open_low=True),
        top_k=None if top_k is None or top_k in (-1, 0) else _at_least(top_k, 1, "top_k"),
        min_p=_between(_optional(body, "min_p", float), 0.0, 1.0, "min_p"),
        repetition_penalty=_between(_optional(body, "repetition_penalty", float), 0.0, 10.0, "repetition_penalty",
                                    open_low=True),
        seed=_optional(body, "seed", int),
        stop=_stops(body.get("stop")),
        think=kwargs.get("enable_thinking"),
    )


def _chat_template_kwargs(body: dict) -> dict:
    kwargs = _optional(body, "chat_template_kwargs", dict) or {}
    think = kwargs.get("enable_thinking")
    if think is not None and not isinstance(think, bool):
        raise bad(f"chat_template_kwargs.enable_thinking must be true or false, found {think!r}",
                  "chat_template_kwargs.enable_thinking")
    return kwargs


def _stops(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"stop must be a non-empty string or an array of at most {MAX_STOPS} of them, found {raw!r}", "stop")
    return tuple(stops)


def _optional(obj: dict, name: str, kind: type, param: str | None = None):
    value = obj.get(name)
    if value is None:
        return None
    ok = {bool: isinstance(value, bool), int: _is_int(value), dict: isinstance(value, dict), str: isinstance(value, str),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        names = {bool: "a boolean", int: "an integer", float: "a number", dict: "an object", str: "a string"}
        raise bad(f"{param or name} must be {names[kind]}, found {_kind(value)} {value!r:.40}", param or name)
    return float(value) if kind is float else int(value) if kind is int else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _at_least(value, low: int, name: str):
    if value is not None and value < low:
        raise bad(f"{name} must be at least {low}, found {value}", name)
    return None if value is None else int(value)


def _between(value, low: float, high: float, name: str, open_low: bool = False):
    if value is None:
        return None
    if value > high or value < low or (open_low and value == low):
        raise bad(f"{name} must be in {'(' if open_low else '['}{low}, {high}], found {value}", name)
    return value


def _kind(value: Any) -> str:
    if isinstance(value, list) and not value:
        return "an empty array"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- domain objects -> request (the --server client) -------------------------------------------------

def request_body(model: str, messages: list[dict], settings: GenerationSettings, stream: bool = True) -> dict:
    """The JSON a client sends for `messages` (already in wire form) under `settings`."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}
    body.update({wire: getattr(settings, ours) for ours, wire in names.items() if getattr(settings, ours) is not None})
    if settings.stop:
        body["stop"] = list(settings.stop)
    if settings.think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": settings.think}
    return body


# --- events -> response JSON (the server) ------------------------------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "interrupted": "abort"}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_json(request: ChatRequest, model: str, text: str, thinking: str | None, reason: str,
                    usage: dict[str, int]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "reasoning_content": thinking or None}
    return {"id": request.id, "object": "chat.completion", "created": request.created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(reason, reason)}],
            "usage": usage}


def chunk_json(request: ChatRequest, model: str, delta: dict[str, Any] | None, reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; delta None makes the usage-only chunk (empty choices)."""
    chunk: dict[str, Any] = {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
                             "model": model, "choices": []}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": FINISH_REASONS.get(reason, reason) if reason else None}]
    if request.include_usage:
        chunk["usage"] = usage
    return chunk


def models_json(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "ernie"}
                                       for n in names]}
