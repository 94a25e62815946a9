"""`--server URL`: the conversation goes to an OpenAI-compatible server instead of a local model.

`RemoteEngine` has the engine's interface (`load`, `generate` yielding `Status`, `TextDelta`,
`ThinkingDelta`, `Finished`), so `describe`, `chat`, the renderers, `--json`/`--jsonl` and the
exit codes work unchanged. It speaks plain HTTP through the standard library (no extra
dependency) to `ernie serve`, vLLM, SGLang or FastDeploy:

- media travel inside the request as `data:` URLs: pictures as `image_url` parts, videos as
  `video_url` parts holding the file's own bytes, so the server samples the frames and draws the
  timestamps itself, as its model expects (see docs/serving.md);
- the answer streams as server-sent events; reasoning arrives in `reasoning_content` (vLLM before
  0.10 and `ernie serve`) or `reasoning` (later vLLM); usage comes in the last chunk;
- an HTTP error becomes one `error:` line carrying the server's own message.

Torch-free: `ernie describe --server ...` never imports torch.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from ernie_cli.engine import Status, _END, _Failure, ctrl_c_cancels
from ernie_cli.media import env_number, sniff
from ernie_cli.openai_api import request_body
from ernie_cli.settings import DEFAULT_MODEL, GenerationSettings, LoadOptions, MediaOptions, Message
from model.errors import ErnieError

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff",
        ".webp": "image/webp", ".mp4": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
        ".avi": "video/x-msvideo", ".mpg": "video/mpeg", ".flv": "video/x-flv", ".ts": "video/mp2t"}
FINISH = {"stop": "stop", "length": "length", "abort": "interrupted"}
HINTS = {400: "the server refused the request as sent; its message says why",
         401: "pass the server's key with --api-key or ERNIE_API_KEY",
         404: "check --model against the names the server lists at GET /v1/models",
         413: "the server refused the request's size: send fewer or smaller pictures and videos",
         503: "the server is busy; retry in a moment"}


class RemoteError(ErnieError):
    """The server could not be reached, refused the request, or answered something unreadable."""


def api_base(url: str) -> str:
    """`http://host:8000`, `.../v1` or `.../v1/` -> `http://host:8000/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--server must be an http(s) URL, found {url!r}", hint="e.g. --server http://127.0.0.1:8000")
    return url if url.endswith("/v1") else url + "/v1"


def timeout_s() -> float:
    """$ERNIE_SERVER_TIMEOUT: the seconds any one read from the server may wait (default 600)."""
    return env_number("ERNIE_SERVER_TIMEOUT", 600)


MODELS_TIMEOUT_S = 30  # the model lookup waits at most this long (less when $ERNIE_SERVER_TIMEOUT is lower)


class RemoteEngine:
    def __init__(self) -> None:
        self.name = ""
        self.base = ""
        self.api_key: str | None = None
        self.load_s = 0.0
        self.timeout = 600.0

    # --- loading: find the server and its model -----------------------------------------------------
    def load(self, options: LoadOptions, media: MediaOptions) -> None:
        start = time.perf_counter()
        self.base, self.api_key = api_base(options.server), options.api_key
        self.timeout = timeout_s()  # a bad $ERNIE_SERVER_TIMEOUT stops here, before any request
        if options.model != DEFAULT_MODEL:
            self.name = options.model  # the user named the server's model: trust it, the server checks
        else:
            self.name = self._served_model()
        self.load_s = time.perf_counter() - start

    def _served_model(self) -> str:
        with self._open("GET", "/models", None, timeout=min(MODELS_TIMEOUT_S, self.timeout)) as response:
            listing = _read_json(response, self.base)
        names = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not names:
            raise RemoteError(f"{self.base}/models lists no model", hint="name one with --model")
        return names[0]

    # --- generation ---------------------------------------------------------------------------------
    def generate(self, conversation: list[Message], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> Iterator[Any]:
        """Stream the answer's events; Ctrl-C (or `cancel`) closes the connection and ends in `interrupted`."""
        cancel = cancel or threading.Event()
        events: queue.Queue = queue.Queue()
        state: dict[str, Any] = {}
        worker = threading.Thread(target=self._worker, args=(conversation, settings, cancel, events, state),
                                  daemon=True)
        with ctrl_c_cancels(cancel):
            worker.start()
            yield from _drain(events, cancel, state)
            worker.join()

    def _worker(self, conversation, settings, cancel, events: queue.Queue, state: dict) -> None:
        try:
            for event in self._generate(conversation, settings, cancel, state):
                events.put(event)
        except BaseException as e:  # handed to the calling thread, which re-raises it
            events.put(_Failure(e))
        events.put(_END)

    def _generate(self, conversation, settings: GenerationSettings, cancel, state: dict) -> Iterator[Any]:
        from processing.events import Finished

        if settings.thinking_budget is not None:
            raise RemoteError("--thinking-budget works only with a local model; OpenAI's API has no such field",
                              hint="drop --thinking-budget, or limit the whole answer with --max-new-tokens")
        yield Status("Sending…")
        start = time.perf_counter()
        body = request_body(self.name, wire_messages(conversation), settings)
        encode_s = time.perf_counter() - start
        reader = _StreamReader(cancel)
        with self._open("POST", "/chat/completions", body, timeout=self.timeout) as response:
            state["response"] = response
            if response.headers.get_content_type() == "application/json":  # a server that ignored stream: true
                yield from reader.feed(_read_json(response, self.base), self.base)
            else:
                yield from reader.read(response, self.base)
        reason = "interrupted" if cancel.is_set() and reader.reason is None else FINISH.get(reader.reason, reader.reason)
        extra = {"model": reader.model or self.name, "server": self.base, "load_s": self.load_s,
                 "preprocess_s": encode_s, "media": media_rows(conversation)}
        thinking = "".join(reader.thinking) if reader.thinking or settings.think else None
        yield Finished(reason or "stop", reader.stats(start), "".join(reader.text), thinking, extra)

    # --- HTTP ---------------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None, timeout: float):
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "ernie-cli"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise _http_error(e, self.base) from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise RemoteError(f"cannot reach {self.base}: {reason}",
                              hint="is the server running? check --server or ERNIE_SERVER") from None


class _StreamReader:
    """Server-sent events -> TextDelta / ThinkingDelta, collecting text, reasoning, usage and reason."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.reason: str | None = None
        self.usage: dict | None = None
        self.model: str | None = None
        self.first: float | None = None

    def read(self, response, base: str) -> Iterator[Any]:
        for payload in _sse_payloads(response, self.cancel, base):
            if payload == "[DONE]":
                return
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                raise RemoteError(f"{base} sent an event that is not JSON: {payload[:80]!r}") from None
            yield from self.feed(chunk, base)

    def feed(self, chunk: Any, base: str) -> Iterator[Any]:
        from processing.events import TextDelta, ThinkingDelta

        if not isinstance(chunk, dict):
            raise RemoteError(f"{base} sent an event that is not a JSON object: {str(chunk)[:80]!r}")
        if chunk.get("error") or chunk.get("object") == "error":
            raise RemoteError(f"{base} failed mid-answer: {_message(chunk)}")
        self.model = chunk.get("model") or self.model
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or choice.get("message") or {}  # a chunk, or a whole completion
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.first = self.first or time.perf_counter()
                self.thinking.append(reasoning)
                yield ThinkingDelta(reasoning)
            if delta.get("content"):
                self.first = self.first or time.perf_counter()
                self.text.append(delta["content"])
                yield TextDelta(delta["content"])
            self.reason = choice.get("finish_reason") or self.reason

    def stats(self, start: float):
        from model.generation.stats import GenerationStats

        if not self.usage:
            return None
        now = time.perf_counter()
        prompt, completion = self.usage.get("prompt_tokens"), self.usage.get("completion_tokens")
        ttft = (self.first or now) - start
        decode_s = now - self.first if self.first else 0.0
        return GenerationStats(
            prompt_tokens=prompt, completion_tokens=completion, time_to_first_token_s=ttft,
            prefill_tokens_per_s=prompt / ttft if prompt and ttft > 0 else 0.0,
            decode_tokens_per_s=(completion - 1) / decode_s if completion and completion > 1 and decode_s else 0.0,
            peak_memory_bytes=0, total_time_s=now - start)


def _sse_payloads(response, cancel: threading.Event, base: str) -> Iterator[str]:
    """The `data:` payloads of an event stream (multi-line data joined); comments and other fields skipped."""
    data: list[str] = []
    while not cancel.is_set():
        try:
            raw = response.readline()
        except (OSError, ValueError, AttributeError):
            if cancel.is_set():  # the connection was closed under us to interrupt
                return
            raise RemoteError(f"the connection to {base} broke mid-answer") from None
        if not raw:
            if data:
                yield "\n".join(data)
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def _drain(events: queue.Queue, cancel: threading.Event, state: dict) -> Iterator[Any]:
    """Yield the worker's events; on cancel, close the connection so a blocked read returns at once."""
    closed = False
    while True:
        try:
            event = events.get(timeout=0.05)
        except queue.Empty:
            event = None
        except KeyboardInterrupt:
            if cancel.is_set():
                raise
            cancel.set()
            continue
        if cancel.is_set() and not closed and state.get("response") is not None:
            closed = True
            _close_quietly(state["response"])
        if event is None:
            continue
        if event is _END:
            return
        if isinstance(event, _Failure):
            raise event.error
        yield event


def _close_quietly(response) -> None:
    try:
        response.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
    except (AttributeError, OSError):
        pass
    try:
        response.close()
    except Exception:  # closing while another thread reads may raise anything; the reader handles it
        pass


# --- messages on the wire ------------------------------------------------------------------------------

def wire_messages(conversation: list[Message]) -> list[dict]:
    """Our messages in OpenAI's chat format; media inlined as data: URLs."""
    out = []
    for m in conversation:
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m.text}
            if m.thinking:
                msg["reasoning_content"] = m.thinking
            out.append(msg)
        elif not m.media:
            out.append({"role": m.role, "content": m.text})
        else:
            out.append({"role": m.role, "content": [_wire_part(p) for p in m.parts if p.kind != "text" or p.value]})
    return out


def _wire_part(part) -> dict:
    if part.kind == "text":
        return {"type": "text", "text": part.value}
    kind = f"{part.kind}_url"
    return {"type": kind, kind: {"url": data_url(Path(part.value))}}


def data_url(path: Path) -> str:
    data = path.read_bytes()
    found = sniff(data[:512])
    mime = MIME.get(found[1] if found else path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def media_rows(conversation: list[Message]) -> list[dict]:
    """The --json `media` rows: kind and path; grids and token counts are the server's business."""
    return [{"kind": p.kind, "path": p.ref, "grid": None, "tokens": None}
            for m in conversation if m.role == "user" for p in m.media]


# --- errors -------------------------------------------------------------------------------------------

def _read_json(response, base: str) -> dict:
    raw = response.read()
    try:
        out = json.loads(raw)
    except json.JSONDecodeError:
        raise RemoteError(f"{base} answered something that is not JSON: {raw[:80]!r}") from None
    if not isinstance(out, dict):
        raise RemoteError(f"{base} answered JSON that is not an object: {raw[:80]!r}")
    return out


def _message(body: Any) -> str:
    """The message of OpenAI's {"error": {"message"}}, vLLM's older {"object": "error", "message"}, or FastAPI's detail."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key]) if not isinstance(body[key], (dict, list)) else json.dumps(body[key])[:300]
    return str(body)[:300]


def _http_error(error: urllib.error.HTTPError, base: str) -> RemoteError:
    raw = error.read() or b""
    try:
        message = _message(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError):
        message = raw.decode("utf-8", errors="replace").strip()[:300] or error.reason
    message = " ".join(str(message).split())
    own = re.fullmatch(r"(.*) \(hint: (.*)\)", message)  # ernie serve's "message (hint: ...)"
    if own:
        return RemoteError(f"{base} answered {error.code}: {own[1]}", hint=own[2])
    return RemoteError(f"{base} answered {error.code}: {message}", hint=HINTS.get(error.code))
