"""The engine: one small interface between the commands and a backend.

    engine.load(load_options, media_options)          -> None  (raises ErnieError)
    engine.generate(conversation, settings, cancel)   -> Iterator[Status | TextDelta | ThinkingDelta | Finished]

`TorchEngine` wires the embedded library: processor -> model -> stream_generate -> StreamDecoder (stop
strings) -> ThinkSplitter. Generation runs in a worker thread so Ctrl-C in the main thread only sets
`cancel`; the answer so far still arrives as a `Finished("interrupted", ...)`. When the consumer stops
early (closes the stream, or an exception such as a closed stdout ends its loop), the worker is
cancelled and joined: a daemon thread still inside torch while the interpreter exits aborts the
process (`terminate called ...`). Everything heavy is imported inside methods, so importing this
module stays torch-free.
"""

from __future__ import annotations

import copy
import os
import queue
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from ernie_cli.media import MediaInput
from ernie_cli.settings import GENERATION_THREAD, TINY_MODEL, GenerationSettings, LoadOptions, MediaOptions, Message
from model.errors import ErnieError, MediaError, ModelNotFoundError

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Status:
    """A phase the user waits on (downloading, loading, preprocessing); rendered as a spinner on a TTY."""

    message: str


class Engine(Protocol):
    name: str

    def load(self, options: LoadOptions, media: MediaOptions) -> None: ...

    def generate(self, conversation: list[Message], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> Iterator[Any]: ...


def resolve_model_ref(name: str) -> str | Path:
    """ernie-tiny -> the bundled checkpoint; an existing directory -> itself; else a Hub repo id."""
    if name == TINY_MODEL:
        path = ASSETS / TINY_MODEL
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{TINY_MODEL} is not bundled in this installation (no {path}/config.json)",
                                     hint="reinstall ernie-cli, or pass a local checkpoint directory")
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model {name!r} is neither a checkpoint directory nor a Hub repo id (owner/name)",
                                 hint="try `ernie models` to see what is available, or `--model ernie-tiny`")
    return name


@dataclass
class _Turn:
    """Mutable state of one generation, shared by the worker thread and its events."""

    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)


class TorchEngine:
    """The embedded PyTorch implementation of ERNIE 4.5 VL."""

    def __init__(self) -> None:
        self.name = ""
        self.model = self.processor = self.base_config = None
        self.media_options = MediaOptions()
        self.load_s = 0.0

    # --- loading ---------------------------------------------------------------------------------
    def load(self, options: LoadOptions, media: MediaOptions,
             on_processor: Callable[[], None] | None = None, cache_media: bool = True) -> None:
        """Processor first, then the model. ``on_processor`` is called between the two (in this
        thread): from then on ``prepare`` works, so that a caller can preprocess its first inputs
        while the weights load (``describe --each``). ``cache_media=False``: no cache of
        preprocessed media unless $ERNIE_MEDIA_CACHE_MB asks for one (a run that sees each file
        once, whose entries would only take memory)."""
        from model.checkpoint.hub import resolve

        start = time.perf_counter()
        _size_media_cache(cache_media)  # a bad $ERNIE_MEDIA_CACHE_MB fails here, before anything heavy
        root = resolve(str(resolve_model_ref(options.model)), revision=options.revision, offline=options.offline)
        from ernie_cli.memory import check_memory

        check_memory(root, options)  # before torch is imported: a hopeless load fails in a second
        from model.generation.generate import GenerationConfig
        from model import load_pretrained
        from processing.processor import ErnieVLProcessor

        from model.config import ErnieVLConfig

        ErnieVLConfig.from_file(Path(root) / "config.json")  # a missing or foreign config is named first
        self.processor = _with_media_options(ErnieVLProcessor.from_pretrained(root), media)
        self.base_config = GenerationConfig.from_file(root)
        self.name = options.model
        if on_processor is not None:
            on_processor()
        self.model = load_pretrained(str(root), dtype=options.dtype, device=options.device, offline=True,
                                     quantize=options.quantize)
        self.load_s = time.perf_counter() - start

    # --- generation ------------------------------------------------------------------------------
    def generate(self, conversation: list[Message], settings: GenerationSettings,
                 cancel: threading.Event | None = None) -> Iterator[Any]:
        cancel = cancel or threading.Event()
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._worker, args=(conversation, settings, cancel, events), daemon=True,
                                  name=GENERATION_THREAD)
        finished = False
        try:
            with ctrl_c_cancels(cancel):
                worker.start()
                yield from _drain(events, cancel)
            finished = True
        finally:  # also when the consumer stops early (stdout closed, an error, Ctrl-C twice, close())
            if not finished:
                cancel.set()  # the worker stops after its current step
            if worker.is_alive():
                worker.join()  # no thread left inside torch when the interpreter exits

    def _worker(self, conversation, settings, cancel, events: queue.Queue) -> None:
        try:
            for event in self._generate(conversation, settings, cancel):
                events.put(event)
        except BaseException as e:  # handed to the main thread, which re-raises it
            events.put(_Failure(e))
        events.put(_END)

    def _generate(self, conversation, settings, cancel) -> Iterator[Any]:
        from processing.events import Finished

        yield Status("Preprocessing…")
        prepared = self.prepare(conversation, settings)
        turn = _Turn()
        reason, stats = yield from self._decode(prepared.inputs, prepared.settings, cancel, turn)
        thinking = "".join(turn.thinking) if prepared.settings.think else None
        yield Finished(reason, stats, "".join(turn.text), thinking, prepared.extra(self))

    def prepare(self, conversation: list[Message], settings: GenerationSettings) -> "Prepared":
        """Preprocess one conversation (media decoded, prompt rendered and tokenized); raises
        MediaError and friends. Thread-safe: `describe --each` prepares the next inputs while
        the model generates."""
        if settings.think is None:  # Thinking variants think unless told not to
            settings = replace(settings, think="thinking" in str(self.name).lower())
        start = time.perf_counter()
        media = [MediaInput(p.kind, Path(p.value), p.ref) for m in conversation for p in m.media]
        try:
            inputs = self.processor.apply_chat_template(
                [m.to_processor() for m in conversation], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", enable_thinking=settings.think)
        except MediaError as e:  # named by the user's reference, not a temporary copy's path
            raise _named(e, media) from None
        return Prepared(inputs, settings, self.generation_config(settings),
                        media_summary(self.processor, media, inputs), time.perf_counter() - start)

    def default_batch_size(self, settings: GenerationSettings, cap: int = 32) -> int:
        """Rows for batched generation: as many as a quarter of the free memory holds KV caches
        for (one image at the processor's largest size, a prompt, the answer), at most ``cap``."""
        text, image = self.model.config.text, self.processor.image_config
        max_new = self.generation_config(settings).max_new_tokens
        tokens = min(text.max_position_embeddings, image.max_pixels // (image.patch_size * image.merge_size) ** 2
                     + 256 + max_new)
        budget = self.cache_token_budget()
        if budget is None:
            return min(4, cap)
        return max(1, min(cap, budget // tokens))

    def cache_token_budget(self) -> int | None:
        """KV-cache slots (rows x tokens) batched generation may hold: a quarter of the memory free
        now on the model's device; None where that cannot be measured. The batch runner caps its
        cache with it, so that a burst of long requests waits instead of exhausting memory."""
        from ernie_cli.memory import free_bytes

        text = self.model.config.text
        param = next(self.model.parameters())
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * param.element_size()
        free = free_bytes(str(param.device) if param.device.type == "cuda" else param.device.type)
        return None if free is None else int(free * 0.25 // per_token)

    def generation_config(self, settings: GenerationSettings):
        """The checkpoint's config with the user's overrides; temperature > 0 means sampling."""
        overrides = settings.overrides()
        if overrides.get("temperature"):
            overrides["do_sample"] = True
        if settings.think and settings.thinking_budget is not None:
            overrides["max_thinking_tokens"] = settings.thinking_budget
            overrides["think_end_ids"] = self.processor.tokenizer.encode("</think>\n\n")
        return self.base_config.replace(**overrides)

    def _decode(self, inputs, settings, cancel, turn: _Turn):
        from model.generation.generate import Done, stream_generate
        from processing.detokenize import StreamDecoder
        from processing.thinking import ThinkSplitter

        decoder = StreamDecoder(self.processor.tokenizer, skip_special_tokens=True, stop_strings=tuple(settings.stop))
        splitter = ThinkSplitter(start_in_thinking=settings.think)
        param = next(self.model.parameters())
        tensors = {k: v for k, v in inputs.to(param.device, param.dtype).items() if k in GENERATE_INPUTS}
        stopped = False
        for step in stream_generate(self.model, **tensors, config=self.generation_config(settings), cancel=cancel):
            if isinstance(step, Done):
                yield from _events(splitter.feed(decoder.finish()) + splitter.finish(), turn)
                reason = "stop" if stopped else "interrupted" if cancel.is_set() else step.finish_reasons[0]
                return reason, step.stats
            yield from _events(splitter.feed(decoder.push(int(step.token_ids[0]))), turn)
            if getattr(decoder, "stopped", False) and not stopped:
                stopped = True
                cancel.set()
        return "interrupted", None


@dataclass
class Prepared:
    """One conversation turned into model inputs (``TorchEngine.prepare``)."""

    inputs: Any  # processing.processor.ModelInputs, on the CPU
    settings: GenerationSettings  # think resolved
    config: Any  # model.generation.generate.GenerationConfig
    media: list[dict]
    preprocess_s: float

    def extra(self, engine: "TorchEngine") -> dict[str, Any]:
        """``Finished.extra``: model, media, load and preprocess times."""
        return {"model": engine.name, "media": self.media, "load_s": engine.load_s, "preprocess_s": self.preprocess_s}


GENERATE_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids", "pixel_values",
                   "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _size_media_cache(by_default: bool = True) -> None:
    """The preprocessed-media cache (processing/media_cache.py) sized from $ERNIE_MEDIA_CACHE_MB;
    when that is unset, its default size, or off unless ``by_default``."""
    from processing.media_cache import MEDIA_CACHE, max_bytes_from_env

    try:
        MEDIA_CACHE.resize(max_bytes_from_env() if by_default else max_bytes_from_env(default=0))
    except ValueError:
        raise ErnieError(f"$ERNIE_MEDIA_CACHE_MB must be a number of MB >= 0 (0 turns the cache off), found "
                         f"{os.environ.get('ERNIE_MEDIA_CACHE_MB')!r}", hint="unset it for the default (512)") from None


def _with_media_options(processor, media: MediaOptions):
    """Apply --fps / --max-frames / --no-timestamps / --max-pixels to the processor's configs."""
    image, video = processor.image_config, processor.video_config
    if media.max_pixels is not None:
        image = replace(image, max_pixels=media.max_pixels, min_pixels=min(image.min_pixels, media.max_pixels))
        video = replace(video, max_pixels=media.max_pixels, min_pixels=min(video.min_pixels, media.max_pixels))
    changes = {"fps": media.fps, "max_frames": media.max_frames}
    video = replace(video, draw_timestamps=video.draw_timestamps and media.timestamps,
                    **{k: v for k, v in changes.items() if v is not None})
    if media.max_frames is not None:
        video = replace(video, min_frames=min(video.min_frames, media.max_frames))
    processor.image_config, processor.video_config = image, video
    return processor


def media_summary(processor, media: list[MediaInput], inputs) -> list[dict]:
    """Per media item, in prompt order: kind, path, grid (t, h, w patches), tokens, timestamps (videos)."""
    grids = {"image": iter(inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []),
             "video": iter(inputs["video_grid_thw"].tolist() if "video_grid_thw" in inputs else [])}
    stamps = iter(getattr(inputs, "video_timestamps", []) or [])
    rows = []
    for m in media:
        grid = next(grids[m.kind], None)
        row = {"kind": m.kind, "path": m.source, "grid": grid}
        if m.kind == "image":
            row["tokens"] = processor.image_token_count(grid) if grid else None
        else:
            row["tokens"] = processor.video_token_count(grid) if grid else None
            row["timestamps"] = [round(float(t), 3) for t in next(stamps, [])]
        rows.append(row)
    return rows


def _events(pieces, turn: _Turn) -> Iterator[Any]:
    from processing.events import ThinkingDelta

    for piece in pieces or ():
        if not piece.text:
            continue
        (turn.thinking if isinstance(piece, ThinkingDelta) else turn.text).append(piece.text)
        yield piece


# --- helpers ---------------------------------------------------------------------------------------

class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


@contextmanager
def ctrl_c_cancels(cancel: threading.Event) -> Iterator[None]:
    """While generating, the first Ctrl-C sets `cancel` (wherever the main thread is); the second raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _drain(events: queue.Queue, cancel: threading.Event) -> Iterator[Any]:
    """Yield the worker's events; the first Ctrl-C sets `cancel` and keeps draining, the second propagates."""
    while True:
        try:
            event = events.get(timeout=0.05)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if cancel.is_set():
                raise
            cancel.set()
            continue
        if event is _END:
            return
        if isinstance(event, _Failure):
            raise event.error
        yield event


def _named(error: MediaError, media: list[MediaInput]) -> MediaError:
    """``error`` with every media file's path replaced by the reference the user gave for it."""
    message, hint = str(error), error.hint
    for item in media:
        if item.source and str(item.path) != item.source:
            message = message.replace(str(item.path), item.source)
            hint = hint.replace(str(item.path), item.source) if hint else hint
    if message == str(error) and hint == error.hint:
        return error
    renamed = copy.copy(error)  # the same class
    renamed.args, renamed.hint = (message,), hint
    return renamed


def make_engine(backend: str = "torch") -> Engine:
    if backend != "torch":
        raise ErnieError(f"unknown backend {backend!r}; expected 'torch'")
    return TorchEngine()
