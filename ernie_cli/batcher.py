"""Many conversations, one model: a bounded queue in front of a batched decode loop.

`BatchWorker` owns a loaded `TorchEngine` and one thread. Callers `submit(Job)` from any thread
(QueueFull when `max_queue` jobs already wait); each job's `emit` receives, from the worker thread,
`Started` once its prompt is built, then `TextDelta` / `ThinkingDelta` pieces, then one `Finished`
— or a single exception (an `ErnieError` for bad media or an over-long prompt).

Jobs that can share a decode loop (the same sampling settings; greedy ones always can) are decoded
together as one left-padded batch of up to `max_batch` rows: each row keeps its own detokenizer,
stop strings, thinking splitter and answer length, and stops on its own; the batch ends when every
row has. A job whose `cancel` is set (its client went away) stops at the next token. Greedy rows
give the same tokens as they would alone (the decode loop ignores padding).
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

BATCH_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "think", "thinking_budget")
TENSOR_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids")
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


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
    prepared: Any = None  # _Prepared, once the worker built its inputs


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
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="ernie-batcher", daemon=True)

    # --- callers' side ----------------------------------------------------------------------------
    def start(self) -> "BatchWorker":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (the queue holds {self.max_queue})")
            self._queue.append(job)
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and wait for the thread (at most `timeout` s)."""
        with self._cv:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            for job in waiting + self._running:
                job.cancel.set()
            self._cv.notify_all()
        for job in waiting:
            job.emit(QueueFull("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def load(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._queue), "running": len(self._running)}

    # --- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._take()
                self._running = batch
            try:
                self._serve(batch)
            finally:
                with self._cv:
                    self._running = []

    def _take(self) -> list[Job]:
        """The oldest job and every waiting job that can share its decode loop (up to max_batch)."""
        first = self._queue.popleft()
        key, batch, rest = batch_key(first.settings), [first], collections.deque()
        while self._queue:
            job = self._queue.popleft()
            (batch if len(batch) < self.max_batch and batch_key(job.settings) == key else rest).append(job)
        self._queue = rest
        return batch

    def _serve(self, jobs: list[Job]) -> None:
        rows = [job for job in jobs if self._prepare(job)]
        rows = self._fit(rows)
        if rows:
            try:
                self._decode([_Row(job, self.engine) for job in rows])
            except Exception as e:  # a failure of the decode loop fails every row still open
                for job in rows:
                    job.emit(e)

    def _prepare(self, job: Job) -> bool:
        if job.cancel.is_set():
            return False
        if job.prepared is None:
            try:
                job.prepared = prepare(self.engine, job.conversation, job.settings)
            except Exception as e:  # bad media, context too long, processor errors: this job only
                job.emit(e)
                return False
            job.emit(Started(job.prepared.prompt_tokens))
        return True

    def _fit(self, rows: list[Job]) -> list[Job]:
        """Rows whose padded batch fits the context; the others go back to the front of the queue."""
        limit = self.engine.model.config.text.max_position_embeddings
        fit: list[Job] = []
        for job in rows:
            width = max(j.prepared.prompt_tokens for j in fit + [job])
            if not fit or width + max(j.prepared.max_new for j in fit + [job]) <= limit:
                fit.append(job)
        later = [job for job in rows if all(job is not f for f in fit)]
        if later:
            with self._cv:
                self._queue.extendleft(reversed(later))
        return fit

    def _decode(self, rows: list["_Row"]) -> None:
        from model.generation.generate import Done, stream_generate

        engine = self.engine
        config = engine.generation_config(rows[0].prepared.settings).replace(
            max_new_tokens=max(r.prepared.max_new for r in rows))
        param = next(engine.model.parameters())
        tensors = collate([r.prepared.inputs for r in rows], engine.processor.tokenizer.pad_token_id or 0)
        tensors = {k: v.to(param.device, param.dtype if v.is_floating_point() else None) for k, v in tensors.items()}
        eos = set(config.eos_token_id)
        all_done = threading.Event()
        start = time.perf_counter()
        for row in rows:
            row.start = start
        for step in stream_generate(engine.model, **tensors, config=config, cancel=all_done):
            if isinstance(step, Done):
                break
            for row, token in zip(rows, step.token_ids.tolist()):
                if not row.done:
                    row.push(token, token in eos)
            if self._stopping or all(r.done for r in rows):
                all_done.set()
        for row in rows:
            if not row.done:
                row.finish("interrupted" if self._stopping or row.job.cancel.is_set() else "length")


class _Row:
    """One job's state inside a batch: its own decoder, stop strings, splitter and token count."""

    def __init__(self, job: Job, engine):
        from processing.detokenize import StreamDecoder
        from processing.thinking import ThinkSplitter

        self.job, self.engine, self.prepared = job, engine, job.prepared
        self.decoder = StreamDecoder(engine.processor.tokenizer, skip_special_tokens=True,
                                     stop_strings=tuple(self.prepared.settings.stop))
        self.splitter = ThinkSplitter(start_in_thinking=bool(self.prepared.settings.think))
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.count, self.done = 0, False
        self.start = self.first = 0.0

    def push(self, token: int, is_eos: bool) -> None:
        if self.job.cancel.is_set():
            return self.finish("interrupted")
        self.count += 1
        self.first = self.first or time.perf_counter()
        if is_eos:
            return self.finish("stop")
        self._emit(self.splitter.feed(self.decoder.push(token)))
        if self.decoder.stopped:
            self.finish("stop")
        elif self.count >= self.prepared.max_new:
            self.finish("length")

    def finish(self, reason: str) -> None:
        from processing.events import Finished

        self.done = True
        self._emit(self.splitter.feed(self.decoder.finish()) + self.splitter.finish())
        p = self.prepared
        extra = {"model": self.engine.name, "media": p.media, "load_s": self.engine.load_s,
                 "preprocess_s": p.preprocess_s}
        thinking = "".join(self.thinking) if p.settings.think else None
        self.job.emit(Finished(reason, self._stats(), "".join(self.text), thinking, extra))

    def _emit(self, pieces) -> None:
        from processing.events import ThinkingDelta

        for piece in pieces or ():
            if piece.text:
                (self.thinking if isinstance(piece, ThinkingDelta) else self.text).append(piece.text)
                self.job.emit(piece)

    def _stats(self):
        from model.generation.stats import GenerationStats

        now = time.perf_counter()
        ttft = (self.first or now) - self.start
        decode_s = now - self.first if self.first else 0.0
        prompt = self.prepared.prompt_tokens
        return GenerationStats(prompt_tokens=prompt, completion_tokens=self.count, time_to_first_token_s=ttft,
                               prefill_tokens_per_s=prompt / ttft if ttft > 0 else 0.0,
                               decode_tokens_per_s=(self.count - 1) / decode_s if self.count > 1 and decode_s else 0.0,
                               peak_memory_bytes=0, total_time_s=now - self.start)


# --- helpers ---------------------------------------------------------------------------------------

def batch_key(settings: GenerationSettings) -> tuple:
    """Jobs with equal keys share a decode loop. A seeded sampled job decodes alone (its seed is its own)."""
    sampled = bool(settings.temperature)
    return tuple(getattr(settings, k) for k in BATCH_KEYS) + ((object(),) if sampled and settings.seed is not None else ())


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


def collate(rows: list, pad_id: int) -> dict:
    """One-row ModelInputs -> one left-padded batch; pictures and videos concatenated in row order."""
    import torch

    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key in TENSOR_KEYS:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([torch.nn.functional.pad(r[key], (width - r[key].shape[1], 0), value=fill)
                              for r in rows])
    for key in MEDIA_KEYS:
        present = [r[key] for r in rows if key in r]
        if present:
            out[key] = torch.cat(present)
    return out
