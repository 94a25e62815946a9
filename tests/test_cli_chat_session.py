"""The REPL's command parser and session state, driven in-process by a scripted engine."""

from __future__ import annotations

import json
import os

import pytest

from ernie_cli.chat import ChatError, ChatSession, Command, parse_command
from ernie_cli.settings import GenerationSettings, Message, Part
from model.errors import ErnieError, MediaError
from processing.events import Finished, TextDelta
from tests.helpers.media import encode, make_image, make_video


class ScriptedEngine:
    """Answers "answer N" (N = how many times it was asked); records what it was given."""

    name = "scripted"

    def __init__(self, reason="stop"):
        self.calls: list[tuple[list[dict], GenerationSettings]] = []
        self.reason = reason

    def generate(self, conversation, settings, cancel=None):
        self.calls.append(([m.to_json() for m in conversation], settings))
        text = f"answer {len(self.calls)}"
        yield TextDelta(text[:3])
        yield TextDelta(text[3:])
        yield Finished(self.reason, None, text if self.reason == "stop" else text[:3], None, {})


def _drain(events):
    return list(events)


@pytest.fixture
def session():
    return ChatSession(ScriptedEngine(), GenerationSettings())


@pytest.fixture
def media(tmp_path):
    (tmp_path / "cat.png").write_bytes(encode(make_image("RGB"), "PNG"))
    make_video(tmp_path / "clip.mp4", frames=6)
    return tmp_path


@pytest.mark.parametrize("line,expected", [
    ("hello there", None),
    ("/image cat.png", Command("image", "cat.png")),
    ("  /SET temperature=0.5 top_k=3 ", Command("set", "temperature=0.5 top_k=3")),
    ("/quit", Command("exit")),
    ("/exit", Command("exit")),
    ("//not a command", None),
])
def test_parse_command(line, expected):
    assert parse_command(line) == expected


def test_unknown_command_is_an_error():
    with pytest.raises(ChatError, match="/frobnicate"):
        parse_command("/frobnicate now")


def test_ask_keeps_history_and_attaches_pending_media(session, media):
    session.run(Command("image", str(media / "cat.png")))
    session.run(Command("video", str(media / "clip.mp4")))
    _drain(session.ask("what is this?"))
    _drain(session.ask("and now?"))
    first, second = (c[0] for c in session.engine.calls)
    assert [p["type"] for p in first[0]["content"]] == ["text", "image", "video"]
    assert first[0]["content"][1]["image"] == str(media / "cat.png")
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"][0]["text"] == "answer 1"
    assert [p["type"] for p in second[2]["content"]] == ["text"]  # media went with the first message only


def test_attach_checks_kind_and_existence(session, media):
    with pytest.raises(ChatError, match="video"):
        session.run(Command("image", str(media / "clip.mp4")))
    with pytest.raises(MediaError, match="no such file"):
        session.run(Command("image", str(media / "nope.png")))
    assert session.pending == []


def test_set_and_think_reach_the_engine(session):
    session.run(Command("set", "temperature=0.7 top-k=5 stop=END,STOP"))
    session.run(Command("think", "on"))
    _drain(session.ask("hi"))
    settings = session.engine.calls[0][1]
    assert settings.temperature == 0.7 and settings.top_k == 5 and settings.stop == ("END", "STOP")
    assert settings.think is True
    assert settings.overrides() == {"temperature": 0.7, "top_k": 5}


@pytest.mark.parametrize("arg,needle", [("temperature=warm", "number"), ("colour=blue", "unknown"),
                                        ("temperature", "KEY=VALUE")])
def test_set_rejects_bad_values(session, arg, needle):
    with pytest.raises(ChatError, match=needle):
        session.run(Command("set", arg))
    assert session.settings == GenerationSettings()


@pytest.mark.parametrize("arg", ["top_p=5", "temperature=-1", "max_new_tokens=0", "thinking_budget=0",
                                 "top_k=3 repetition_penalty=0"])
def test_set_refuses_values_out_of_bounds_and_keeps_every_setting(session, arg):
    session.run(Command("set", "top_k=7"))
    with pytest.raises(ChatError, match="must be") as caught:
        session.run(Command("set", arg))
    assert "settings unchanged" in str(caught.value) and caught.value.hint
    assert session.settings == GenerationSettings(top_k=7)


def test_set_takes_quoted_values_with_spaces(session):
    session.run(Command("set", 'stop="blue square" temperature=0'))
    assert session.settings.stop == ("blue square",) and session.settings.temperature == 0


class FailingEngine(ScriptedEngine):
    """Fails (as over the context) until told not to."""

    fail = True

    def generate(self, conversation, settings, cancel=None):
        if self.fail:
            from model.errors import ContextLengthError

            raise ContextLengthError("over the context")
        yield from super().generate(conversation, settings, cancel)


def test_a_failed_turn_is_taken_back_with_its_media_pending(media):
    session = ChatSession(FailingEngine(), GenerationSettings())
    session.run(Command("image", str(media / "cat.png")))
    with pytest.raises(ErnieError):
        _drain(session.ask("first"))
    assert session.history == [] and [p.kind for p in session.pending] == ["image"]
    session.engine.fail = False
    _drain(session.ask("again"))
    assert [p["type"] for p in session.engine.calls[-1][0][0]["content"]] == ["text", "image"]
    assert session.pending == []


def test_a_failed_regen_keeps_the_previous_answer():
    session = ChatSession(FailingEngine(), GenerationSettings())
    session.engine.fail = False
    _drain(session.ask("question"))
    session.engine.fail = True
    with pytest.raises(ErnieError):
        _drain(session.regen())
    assert [m.text for m in session.history] == ["question", "answer 1"]


def test_system_undo_clear(session):
    session.run(Command("system", "Be brief."))
    _drain(session.ask("one"))
    _drain(session.ask("two"))
    assert session.engine.calls[-1][0][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    session.run(Command("undo"))
    assert [m.text for m in session.history] == ["one", "answer 1"]
    session.run(Command("clear"))
    assert session.history == [] and session.system is not None
    with pytest.raises(ChatError):
        session.run(Command("undo"))


def test_regen_replaces_the_last_answer(session):
    _drain(session.ask("question"))
    _drain(session.regen())
    first, second = (c[0] for c in session.engine.calls)
    assert first == second  # the model saw the same conversation, without its old answer
    assert [m.text for m in session.history] == ["question", "answer 2"]


def test_interrupted_answer_stays_in_history():
    session = ChatSession(ScriptedEngine(reason="interrupted"), GenerationSettings())
    events = _drain(session.ask("long story please"))
    assert events[-1].reason == "interrupted"
    assert [m.role for m in session.history] == ["user", "assistant"]
    assert session.history[-1].text == "ans"


def test_save_then_load_round_trips(session, media, tmp_path):
    session.run(Command("system", "Be brief."))
    session.run(Command("set", "temperature=0.3 seed=7"))
    session.run(Command("image", str(media / "cat.png")))
    _drain(session.ask("describe"))
    target = tmp_path / "chats" / "t.json"
    session.run(Command("save", str(target)))
    saved = json.loads(target.read_text())
    assert saved["version"] == 1 and saved["settings"] == {"temperature": 0.3, "seed": 7}
    assert [f for f in os.listdir(target.parent)] == ["t.json"]  # no temp file left behind

    other = ChatSession(ScriptedEngine(), GenerationSettings())
    other.run(Command("load", str(target)))
    assert [m.to_json() for m in other.conversation()] == [m.to_json() for m in session.conversation()]
    assert other.settings == session.settings
    _drain(other.ask("more"))
    assert other.engine.calls[0][0][:3] == [m.to_json() for m in session.conversation()]


def test_save_is_atomic(session, tmp_path, monkeypatch):
    target = tmp_path / "t.json"
    target.write_text("previous")
    _drain(session.ask("hi"))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        session.run(Command("save", str(target)))
    assert target.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["t.json"]


def test_load_rejects_foreign_files_and_missing_media(session, tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ChatError, match="not an ernie transcript"):
        session.run(Command("load", str(tmp_path / "x.json")))
    with pytest.raises(ChatError, match="no such transcript"):
        session.run(Command("load", str(tmp_path / "missing.json")))
    gone = {"version": 1, "messages": [Message("user", [Part("text", "hi"), Part("image", "/gone.png")]).to_json()]}
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    with pytest.raises(MediaError, match="gone.png"):
        session.run(Command("load", str(tmp_path / "gone.json")))
    assert session.history == []  # a failed load changes nothing


def test_help_lists_every_command(session):
    text = session.run(Command("help"))
    for name in ("/image", "/video", "/system", "/set", "/think", "/clear", "/undo", "/regen", "/save", "/load",
                 "/stats", "/help", "/exit", '"""'):
        assert name in text


def test_tab_completes_commands_and_paths(media, monkeypatch):
    readline = pytest.importorskip("readline")
    from ernie_cli.chat import _complete

    def completions(line, text):
        monkeypatch.setattr(readline, "get_line_buffer", lambda: line)
        out, state = [], 0
        while (match := _complete(text, state)) is not None:
            out.append(match)
            state += 1
        return out

    assert completions("/vi", "/vi") == ["/video "]
    assert completions(f"/image {media}/ca", f"{media}/ca") == [f"{media}/cat.png"]
    assert completions(f"/video {media}/", f"{media}/") == [f"{media}/cat.png", f"{media}/clip.mp4"]
    assert completions("hello wor", "wor") == []
