"""The one place that prints: typed events in, terminal / JSON / JSON-lines out.

stdout carries only the answer (or the JSON). Spinners, thinking, stats and warnings go to stderr.
When stdout is not a terminal, the answer is written as plain text as it streams: no colour, no
cursor codes, no live widgets. Colour follows the terminal, NO_COLOR and FORCE_COLOR (see console()).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from rich.console import Console

from ernie_cli.engine import Status
from processing.events import Finished, TextDelta, ThinkingDelta


def console(file: TextIO, **kw) -> Console:
    """A Rich console on `file` with colour decided by NO_COLOR and FORCE_COLOR read as booleans (model.env):
    FORCE_COLOR=1 forces colour (and terminal manners), FORCE_COLOR=0 turns it off like NO_COLOR=1; 0, false, no,
    off or empty mean "not set" for NO_COLOR. Rich alone would force colour for any non-empty FORCE_COLOR."""
    from model.env import env_flag_or_none

    force, no_color = env_flag_or_none("FORCE_COLOR"), env_flag_or_none("NO_COLOR")
    is_tty = file.isatty() if hasattr(file, "isatty") else False
    return Console(file=file, highlight=False, force_terminal=True if force else is_tty,
                   no_color=bool(no_color) or force is False, **kw)


def stderr_console() -> Console:
    return console(sys.stderr, soft_wrap=True)


def stdout_is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    import os

    return stream.isatty() and os.environ.get("TERM") != "dumb"


def result_json(done: Finished) -> dict[str, Any]:
    """The --json object (and the `done` event of --jsonl)."""
    s, extra = done.stats, done.extra
    return {
        "text": done.text,
        "thinking": done.thinking,
        "model": extra.get("model"),
        "finish_reason": done.reason,
        "usage": {"prompt_tokens": s.prompt_tokens if s else None, "completion_tokens": s.completion_tokens if s else None},
        "timings": {
            "load_s": _round(extra.get("load_s")),
            "preprocess_s": _round(extra.get("preprocess_s")),
            "time_to_first_token_s": _round(s.time_to_first_token_s if s else None),
            "prefill_tokens_per_s": _round(s.prefill_tokens_per_s if s else None),
            "decode_tokens_per_s": _round(s.decode_tokens_per_s if s else None),
        },
        "media": extra.get("media", []),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def stats_line(done: Finished) -> str:
    """One human line for -v and /stats."""
    t, u = result_json(done)["timings"], result_json(done)["usage"]
    f = lambda x, unit: "-" if x is None else f"{x:.2f}{unit}"
    return (f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens · load {f(t['load_s'], 's')} · "
            f"preprocess {f(t['preprocess_s'], 's')} · first token {f(t['time_to_first_token_s'], 's')} · "
            f"prefill {f(t['prefill_tokens_per_s'], ' tok/s')} · decode {f(t['decode_tokens_per_s'], ' tok/s')} · "
            f"{done.reason}")


class Renderer:
    """Base: drives a spinner on stderr for Status events; subclasses print the answer."""

    def __init__(self, quiet: bool = False, verbose: bool = False, hide_thinking: bool = False,
                 out: TextIO | None = None, err: Console | None = None):
        self.quiet, self.verbose, self.hide_thinking = quiet, verbose, hide_thinking
        self.out = out or sys.stdout
        self.err = err or stderr_console()
        self._spinner = None

    def status(self, message: str) -> None:
        self.stop_status()
        if self.quiet:
            return
        if self.err.is_terminal:
            self._spinner = self.err.status(message, spinner="dots")
            self._spinner.start()
        elif self.verbose:
            self.err.print(message)

    def stop_status(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def handle(self, event: Any) -> None:
        if isinstance(event, Status):
            return self.status(event.message)
        self.stop_status()
        if isinstance(event, TextDelta):
            self.on_text(event.text)
        elif isinstance(event, ThinkingDelta):
            self.on_thinking(event.text)
        elif isinstance(event, Finished):
            self.on_finished(event)

    def render(self, events) -> Finished | None:
        """Consume a whole event stream; returns the Finished event."""
        done = None
        try:
            for event in events:
                self.handle(event)
                done = event if isinstance(event, Finished) else done
        finally:
            self.close()
            if hasattr(events, "close"):
                events.close()  # a stream left early (stdout closed) stops its generation thread now
        return done

    def close(self) -> None:
        self.stop_status()

    def on_text(self, text: str) -> None: ...

    def on_thinking(self, text: str) -> None:
        if not (self.hide_thinking or self.quiet):
            self.err.print(text, style="dim", end="", markup=False)

    def on_finished(self, done: Finished) -> None:
        if done.reason == "interrupted" and not self.quiet:
            self.err.print("[interrupted]", style="yellow", markup=False)
        if self.verbose and not self.quiet:
            self.err.print(stats_line(done), style="dim", markup=False)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class PlainRenderer(Renderer):
    """The answer as plain text, flushed as it streams (piped stdout)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._ends_newline = True
        self._thought = False

    def on_thinking(self, text: str) -> None:
        self._thought = True
        super().on_thinking(text)

    def on_text(self, text: str) -> None:
        if self._thought and not (self.hide_thinking or self.quiet):
            self.err.print()
            self._thought = False
        if text:
            self._write(text)
            self._ends_newline = text.endswith("\n")

    def on_finished(self, done: Finished) -> None:
        if not self._ends_newline:
            self._write("\n")
            self._ends_newline = True
        if self._thought and not (self.hide_thinking or self.quiet):
            self.err.print()  # end the reasoning's line before anything else goes to stderr
            self._thought = False
        super().on_finished(done)


class MarkdownRenderer(PlainRenderer):
    """Live Markdown on a terminal stdout; falls back to PlainRenderer's manners otherwise."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.console = console(self.out)
        self._live = None
        self._text = ""

    def on_text(self, text: str) -> None:
        from rich.live import Live
        from rich.markdown import Markdown

        if self._thought and not (self.hide_thinking or self.quiet):
            self.err.print()
            self._thought = False
        self._text += text
        if self._live is None:
            self._live = Live(console=self.console, refresh_per_second=10, vertical_overflow="visible", transient=False)
            self._live.start()
        self._live.update(Markdown(self._text))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        super().close()

    def on_finished(self, done: Finished) -> None:
        self.close()
        Renderer.on_finished(self, done)


class JsonRenderer(Renderer):
    """One JSON object on stdout when generation ends."""

    def on_thinking(self, text: str) -> None:
        pass

    def on_finished(self, done: Finished) -> None:
        self._write(json.dumps(result_json(done), ensure_ascii=False) + "\n")
        super().on_finished(done)


class JsonLinesRenderer(JsonRenderer):
    """One JSON event per line as it happens: delta, thinking_delta, done."""

    def on_text(self, text: str) -> None:
        self._event({"type": "delta", "text": text})

    def on_thinking(self, text: str) -> None:
        self._event({"type": "thinking_delta", "text": text})

    def on_finished(self, done: Finished) -> None:
        self._event({"type": "done", **result_json(done)})
        Renderer.on_finished(self, done)

    def _event(self, obj: dict) -> None:
        self._write(json.dumps(obj, ensure_ascii=False) + "\n")


def make_renderer(fmt: str = "text", **kw) -> Renderer:
    """fmt: text | json | jsonl."""
    if fmt == "json":
        return JsonRenderer(**kw)
    if fmt == "jsonl":
        return JsonLinesRenderer(**kw)
    out = kw.get("out") or sys.stdout
    return MarkdownRenderer(**kw) if stdout_is_terminal(out) else PlainRenderer(**kw)
