"""Many conversations, one model: a bounded queue in front of the continuous-batching scheduler.

`BatchWorker` owns a loaded `TorchEngine`, a `model.generation.scheduler.Scheduler` and one
thread that steps it. Callers `submit(Job)` from any thread (QueueFull when `max_queue` jobs
already wait); each job's `emit` receives, from the worker thread, `Started` if the worker built
its prompt, then `TextDelta` / `ThinkingDelta` pieces, then one `Finished` — or a single exception
(an `ErnieError` for bad media or an over-long prompt).

The scheduler decodes up to `max_batch` requests together, each in its own cache row with its own
sampling settings, admits waiting requests as rows free up, and gives every greedy request the
tokens it would get alone. This module adds what the text side needs per request: the
detokenizer with its stop strings, the thinking splitter, and cancellation when a client goes
away (`job.cancel`). Prompts are best built before `submit` (`prepare()`, e.g. in a request's
own thread) so that media decoding runs beside the decode loop instead of inside it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ernie_cli.media import MediaInput
from ernie_cli.settings import GenerationSettings, Message
from model.errors import ContextLengthError


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs already."""


@dataclass(frozen=True)
class Started:
    """The job's prompt is built (media decoded, context checked); its answer follows."""

    prompt_tokens: int


@dataclass(eq=False)
class Job:
    conversation: list[Message]
    settings: GenerationSettings
    emit: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    prepared: Any = None  # _Prepared: built by prepare() before submit, or by the worker


@dataclass
class _Prepared:
    settings: GenerationSettings  # with think resolved
    inputs: Any  # ModelInputs of one row
    prompt_tokens: int
    max_new: int
    media: list
    preprocess_s: float


class BatchWorker:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64):
        from model.generation.scheduler import Scheduler

        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.scheduler = Scheduler(engine.model, max_batch=max_batch)
        self._inbox: collections.deque[Job] = collections.deque()  # jobs whose prompt the worker builds
        self._rows: dict[int, _Row] = {}  # request id -> row, for every job handed to the scheduler
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ernie-batcher", daemon=True)

    # --- callers' side ----------------------------------------------------------------------------
    def start(self) -> "BatchWorker":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            waiting = len(self._inbox) + self.scheduler.num_waiting
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (the queue holds {self.max_queue})")
            if job.prepared is None:
                self._inbox.append(job)
            else:
                self._hand_over(job)
        self.scheduler.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running (answers end as 'interrupted') and wait for the thread."""
        with self._lock:
            self._stopping = True
            waiting, self._inbox = list(self._inbox), collections.deque()
        for job in waiting:
            job.emit(QueueFull("the server is shutting down"))
        self.scheduler.cancel_all("interrupted")
        self.scheduler.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def load(self) -> dict[str, int]:
        """Jobs waiting for a row, and jobs with a row (or being admitted to one)."""
        with self._lock:
            waiting, handed = len(self._inbox) + self.scheduler.num_waiting, len(self._rows)
        return {"waiting": waiting, "running": max(handed - self.scheduler.num_waiting, 0)}

    # --- the worker thread ------------------------------------------------------------------------
    def _hand_over(self, job: Job) -> None:
        """Submit a prepared job to the scheduler (under self._lock)."""
        p = job.prepared
        config = self.engine.generation_config(p.settings).replace(max_new_tokens=p.max_new)
        request = self.scheduler.submit(p.inputs, config)
        self._rows[request.id] = _Row(job, self.engine, request)

    def _run(self) -> None:
        while True:
            self._prepare_inbox()
            with self._lock:
                if self._stopping and not self.scheduler.has_work:
                    return
            if not self.scheduler.wait_for_work(timeout=0.1):
                continue
            self._cancel_gone()
            for event in self.scheduler.step():
                try:
                    self._deliver(event)
                except Exception as e:  # a failing detokenizer or sink fails its own job, not the worker
                    self._fail(event.request.id, e)

    def _prepare_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                job = self._inbox.popleft()
            if job.cancel.is_set():
                continue
            try:
                job.prepared = prepare(self.engine, job.conversation, job.settings)
                with self._lock:
                    self._hand_over(job)
            except Exception as e:  # bad media, context too long, processor errors: this job only
                job.emit(e)
                continue
            job.emit(Started(job.prepared.prompt_tokens))

    def _cancel_gone(self) -> None:
        """Jobs whose client went away end at this step; all of them once the worker stops (a request
        that was being admitted while `stop` ran is cancelled here too)."""
        with self._lock:
            rows, stopping = list(self._rows.values()), self._stopping
        for row in rows:
            if (stopping or row.job.cancel.is_set()) and not row.request.done:
                row.request.cancel("interrupted")

    def _fail(self, request_id: int, error: Exception) -> None:
        with self._lock:
            row = self._rows.pop(request_id, None)
        if row is not None:
            row.request.cancel("error")
            row.job.emit(error)

    def _deliver(self, event) -> None:
        from model.generation.scheduler import RequestDone

        with self._lock:
            row = self._rows.get(event.request.id)
        if row is None:
            return
        if not isinstance(event, RequestDone):
            return row.push(event.token_id)
        with self._lock:
            self._rows.pop(event.request.id, None)
        if event.error is not None:
            return row.job.emit(event.error)
        row.finish(event.reason, event.stats)


class _Row:
    """One job's text side: its detokenizer (stop strings), thinking splitter and answer so far."""

    def __init__(self, job: Job, engine, request):
        from processing.detokenize import StreamDecoder
        from processing.thinking import ThinkSplitter

        self.job, self.engine, self.request, self.prepared = job, engine, request, job.prepared
        self.decoder = StreamDecoder(engine.processor.tokenizer, skip_special_tokens=True,
                                     stop_strings=tuple(self.prepared.settings.stop))
        self.splitter = ThinkSplitter(start_in_thinking=bool(self.prepared.settings.think))
        self.text: list[str] = []
        self.thinking: list[str] = []

    def push(self, token: int) -> None:
        if self.decoder.stopped or self.request.cancel_reason is not None:
            return
        self._emit(self.splitter.feed(self.decoder.push(token)))
        if self.decoder.stopped:
            self.request.cancel("stop")

    def finish(self, reason: str, stats) -> None:
        from processing.events import Finished

        self._emit(self.splitter.feed(self.decoder.finish()) + self.splitter.finish())
        p = self.prepared
        extra = {"model": self.engine.name, "media": p.media, "load_s": self.engine.load_s,
                 "preprocess_s": p.preprocess_s}
        thinking = "".join(self.thinking) if p.settings.think else None
        self.job.emit(Finished(reason, stats, "".join(self.text), thinking, extra))

    def _emit(self, pieces) -> None:
        from processing.events import ThinkingDelta

        for piece in pieces or ():
            if piece.text:
                (self.thinking if isinstance(piece, ThinkingDelta) else self.text).append(piece.text)
                self.job.emit(piece)


# --- helpers ---------------------------------------------------------------------------------------

def prepare(engine, conversation: list[Message], settings: GenerationSettings) -> _Prepared:
    """Build one conversation's model inputs, as `ernie describe` does, and check it fits the context."""
    from ernie_cli.engine import media_summary

    if settings.think is None:  # Thinking variants think unless told not to
        settings = replace(settings, think="thinking" in str(engine.name).lower())
    start = time.perf_counter()
    media = [MediaInput(p.kind, Path(p.value), p.ref) for m in conversation for p in m.media]
    inputs = engine.processor.apply_chat_template(
        [m.to_processor() for m in conversation], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", enable_thinking=settings.think)
    max_new = settings.max_new_tokens or engine.base_config.max_new_tokens
    prompt = int(inputs["input_ids"].shape[1])
    limit = engine.model.config.text.max_position_embeddings
    if prompt + max_new > limit:
        raise ContextLengthError(
            f"the prompt has {prompt} tokens and {max_new} new tokens were requested: {prompt + max_new} in all, "
            f"over the model's context of {limit}",
            hint=f"lower max_tokens to at most {max(limit - prompt, 0)}, or shorten the prompt")
    return _Prepared(settings, inputs, prompt, max_new, media_summary(engine.processor, media, inputs),
                     time.perf_counter() - start)
