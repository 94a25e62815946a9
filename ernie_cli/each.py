"""`ernie describe --each`: one answer per media item, generated in batches, written in input order.

Three threads: a prefetch thread resolves and preprocesses the next inputs (at most two batches
ahead) and submits them, starting while the model's weights load (the processor loads first;
what is ready when the model is goes first, in input order); the scheduling thread of
``BatchRunner`` generates; the main thread writes each answer as soon as every earlier input
has been written, and draws the progress bar.
A broken input becomes an error object and the run goes on. Ctrl-C writes what is finished
and exits 130.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ernie_cli.commands import read_text_file, stdin_prompt, system_prompt
from ernie_cli.media import MediaResolver
from ernie_cli.settings import GenerationSettings, LoadOptions, MediaOptions, default_prompt, user_message
from model.errors import ErnieError


@dataclass
class Outcome:
    """What became of one input: a Finished event, or an error message."""

    ref: str
    finished: Any = None
    error: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.finished is not None and self.finished.reason == "interrupted"

    def to_json(self) -> dict[str, Any]:
        from ernie_cli.render import result_json

        if self.error is not None:
            return {"path": self.ref, "error": self.error}
        return {"path": self.ref, **result_json(self.finished)}


# Inputs prepared while the model loads, when --batch-size does not say (the default batch's cap).
DEFAULT_AHEAD = 32


# --- inputs ------------------------------------------------------------------------------------------

def read_inputs(refs: list[str], stdin: TextIO | None = None) -> list[str]:
    """The media references: the arguments, with `-` replaced by the lines of stdin (blank ones skipped)."""
    if refs.count("-") > 1:
        raise ErnieError("`-` (read the list from stdin) can be given only once")
    out: list[str] = []
    for ref in refs:
        if ref != "-":
            out.append(ref)
            continue
        stdin = stdin or sys.stdin
        if stdin.isatty():
            raise ErnieError("--each - reads paths or URLs from stdin, one per line, but stdin is a terminal",
                             hint="pipe a list in: find photos -name '*.jpg' | ernie describe --each -")
        out += [line.strip("\r\n") for line in stdin if line.strip()]
    return out


def answered(resume: Path) -> set[str]:
    """Paths answered without an error in a --jsonl file of an earlier run (a cut last line is ignored)."""
    if not resume.exists():
        return set()
    try:
        lines = resume.read_text(encoding="utf-8", errors="replace").splitlines()
    except IsADirectoryError:
        raise ErnieError(f"--resume {resume} is a directory; expected the .jsonl file of an earlier run") from None
    except OSError as e:
        raise ErnieError(f"cannot read --resume file {resume}: {e.strerror}") from None
    done = set()
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        for item in obj if isinstance(obj, list) else [obj]:  # a --json array works too
            if isinstance(item, dict) and isinstance(item.get("path"), str) and "error" not in item \
                    and "text" in item:
                done.add(item["path"])
    return done


def fixed_prompt(prompt: str | None, prompt_file: Path | None, stdin_free: bool) -> str | None:
    """--prompt, else --prompt-file, else piped stdin (unless it carries the list); None: per-item default."""
    if prompt is not None:
        return prompt
    if prompt_file is not None:
        return read_text_file(prompt_file, "prompt").strip()
    return stdin_prompt() if stdin_free else None  # the rule of describe: pipes and whole files only


# --- the command ---------------------------------------------------------------------------------------

def run_describe_each(refs: list[str], *, prompt, prompt_file, system, system_file, load: LoadOptions,
                      media_options: MediaOptions, settings: GenerationSettings, fmt: str, quiet: bool,
                      verbose: bool, batch_size: int | None, resume: Path | None) -> None:
    from ernie_cli.engine import make_engine
    from ernie_cli.render import stderr_console

    items = read_inputs(refs)
    skip = answered(resume) if resume is not None else set()
    todo = [ref for ref in items if ref not in skip]
    text = fixed_prompt(prompt, prompt_file, "-" not in refs)
    system_message = system_prompt(system, system_file)
    err = stderr_console()
    writer = Writer(fmt, sys.stdout)
    if not todo:
        return writer.close()
    engine = make_engine()
    run = EachRun(engine, todo, text, system_message, settings, writer, err,
                  show_progress=err.is_terminal and not quiet, ahead=batch_size or DEFAULT_AHEAD)
    spinner = err.status(f"Loading {load.model}…", spinner="dots") if err.is_terminal and not quiet else None
    if spinner:
        spinner.start()
    try:
        engine.load(load, media_options, on_processor=run.start_prefetch,  # the first inputs meanwhile
                    cache_media=False)  # each file is seen once
    except BaseException:
        run.abandon()
        raise
    finally:
        if spinner:
            spinner.stop()
    rows = batch_size or engine.default_batch_size(settings)
    start = time.perf_counter()
    interrupted = run.run(rows)
    failed = sum(o.error is not None for o in run.written)
    if verbose and not quiet:
        took = time.perf_counter() - start
        err.print(f"{len(run.written)} answers in {took:.1f} s ({len(run.written) / took:.2f} files/s, "
                  f"{run.runner_tokens / took:.1f} tokens/s) · batch size {rows}"
                  + (f" · {len(items) - len(todo)} skipped (--resume)" if skip else ""), style="dim", markup=False)
    if interrupted:
        err.print(f"interrupted: {len(run.written)} of {len(todo)} answered", markup=False, highlight=False)
        raise SystemExit(130)
    if failed:
        err.print(f"{failed} of {len(todo)} failed", markup=False, highlight=False)
        raise SystemExit(1)


class EachRun:
    """One --each run: prefetch thread, batch runner, ordered writing (see the module docstring)."""

    def __init__(self, engine, refs: list[str], prompt: str | None, system_message, settings: GenerationSettings,
                 writer: "Writer", err, show_progress: bool, ahead: int = DEFAULT_AHEAD):
        self.engine, self.refs, self.prompt, self.system_message = engine, refs, prompt, system_message
        self.settings, self.writer, self.err = settings, writer, err
        self.show_progress = show_progress
        self.results: queue.Queue = queue.Queue()  # (index, Outcome) as inputs end, in any order
        self.ahead = ahead
        self.room = threading.Semaphore(ahead)  # inputs prepared and not yet ended (2 x rows once running)
        self.stop = threading.Event()
        self.written: list[Outcome] = []
        self.runner_tokens = 0
        self._runner = None  # set by run(); until then prepared inputs wait in _early
        self._early: list[tuple[int, str, Any]] = []
        self._handover = threading.Lock()
        self._prefetched = False  # the prefetch thread has ended
        self._prefetch = threading.Thread(target=self._prefetch_all, name="ernie-prefetch", daemon=True)

    def start_prefetch(self) -> None:
        """Start preparing inputs (the engine's processor must be loaded; the model need not be)."""
        if self._prefetch.ident is None and not self.stop.is_set():  # not started yet
            self._prefetch.start()

    def abandon(self) -> None:
        """The model did not load: stop preparing (its downloads cleaned up) and return."""
        self.stop.set()
        if self._prefetch.is_alive():
            self._prefetch.join(10)

    def run(self, batch_size: int) -> bool:
        """Generate and write everything with ``batch_size`` rows; True when Ctrl-C cut it short."""
        from ernie_cli.batch import BatchRunner

        runner = BatchRunner(self.engine, batch_size, on_done=self._ended,
                             min_admit=max(1, batch_size // 2))  # throughput: prefill several at once
        progress = Progress(self.err, len(self.refs)) if self.show_progress else None
        with self._handover:  # what was prepared while the model loaded goes first, in order
            self._runner = runner
            for item in self._early:
                self._submit(runner, *item)
            self._early = []
            if self._prefetched:
                runner.end_of_input()
        if 2 * batch_size > self.ahead:
            self.room.release(2 * batch_size - self.ahead)
        self.start_prefetch()
        ready: dict[int, Outcome] = {}
        try:
            while len(self.written) < len(self.refs):
                try:
                    index, outcome = self.results.get(timeout=0.1)
                except queue.Empty:
                    if not runner.running and not self._prefetch.is_alive() and self.results.empty():
                        break  # the model failed and every input it held has been reported
                    continue
                ready[index] = outcome
                self._write_ready(ready)
                if progress:
                    progress.update(len(self.written) + len(ready), runner.tokens)
            return False
        except KeyboardInterrupt:
            self.stop.set()
            _ignore_sigint()  # a second Ctrl-C while the finished answers are written would lose them
            runner.close(timeout=10)  # the step in flight ends, then every unfinished request is cancelled
            while not self.results.empty():
                index, outcome = self.results.get()
                ready.setdefault(index, outcome)
            for index in sorted(ready):  # what finished, in input order, gaps and all
                if not ready[index].interrupted:
                    self._write(ready[index])
            return True
        finally:
            self.stop.set()
            if progress:
                progress.close()
            runner.close()
            self.runner_tokens = runner.tokens
            self.writer.close()

    def _write_ready(self, ready: dict[int, Outcome]) -> None:
        while len(self.written) in ready:
            self._write(ready.pop(len(self.written)))

    def _write(self, outcome: Outcome) -> None:
        self.written.append(outcome)
        if outcome.error is not None:
            named = outcome.error if outcome.ref in outcome.error else f"{outcome.ref}: {outcome.error}"
            self.err.print(f"error: {named}", markup=False, highlight=False, soft_wrap=True)
        self.writer.write(outcome)

    # --- prefetch thread ----------------------------------------------------------------------------
    def _prefetch_all(self) -> None:
        try:
            self._submit_all()
        finally:
            with self._handover:
                self._prefetched = True
                runner = self._runner
            if runner is not None:  # else run() says it, after submitting what was prepared early
                runner.end_of_input()

    def _submit_all(self) -> None:
        for index, ref in enumerate(self.refs):
            while not self.room.acquire(timeout=0.1):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            try:
                prepared = self._prepare(ref)
            except Exception as e:  # noqa: BLE001 - any broken input becomes its error object
                self._failed(index, ref, e)
                continue
            with self._handover:
                runner = self._runner
                if runner is None:  # the model is still loading
                    self._early.append((index, ref, prepared))
                    continue
            self._submit(runner, index, ref, prepared)

    def _submit(self, runner, index: int, ref: str, prepared) -> None:
        try:
            runner.submit(prepared, tag=(index, ref))
        except Exception as e:  # noqa: BLE001 - too long for the context, or Ctrl-C stopped the runner
            self._failed(index, ref, e)

    def _failed(self, index: int, ref: str, error: BaseException) -> None:
        self.room.release()
        if not self.stop.is_set():  # after Ctrl-C the runner refuses everything; nothing to report
            self.results.put((index, Outcome(ref, error=_message(error))))

    def _prepare(self, ref: str):
        resolver = MediaResolver(decode_check=False)  # the processor decodes at once
        try:
            media = resolver.resolve(ref)
            conversation = [m for m in (self.system_message,) if m]
            conversation.append(user_message(self.prompt or default_prompt([media.kind]), [media]))
            return self.engine.prepare(conversation, self.settings)
        finally:
            resolver.cleanup()

    # --- scheduling thread ---------------------------------------------------------------------------
    def _ended(self, request) -> None:
        index, ref = request.tag
        self.room.release()
        if request.error is not None:
            self.results.put((index, Outcome(ref, error=_message(request.error))))
        else:
            self.results.put((index, Outcome(ref, finished=request.finished)))


def _ignore_sigint() -> None:
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _message(error: BaseException) -> str:
    from ernie_cli.settings import debug_enabled

    if debug_enabled() and not isinstance(error, ErnieError):
        import traceback

        traceback.print_exception(error)
    text = str(error) if isinstance(error, ErnieError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


# --- output ------------------------------------------------------------------------------------------

class Writer:
    """text: `==> PATH <==` before each answer (as head does); jsonl: one object per line, flushed;
    json: one array at the end. Failed inputs: an error object (text: only the stderr line)."""

    def __init__(self, fmt: str, out: TextIO):
        self.fmt, self.out = fmt, out
        self.objects: list[dict] = []
        self.count = 0

    def write(self, outcome: Outcome) -> None:
        if self.fmt == "json":
            self.objects.append(outcome.to_json())
            return
        if self.fmt == "jsonl":
            self.out.write(json.dumps(outcome.to_json(), ensure_ascii=False) + "\n")
        elif outcome.error is None:
            answer = outcome.finished.text.strip("\n")
            self.out.write(("\n" if self.count else "") + f"==> {outcome.ref} <==\n{answer}\n")
            self.count += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps(self.objects, ensure_ascii=False) + "\n")
            self.out.flush()
            self.fmt = "closed"


class Progress:
    """A Rich bar on a terminal stderr: done/total, files/s, tokens/s, ETA."""

    def __init__(self, err, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeRemainingColumn

        self.start = time.perf_counter()
        self.bar = RichProgress(TextColumn("describing"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rates]}"), TimeRemainingColumn(), console=err,
                                transient=True)
        self.task = self.bar.add_task("each", total=total, rates="")
        self.bar.start()

    def update(self, done: int, tokens: int) -> None:
        took = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=done, rates=f"{done / took:.2f} files/s · {tokens / took:.0f} tok/s")

    def close(self) -> None:
        self.bar.stop()
