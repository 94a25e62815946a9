"""`ernie serve`: the loaded model behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

    POST /v1/chat/completions   chat, streamed as server-sent events or answered whole
    GET  /v1/models             the served model
    GET  /health                200 while the server runs (no key needed), with the queue's load

Requests are validated by `openai_api` (400 with the field named), media are resolved off the
event loop (http(s) downloads and data: URLs, checked as `ernie describe` checks files), then the
request joins the bounded queue of `ernie_cli.batch.BatchRunner` (503 when it is full), which
decodes concurrent requests together through the continuous-batching scheduler. A streamed
answer starts only once the prompt is built, so bad media or an over-long prompt still get their
400. A client that goes away cancels its request: queued, it is dropped; decoding, its row stops
at the next step.
SIGTERM (or Ctrl-C) stops accepting connections, lets answers in flight finish for `grace`
seconds, cancels the rest and exits 0 (130 after Ctrl-C).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ernie_cli.media import MediaResolver
from ernie_cli.openai_api import (ApiError, ChatRequest, chunk_json, completion_json, models_json, parse_chat_request,
                                  usage_json)
from model.errors import ErnieError, MediaError

GONE = object()  # the client disconnected
PREPARERS = 2  # prompts built at once (see Server._preparers)


def _out(request) -> bool:
    """Still generating: its Finished (set before it is sent) or its error has not come yet."""
    return request.finished is None and request.error is None and not request.done.is_set()


class QueueFull(Exception):
    """`max_queue` requests already wait for a row, or the server is shutting down."""


class Jobs:
    """The server's side of `ernie_cli.batch.BatchRunner` (issue 21's text side of the scheduler):
    a bound on waiting requests, events handed from the scheduling thread to the event loop, and
    cancellation of everything still out at shutdown."""

    def __init__(self, engine, max_batch: int, max_queue: int, batch_wait_s: float = 0.05):
        from ernie_cli.batch import BatchRunner

        # a request ready for the model waits at most batch_wait_s for requests still being received
        # or prepared, so that a burst shares one prefill (a lone request never waits)
        self.runner = BatchRunner(engine, max_batch, max_hold_s=batch_wait_s)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._active: set = set()  # TextRequests not yet finished
        self._lock = threading.Lock()
        self._closing = False

    def submit(self, prepared, emit, arriving: "_Arriving | None" = None):
        """Queue a prepared conversation; its events go to `emit`. QueueFull, or ContextLengthError.
        ``arriving``: its count of requests on their way, which drops as it joins the queue."""
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down")
            waiting = self.runner.scheduler.num_waiting
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (the queue holds {self.max_queue})")
            # the sink runs in the scheduling thread: it must not take self._lock (submit holds it
            # while the runner takes its own lock); None marks the end, which `done` tells as well
            request = self.runner.submit(prepared, sink=lambda event: event is not None and emit(event),
                                         arrived=arriving is not None)
            if arriving is not None:
                arriving.take()  # the queue dropped its count (not when submit raised)
            self._active = {r for r in self._active if _out(r)} | {request}
        return request

    @property
    def load(self) -> dict[str, int]:
        with self._lock:
            self._active = {r for r in self._active if _out(r)}
            waiting, out = self.runner.scheduler.num_waiting, len(self._active)
        return {"waiting": waiting, "running": max(out - waiting, 0), "arriving": self.runner.scheduler.num_expected}

    def stop(self) -> None:
        """Cancel every request still out (answers end as 'interrupted') and stop the runner."""
        with self._lock:
            self._closing = True
            out = [r for r in self._active if _out(r)]
        for request in out:  # also those the scheduler was admitting when the shutdown came
            request.cancel()
        self.runner.close()


class _Arriving:
    """One request counted as on its way to the scheduler (``BatchRunner.expect``) until ``done()``."""

    def __init__(self, runner):
        self._runner = runner
        self._counted = True
        runner.expect(1)

    def take(self) -> bool:
        """Whether it was still counted; from now on it is not (the queue takes it over)."""
        counted, self._counted = self._counted, False
        return counted

    def done(self) -> None:
        if self.take():
            self._runner.expect(-1)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_body_mb: float = 64.0
    grace_s: float = 10.0
    verbose: bool = False
    fetch_urls: bool = True  # fetch http(s) media URLs; off: only data: URLs are accepted
    batch_wait_s: float = 0.05  # see Jobs


def require_serve_extra() -> None:
    """A one-line error (not an ImportError) when the optional serve dependencies are missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ErnieError(f"`ernie serve` needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         "not installed", hint="pip install 'ernie-cli[serve]'")


# --- the app -----------------------------------------------------------------------------------------

class Server:
    """The routes, over one engine and its Jobs."""

    def __init__(self, engine, jobs: Jobs, options: ServeOptions, names: list[str]):
        self.engine, self.jobs, self.options, self.names = engine, jobs, options, names
        self.created = int(time.time())
        self._limiter = None  # made inside the event loop

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        handlers = {HTTPException: self._http_error, ApiError: self._api_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.names[0], **self.jobs.load})

    async def models(self, request):
        from starlette.responses import JSONResponse

        self._check_key(request)
        return JSONResponse(models_json(self.names, self.created))

    async def chat_completions(self, request):
        self._check_key(request)
        arriving = _Arriving(self.jobs.runner)  # on its way to the scheduler (see Jobs)
        try:
            return await self._answer(request, arriving)
        finally:
            arriving.done()

    async def _answer(self, request, arriving: "_Arriving"):
        chat = parse_chat_request(await self._json(request))
        if chat.model is not None and chat.model not in self.names:
            raise ApiError(404, f"the model {chat.model!r} does not exist; this server serves {self.names[0]!r}",
                           param="model", code="model_not_found")
        events: asyncio.Queue = asyncio.Queue()
        emit = _sink(asyncio.get_running_loop(), events, deltas=chat.stream)
        client = _Client()
        watcher = asyncio.ensure_future(_watch_disconnect(request, client, events))
        resolver, streaming = MediaResolver(decode_check=False), False  # the processor decodes at once
        try:
            start = time.perf_counter()
            prepared = await self._prepare(chat, resolver)  # media read, prompt built: 400s end here
            resolver.cleanup()
            prepare_s = time.perf_counter() - start
            client.request = self._submit(prepared, emit, arriving)
            if chat.stream:
                watcher.cancel()  # the streaming response listens for the disconnect itself
                streaming = True
                return self._stream(chat, client.request, events)
            return await self._whole(chat, events, prepare_s)
        finally:
            watcher.cancel()
            resolver.cleanup()
            if not streaming:
                client.cancel()

    # --- request pieces ---------------------------------------------------------------------------
    def _check_key(self, request) -> None:
        key = self.options.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            raise ApiError(401, "missing API key: send the header `Authorization: Bearer KEY`", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "wrong API key", code="invalid_api_key")

    async def _json(self, request) -> Any:
        limit = int(self.options.max_body_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    async def _prepare(self, chat: ChatRequest, resolver: MediaResolver):
        """Off the event loop (these threads run beside the decode loop): fetch media, build the prompt."""
        import anyio

        def work():
            resolve_media(chat, resolver, self.options.fetch_urls)
            return self.engine.prepare(chat.messages, chat.settings)

        try:
            return await anyio.to_thread.run_sync(work, limiter=self._preparers())
        except ErnieError as e:
            raise _as_api_error(e) from None

    def _preparers(self):
        """At most PREPARERS prompts are built at once: more threads would only fight the decode loop
        for the cores and the GIL (media decoding and patching are CPU-bound)."""
        import anyio

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(PREPARERS)
        return self._limiter

    def _submit(self, prepared, emit, arriving: _Arriving):
        try:
            return self.jobs.submit(prepared, emit, arriving)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", code="queue_full") from None
        except ErnieError as e:  # a prompt plus max_tokens over the context
            raise _as_api_error(e) from None

    async def _whole(self, chat: ChatRequest, events: asyncio.Queue, prepare_s: float):
        from processing.events import Finished
        from starlette.responses import JSONResponse

        started = time.perf_counter()
        while True:
            event = await events.get()
            _raise_if_failed(event)
            if isinstance(event, Finished):
                usage = _usage(event)
                body = completion_json(chat, self.names[0], event.text, event.thinking, event.reason, usage)
                # the model's share of the request (building the prompt; queue and decoding); the rest is HTTP's
                timing = f"prepare;dur={prepare_s * 1000:.2f}, engine;dur={(time.perf_counter() - started) * 1000:.2f}"
                return JSONResponse(body, headers={"Server-Timing": timing})

    def _stream(self, chat: ChatRequest, job, events: asyncio.Queue):
        from starlette.responses import StreamingResponse

        return StreamingResponse(self._sse(chat, job, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, chat: ChatRequest, job, events: asyncio.Queue):
        from processing.events import Finished, TextDelta, ThinkingDelta

        name = self.names[0]
        try:
            yield _sse(chunk_json(chat, name, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if isinstance(event, TextDelta):
                    yield _sse(chunk_json(chat, name, {"content": event.text}))
                elif isinstance(event, ThinkingDelta):
                    yield _sse(chunk_json(chat, name, {"reasoning_content": event.text}))
                elif isinstance(event, Finished):
                    yield _sse(chunk_json(chat, name, {}, reason=event.reason))
                    if chat.include_usage:
                        yield _sse(chunk_json(chat, name, None, usage=_usage(event)))
                    break
                elif isinstance(event, BaseException) or event is GONE:
                    error = _as_api_error(event) if event is not GONE else ApiError(499, "client went away")
                    yield _sse(error.to_json())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away, or the answer ended (then this does nothing)

    # --- errors -----------------------------------------------------------------------------------
    async def _api_error(self, request, error: ApiError):
        from starlette.responses import JSONResponse

        return JSONResponse(error.to_json(), status_code=error.status)

    async def _http_error(self, request, error):
        from starlette.responses import JSONResponse

        message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not "
                   f"allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        body = ApiError(error.status_code, message).to_json()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, deltas: bool = True):
    """An event-forwarding thread's way into this request's queue (a no-op once the loop has closed).
    ``deltas=False`` (an answer sent whole): the text and thinking deltas stay behind, since the
    Finished event carries the whole text; each forwarded event wakes the event loop."""
    from processing.events import TextDelta, ThinkingDelta

    def emit(event) -> None:
        if not deltas and isinstance(event, (TextDelta, ThinkingDelta)):
            return
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    return emit


class _Client:
    """A request's link to its generation, for whoever notices first that the client went away."""

    def __init__(self):
        self.request = None  # ernie_cli.batch.TextRequest, once submitted
        self.gone = False

    def cancel(self) -> None:
        self.gone = True
        if self.request is not None:
            self.request.cancel()


async def _watch_disconnect(request, client: _Client, events: asyncio.Queue) -> None:
    """Until cancelled: when the client disconnects, cancel its generation and wake whoever waits."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            client.cancel()
            events.put_nowait(GONE)
            return


def _raise_if_failed(event) -> None:
    if event is GONE:
        raise ApiError(499, "the client closed the connection")
    if isinstance(event, BaseException):
        raise _as_api_error(event)


def _as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, QueueFull):
        return ApiError(503, f"the server is busy: {error}", code="queue_full")
    if isinstance(error, ErnieError):
        hint = getattr(error, "hint", None)
        if hint:  # the API's name for the answer's length
            hint = hint.replace("max_new_tokens", "max_tokens")
        return ApiError(400, " ".join(str(error).split()) + (f" (hint: {hint})" if hint else ""))
    return ApiError(500, f"internal error: {type(error).__name__}: {error}")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size / 2**20:.3g} MB, over the limit of {limit / 2**20:.3g} MB",
                    code="request_too_large")


def _usage(done) -> dict[str, int]:
    s = done.stats
    return usage_json(s.prompt_tokens if s else 0, s.completion_tokens if s else 0)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- media ---------------------------------------------------------------------------------------------

def resolve_media(chat: ChatRequest, resolver: MediaResolver, fetch_urls: bool = True) -> None:
    """Fetch or decode every media URL into a checked local file; the parts then point at those files.

    The files live in the resolver's private temp dir until the prompt is built.
    """
    for part, ref in chat.media:
        if ref.url.startswith("data:"):
            found = resolver.resolve_bytes(data_url_bytes(ref.url), part.source)
        elif not fetch_urls:
            raise MediaError(f"this server does not fetch media URLs ({ref.url[:60]}); send the file inline as a "
                             "data: URL")
        else:
            found = resolver.resolve(ref.url)
        if found.kind != ref.kind:
            article = "an" if found.kind == "image" else "a"
            raise MediaError(f"{part.source} is {article} {found.kind} but was sent as {ref.kind}_url",
                             hint=f"send it as {article} {found.kind}_url part")
        part.value = str(found.path)


def data_url_bytes(url: str) -> bytes:
    """The payload of `data:[MIME][;base64],DATA`; MediaError when it is not one."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("a data: URL has no comma before its payload; expected data:MIME;base64,DATA")
    if head.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"the {head[:40]} URL's payload is not valid base64") from None
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


# --- running -------------------------------------------------------------------------------------------

def run_serve(load, media_options, options: ServeOptions) -> None:
    """Load the model, start the batch runner, serve until SIGTERM or Ctrl-C; exit 0 (130 after Ctrl-C)."""
    require_serve_extra()
    from ernie_cli.engine import make_engine

    sock = _bind(options.host, options.port)  # a busy port or a wrong host fails before a long load
    try:
        engine = make_engine()
        print(f"Loading {load.model}…", file=sys.stderr, flush=True)
        engine.load(load, media_options)
        jobs = Jobs(engine, options.max_batch, options.max_queue, options.batch_wait_s)
    except BaseException:
        sock.close()
        raise
    server = Server(engine, jobs, options, [load.model])
    _freeze_startup_objects()
    try:
        received = _serve(server, options, sock)
    finally:
        jobs.stop()
    if received == signal.SIGINT:
        sys.exit(130)


def _freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the model, the tokenizer) out of the garbage collector's
    full passes: a full pass walked them all, a 90 ms pause in the middle of some request every
    few hundred requests (ernie-tiny). What is made from now on is still collected as usual."""
    import gc

    gc.collect()
    gc.freeze()


def _serve(server: Server, options: ServeOptions, sock) -> int | None:
    """Run uvicorn on ``sock`` (``_bind``'s) until it stops; the signal it stopped on, if any."""
    import uvicorn

    config = uvicorn.Config(server.app(), host=options.host, port=options.port, lifespan="off",
                            log_config=_log_config(), log_level="info" if options.verbose else "warning",
                            access_log=options.verbose,
                            timeout_graceful_shutdown=options.grace_s + 5)  # a backstop: see _end_after_grace
    received: list[int] = []
    # uvicorn re-raises the signal it stopped on once it has shut down; these handlers catch it, so
    # that a SIGTERM ends in exit status 0 instead of death by signal.
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    host, port = sock.getsockname()[:2]
    print(f"ernie serve: {server.names[0]} at http://{_url_host(host)}:{port}/v1 (batch {server.jobs.max_batch}, "
          f"queue {server.jobs.max_queue}); Ctrl-C to stop", file=sys.stderr, flush=True)
    uv = uvicorn.Server(config)
    threading.Thread(target=_end_after_grace, args=(uv, server.jobs, options.grace_s), daemon=True).start()
    try:
        uv.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return received[0] if received else None


def _log_config() -> dict:
    """uvicorn's logging, with its access lines (-v) on stderr like everything else ernie serve says."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


def _end_after_grace(uv, jobs: Jobs, grace_s: float) -> None:
    """Once uvicorn stops accepting, give answers in flight `grace_s` seconds, then cancel them all.

    Cancelled answers end as answers do (finish_reason "abort", then [DONE]), so every connection
    closes cleanly before uvicorn's own, harsher, timeout would cut it.
    """
    while not uv.should_exit:
        time.sleep(0.05)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(jobs.load.values()):
        time.sleep(0.05)
    jobs.stop()


def _bind(host: str, port: int):
    """A listening socket on host:port (port 0 picks a free one); a one-line error, with a hint for
    the usual causes, when it cannot be had."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "is another server using that port? pick another with --port",
                errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; --host 0.0.0.0 listens on all of them",
                errno.EACCES: "ports below 1024 need root; pick another with --port"}.get(e.errno)
        if isinstance(e, socket.gaierror):
            hint = f"no address is known for the host name {host}; check --host"
        raise ErnieError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint=hint or "check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
