"""The renderer, fed a fake event stream in-process: what lands on stdout vs stderr, in each format."""

from __future__ import annotations

import io
import json

from rich.console import Console

from ernie_cli.engine import Status
from ernie_cli.render import JsonLinesRenderer, JsonRenderer, MarkdownRenderer, PlainRenderer, make_renderer
from model.generation.stats import GenerationStats
from processing.events import Finished, TextDelta, ThinkingDelta

ESC = "\x1b"
STATS = GenerationStats(prompt_tokens=17, completion_tokens=3, time_to_first_token_s=0.25,
                        prefill_tokens_per_s=68.0, decode_tokens_per_s=12.5, peak_memory_bytes=1 << 20)
MEDIA = [{"kind": "video", "path": "clip.mp4", "grid": [4, 2, 2], "tokens": 2, "timestamps": [0.0, 0.5, 1.0, 1.5]}]


def _events(reason="stop", thinking="let me see"):
    done = Finished(reason, STATS, "Hello **world**", thinking,
                    {"model": "ernie-tiny", "media": MEDIA, "load_s": 1.5, "preprocess_s": 0.125})
    return [Status("Preprocessing…"), ThinkingDelta("let me "), ThinkingDelta("see"), TextDelta("Hello "),
            TextDelta("**world**"), done]


def _render(cls, events, **kw):
    out, err = io.StringIO(), io.StringIO()
    renderer = cls(out=out, err=Console(file=err, force_terminal=False, no_color=True), **kw)
    done = renderer.render(events)
    return out.getvalue(), err.getvalue(), done


def test_plain_answer_on_stdout_thinking_on_stderr():
    out, err, done = _render(PlainRenderer, _events())
    assert out == "Hello **world**\n"  # raw text, newline-terminated, nothing else
    assert "let me see" in err and "Hello" not in err
    assert ESC not in out + err
    assert done.reason == "stop"


def test_hide_thinking_and_quiet_keep_stderr_clean():
    _, err, _ = _render(PlainRenderer, _events(), hide_thinking=True)
    assert "let me" not in err
    out, err, _ = _render(PlainRenderer, _events("interrupted"), quiet=True, verbose=True)
    assert err == "" and out == "Hello **world**\n"


def test_verbose_prints_stats_and_interruption_on_stderr():
    out, err, _ = _render(PlainRenderer, _events("interrupted"), verbose=True)
    assert "[interrupted]" in err
    assert "17 prompt + 3 completion tokens" in err and "12.50 tok/s" in err
    assert "17 prompt" not in out


def test_json_object_has_every_field():
    out, err, _ = _render(JsonRenderer, _events())
    obj = json.loads(out)  # exactly one object on stdout
    assert obj["text"] == "Hello **world**" and obj["thinking"] == "let me see"
    assert obj["model"] == "ernie-tiny" and obj["finish_reason"] == "stop"
    assert obj["usage"] == {"prompt_tokens": 17, "completion_tokens": 3}
    assert obj["timings"] == {"load_s": 1.5, "preprocess_s": 0.125, "time_to_first_token_s": 0.25,
                              "prefill_tokens_per_s": 68.0, "decode_tokens_per_s": 12.5}
    assert obj["media"] == MEDIA
    assert "let me" not in err  # thinking is in the object, not sprayed on stderr


def test_json_thinking_is_null_when_off():
    out, _, _ = _render(JsonRenderer, _events(thinking=None))
    assert json.loads(out)["thinking"] is None


def test_jsonl_streams_deltas_then_done():
    out, _, _ = _render(JsonLinesRenderer, _events())
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in lines] == ["thinking_delta", "thinking_delta", "delta", "delta", "done"]
    assert "".join(e["text"] for e in lines if e["type"] == "delta") == lines[-1]["text"]
    assert "".join(e["text"] for e in lines if e["type"] == "thinking_delta") == lines[-1]["thinking"]
    assert lines[-1]["usage"]["prompt_tokens"] == 17 and lines[-1]["media"] == MEDIA


def test_make_renderer_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(make_renderer(out=io.StringIO()), PlainRenderer)
    assert not isinstance(make_renderer(out=io.StringIO()), MarkdownRenderer)
    assert isinstance(make_renderer(out=Tty()), MarkdownRenderer)
    assert isinstance(make_renderer("json", out=Tty()), JsonRenderer)
    assert isinstance(make_renderer("jsonl", out=io.StringIO()), JsonLinesRenderer)


def test_markdown_renderer_renders_markdown_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    renderer = MarkdownRenderer(out=out, err=Console(file=io.StringIO()))
    renderer.console = Console(file=out, force_terminal=True, width=60)
    renderer.render(_events())
    text = out.getvalue()
    assert "world" in text and "**world**" not in text  # bold applied, markers gone
    assert ESC in text
