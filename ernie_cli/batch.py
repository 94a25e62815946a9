"""Many conversations generated together: the text side of model.generation.scheduler.

    runner = BatchRunner(engine, batch_size)            # starts the scheduling thread
    request = runner.submit(engine.prepare(conversation, settings))   # from any thread
    for event in request.events():                      # TextDelta | ThinkingDelta | Finished,
        ...                                             # as engine.generate yields them
    request.cancel()                                    # frees its row at the next step
    runner.close()                                      # cancels what is left, joins the thread

One thread owns the model: it steps the scheduler and turns each request's tokens into text
right away (stop strings cancel the request at once, however slowly its events are read), then
queues the events for whoever reads that request. ``describe --each`` and ``ernie serve`` both
drive generation through this class. Torch-free at import, like engine.py.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from ernie_cli.engine import Prepared, _END, _Failure, _Turn
from model.errors import ErnieError


class TextRequest:
    """One submitted conversation: its events, its result, its cancellation."""

    def __init__(self, prepared: Prepared, engine) -> None:
        from processing.detokenize import StreamDecoder
        from processing.thinking import ThinkSplitter

        self.prepared, self._engine = prepared, engine
        self._queue: queue.Queue = queue.Queue()
        self._decoder = StreamDecoder(engine.processor.tokenizer, skip_special_tokens=True,
                                      stop_strings=tuple(prepared.settings.stop))
        self._splitter = ThinkSplitter(start_in_thinking=prepared.settings.think)
        self._turn = _Turn()
        self.handle = None  # the scheduler's Request, set by BatchRunner.submit
        self.finished = None  # processing.events.Finished once done
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.tag: Any = None

    def events(self) -> Iterator[Any]:
        """TextDelta / ThinkingDelta as they come, then one Finished; raises the request's error."""
        while True:
            event = self._queue.get()
            if event is _END:
                return
            if isinstance(event, _Failure):
                raise event.error
            yield event

    def result(self, timeout: float | None = None):
        """Wait for the end: the Finished event (raises the request's error)."""
        if not self.done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.finished

    def cancel(self, reason: str = "interrupted") -> None:
        if self.handle is not None:
            self.handle.cancel(reason)

    # --- in the scheduling thread --------------------------------------------------------------
    def _on_token(self, token_id: int) -> None:
        if self._decoder.stopped:
            return
        self._put(self._splitter.feed(self._decoder.push(token_id)))
        if self._decoder.stopped:
            self.handle.cancel("stop")

    def _on_done(self, done) -> None:
        from processing.events import Finished

        if done.reason == "error":
            error = done.error
            if not isinstance(error, ErnieError):
                error = ErnieError(f"generation failed: {type(error).__name__}: {error}")
            return self._fail(error)
        self._put(self._splitter.feed(self._decoder.finish()) + self._splitter.finish())
        reason = "stop" if self._decoder.stopped else done.reason
        settings = self.prepared.settings
        thinking = "".join(self._turn.thinking) if settings.think else None
        self.finished = Finished(reason, done.stats, "".join(self._turn.text), thinking,
                                 self.prepared.extra(self._engine))
        self._queue.put(self.finished)
        self._queue.put(_END)
        self.done.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._queue.put(_Failure(error))
        self._queue.put(_END)
        self.done.set()

    def _put(self, pieces) -> None:
        from processing.events import ThinkingDelta

        for piece in pieces or ():
            if piece.text:
                (self._turn.thinking if isinstance(piece, ThinkingDelta) else self._turn.text).append(piece.text)
                self._queue.put(piece)


class _Sink:
    """Takes a TextRequest's events in place of its queue: each one goes to a callback."""

    def __init__(self, sink: Callable[[Any], None]):
        self._sink = sink

    def put(self, item: Any) -> None:
        self._sink(None if item is _END else item.error if isinstance(item, _Failure) else item)


class BatchRunner:
    """Runs the engine's model in a scheduling thread; ``submit`` prepared conversations to it.

    ``on_done(request)`` (optional) is called in the scheduling thread when a request ends.
    ``min_admit``: requests one prefill waits for (free rows, and waiting requests until
    ``end_of_input`` or ``max_hold_s``; see ``Scheduler``); 1 admits at once (lowest latency)
    unless ``expect`` counts requests on their way, more batches prefills (throughput). The KV
    cache is capped at the engine's ``cache_token_budget()``: long requests that would exceed it wait for rows to end, and one
    that cannot fit at all is refused at ``submit`` with a ContextLengthError.
    """

    def __init__(self, engine, batch_size: int, on_done: Callable[[TextRequest], None] | None = None,
                 min_admit: int = 1, max_hold_s: float = 0.5):
        from model.generation.scheduler import Scheduler

        self.engine = engine
        self.scheduler = Scheduler(engine.model, max_batch=batch_size, min_admit=min_admit, max_hold_s=max_hold_s,
                                   max_cache_tokens=engine.cache_token_budget())
        self._on_done = on_done
        self._requests: dict[int, TextRequest] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.failure: BaseException | None = None
        self.tokens = 0  # new tokens so far, all requests
        self._thread = threading.Thread(target=self._run, name="ernie-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prepared: Prepared, tag: Any = None, sink: Callable[[Any], None] | None = None,
               arrived: bool = False) -> TextRequest:
        """Queue one prepared conversation (raises ContextLengthError when it cannot fit).
        ``tag`` rides along on the request (``request.tag``) for the caller's bookkeeping.
        ``sink``, instead of ``events()``: called in the scheduling thread with each event as it
        happens, then ``None`` at the end (errors arrive as exceptions). ``ernie serve`` hands the
        events straight to its event loop this way, with no thread per request. ``arrived``: one
        of the requests ``expect`` counted (its count drops as it joins the queue)."""
        request = TextRequest(prepared, self.engine)
        request.tag = tag
        if sink is not None:
            request._queue = _Sink(sink)
        with self._lock:
            if self._closing or self.failure is not None:
                raise ErnieError("the batch runner has stopped")
            request.handle = self.scheduler.submit(prepared.inputs, prepared.config, arrived=arrived)
            self._requests[request.handle.id] = request
        return request

    def expect(self, delta: int) -> None:
        """Requests on their way (being received or prepared) change by ``delta``: the waiting ones
        are held for them, at most ``max_hold_s`` (see ``Scheduler.expect``)."""
        self.scheduler.expect(delta)

    def end_of_input(self) -> None:
        """Nothing more will be submitted: admit what waits without holding it for companions."""
        self.scheduler.end_of_input()

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel everything still waiting or running, then stop the scheduling thread."""
        with self._lock:
            self._closing = True
        self.scheduler.cancel_all()
        self.scheduler.wake()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        try:
            while not (self._closing and not self.scheduler.has_work):
                if not self.scheduler.wait_for_work(0.05):
                    continue
                events = self.scheduler.step()
                with self._lock:
                    self._dispatch(events)
        except BaseException as e:  # the model itself failed: every request still out fails with it
            with self._lock:
                self.failure = e  # submit refuses from now on
                failed, self._requests = list(self._requests.values()), {}
            for request in failed:
                request._fail(e if isinstance(e, ErnieError) else ErnieError(f"generation failed: {type(e).__name__}: {e}"))
                if self._on_done is not None:
                    self._on_done(request)

    def _dispatch(self, events) -> None:
        from model.generation.scheduler import RequestStep

        for event in events:
            request = self._requests.get(event.request.id)
            if request is None:
                continue
            if isinstance(event, RequestStep):
                self.tokens += 1
                request._on_token(event.token_id)
                continue
            del self._requests[event.request.id]
            request._on_done(event)
            if self._on_done is not None:
                self._on_done(request)
