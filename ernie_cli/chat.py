"""`ernie chat`: a REPL that keeps the model loaded.

Three layers, each testable alone: `parse_command` (text -> Command), `ChatSession` (state: history,
pending media, settings; every slash command is a method), `run_chat` (the terminal loop: readline
history and path completion, \"\"\" multi-line input, Ctrl-C stops an answer, twice exits).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import shlex
import threading
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ernie_cli.commands import system_prompt
from ernie_cli.media import MediaResolver
from ernie_cli.settings import (DEFAULT_HINT, GenerationSettings, LoadOptions, MediaOptions, Message, Part,
                                history_path, settable_names)
from model.errors import ErnieError

TRANSCRIPT_VERSION = 1
HELP = """\
/image PATH      attach an image (path or URL) to your next message
/video PATH      attach a video to your next message
/system [TEXT]   set the system prompt (no text: clear it)
/set KEY=VALUE   change a setting: {settings}
/think on|off    let the model reason before answering
/clear           forget the conversation (keeps the system prompt)
/undo            drop the last exchange
/regen           answer the last message again
/save FILE       write the conversation as JSON
/load FILE       read a conversation saved with /save
/stats           show the last answer's statistics
/help            this text
/exit            leave (also Ctrl-D, or Ctrl-C twice)
\"\"\"              start and end a multi-line message"""
COMMANDS = ("image", "video", "system", "set", "think", "clear", "undo", "regen", "save", "load", "stats", "help",
            "exit", "quit")


class ChatError(ErnieError):
    """A slash command the session cannot carry out; the REPL prints it and carries on."""


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """`/name arg` -> Command; None for a plain message. Unknown commands raise ChatError."""
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, arg = stripped[1:].partition(" ")
    name = name.lower()
    if name not in COMMANDS:
        raise ChatError(f"unknown command /{name}", hint="type /help for the list")
    return Command("exit" if name == "quit" else name, arg.strip())


class ChatSession:
    """Conversation state and the slash commands that change it. Prints nothing: returns feedback text."""

    def __init__(self, engine, settings: GenerationSettings, system: Message | None = None,
                 resolver: MediaResolver | None = None):
        self.engine, self.settings, self.system = engine, settings, system
        self.history: list[Message] = []
        self.pending: list[Part] = []
        self.resolver = resolver or MediaResolver()
        self.last = None  # the last Finished event

    # --- asking ---------------------------------------------------------------------------------
    def conversation(self) -> list[Message]:
        return ([self.system] if self.system else []) + self.history

    def ask(self, text: str, cancel: threading.Event | None = None):
        """Add the user turn (with pending media) and stream the answer's events.

        A turn that fails (bad media, over the context...) is taken back whole: the message leaves the history
        and its media are pending again, so the retry carries them.
        """
        pending, self.pending = self.pending, []
        self.history.append(Message("user", [Part("text", text)] + pending))
        return self._answer(cancel, undo=lambda: self._take_back(pending))

    def _take_back(self, pending: list[Part]) -> None:
        if self.history and self.history[-1].role == "user":
            self.history.pop()
        self.pending = pending + self.pending

    def _answer(self, cancel: threading.Event | None, undo: Callable[[], None]):
        try:
            with closing(self.engine.generate(self.conversation(), self.settings, cancel)) as events:
                for event in events:
                    if type(event).__name__ == "Finished":
                        self.last = event
                        self.history.append(Message("assistant", [Part("text", event.text)], event.thinking))
                    yield event
        except ErnieError:
            undo()
            raise

    def regen(self, cancel: threading.Event | None = None):
        """Answer the last user message again; if that fails, the previous answer stays."""
        previous = self.history.pop() if self.history and self.history[-1].role == "assistant" else None
        if not self.history or self.history[-1].role != "user":
            if previous is not None:
                self.history.append(previous)
            raise ChatError("nothing to regenerate: send a message first", hint="type a message, then /regen")
        return self._answer(cancel, undo=lambda: previous is not None and self.history.append(previous))

    # --- commands -------------------------------------------------------------------------------
    def run(self, cmd: Command) -> str:
        """Carry out a non-generating command; returns what to tell the user."""
        return getattr(self, f"cmd_{cmd.name}")(cmd.arg)

    def cmd_image(self, arg: str) -> str:
        return self._attach(arg, "image")

    def cmd_video(self, arg: str) -> str:
        return self._attach(arg, "video")

    def _attach(self, arg: str, kind: str) -> str:
        if not arg:
            raise ChatError(f"/{kind} needs a path or URL", hint=f"/{kind} photo.{'jpg' if kind == 'image' else 'mp4'}")
        media = self.resolver.resolve(arg)
        if media.kind != kind:
            raise ChatError(f"{arg} is {_a(media.kind)}, not {_a(kind)}", hint=f"use /{media.kind} {arg}")
        self.pending.append(Part(kind, str(media.path), arg))
        return f"attached {kind} {arg} to your next message ({len(self.pending)} pending)"

    def cmd_system(self, arg: str) -> str:
        self.system = Message("system", [Part("text", arg)]) if arg else None
        return "system prompt set" if arg else "system prompt cleared"

    def cmd_set(self, arg: str) -> str:
        """KEY=VALUE pairs, shell-quoted where a value has spaces (`/set stop="blue square"`); all or nothing."""
        keys = f"keys: {', '.join(settable_names())}"
        try:
            pairs = shlex.split(arg)
        except ValueError as e:
            raise ChatError(f"/set could not parse {arg!r} ({e})",
                            hint='quote values with spaces: stop="a b"') from None
        if not pairs or any("=" not in pair for pair in pairs):
            raise ChatError("/set expects KEY=VALUE", hint=keys)
        settings = self.settings
        for pair in pairs:
            key, _, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            try:
                settings = settings.with_setting(key, value.strip())
            except ValueError as e:  # unknown key, not a number, out of bounds: the old settings stay
                if key not in settable_names():
                    raise ChatError(f"{e}; settings unchanged", hint=keys) from None
                now = getattr(self.settings, key)
                now = "the checkpoint default" if now in (None, ()) else now
                raise ChatError(f"{e}; settings unchanged", hint=f"{key} stays {now}") from None
        self.settings = settings
        return "settings: " + ", ".join(f"{k}={v}" for k, v in settings.describe().items())

    def cmd_think(self, arg: str) -> str:
        if arg.lower() not in ("on", "off"):
            raise ChatError("/think expects on or off", hint="/think on")
        self.settings = replace(self.settings, think=arg.lower() == "on")
        return f"thinking {arg.lower()}"

    def cmd_clear(self, arg: str) -> str:
        self.history, self.pending = [], []
        return "conversation cleared"

    def cmd_undo(self, arg: str) -> str:
        if not self.history:
            raise ChatError("nothing to undo", hint="the conversation is empty")
        if self.history[-1].role == "assistant":
            self.history.pop()
        if self.history and self.history[-1].role == "user":
            self.history.pop()
        return f"removed the last exchange ({len(self.history) // 2} left)"

    def cmd_save(self, arg: str) -> str:
        if not arg:
            raise ChatError("/save needs a file name", hint="/save chat.json")
        save_transcript(Path(arg).expanduser(), self)
        return f"saved {len(self.history)} messages to {arg}"

    def cmd_load(self, arg: str) -> str:
        if not arg:
            raise ChatError("/load needs a file name", hint="/load chat.json")
        load_transcript(Path(arg).expanduser(), self)
        return f"loaded {len(self.history)} messages from {arg}"

    def cmd_stats(self, arg: str) -> str:
        from ernie_cli.render import stats_line

        return stats_line(self.last) if self.last else "no answer yet"

    def cmd_help(self, arg: str) -> str:
        return HELP.format(settings=", ".join(settable_names()))


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "image" else f"a {kind}"


# --- transcripts ---------------------------------------------------------------------------------------

def save_transcript(path: Path, session: ChatSession) -> None:
    """Write atomically: a temp file in the same directory, then os.replace.

    Local media are stored by absolute path, so the transcript loads from any directory; URLs stay URLs.
    """
    data = {"version": TRANSCRIPT_VERSION, "model": getattr(session.engine, "name", None),
            "settings": session.settings.describe(),
            "messages": [_portable(m).to_json() for m in session.conversation()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _portable(message: Message) -> Message:
    """The message with each local media reference made absolute (what /save writes)."""
    parts = [p if p.kind == "text" or "://" in p.ref else Part(p.kind, p.value, os.path.abspath(p.value))
             for p in message.parts]
    return Message(message.role, parts, message.thinking)


def load_transcript(path: Path, session: ChatSession) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = [Message.from_json(m) for m in data["messages"]]
        settings = GenerationSettings(**{**data.get("settings", {}), "stop": tuple(data.get("settings", {}).get("stop", ()))})
    except FileNotFoundError:
        raise ChatError(f"no such transcript: {path}", hint="/load a file written by /save") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ChatError(f"{path} is not an ernie transcript ({type(e).__name__}: {e})",
                        hint="load files written by /save") from None
    for m in messages:  # media references must still resolve; downloads land in a fresh temp dir
        for p in m.media:
            p.value = str(session.resolver.resolve(p.ref).path)
    session.system = messages[0] if messages and messages[0].role == "system" else None
    session.history = messages[1:] if session.system else messages
    session.settings, session.pending = settings, []


# --- the terminal loop ---------------------------------------------------------------------------------

def run_chat(media_refs: list[str], *, system, system_file, load: LoadOptions, media_options: MediaOptions,
             settings: GenerationSettings, quiet: bool, verbose: bool, hide_thinking: bool) -> None:
    from ernie_cli.engines import make_engine
    from ernie_cli.render import make_renderer, stderr_console

    with MediaResolver() as resolver:  # downloads live in its store for the whole session, removed at exit
        session = ChatSession(make_engine(load.server), settings, system_prompt(system, system_file), resolver)
        for ref in media_refs:
            session.pending.append(_part(session.resolver.resolve(ref)))
        err = stderr_console()
        renderer = make_renderer(quiet=quiet, verbose=verbose, hide_thinking=hide_thinking)
        renderer.status(load.status_line())
        try:
            session.engine.load(load, media_options)
        finally:
            renderer.stop_status()
        new_renderer = lambda: make_renderer(quiet=quiet, verbose=verbose, hide_thinking=hide_thinking)
        if sys.stdin.isatty():
            return _interactive(session, err, new_renderer, quiet)
        _piped(session, err, new_renderer)


def _piped(session: ChatSession, err, new_renderer: Callable) -> None:
    """Messages from a pipe: one per line, \"\"\" blocks and slash commands as in the REPL; /exit ends it."""
    lines = (line.rstrip("\n") for line in sys.stdin)

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    while True:
        try:
            text = _read_message(read)
        except EOFError:
            return
        if text.strip() and not _handle(text, session, err, new_renderer):
            return


def _part(media) -> Part:
    return Part(media.kind, str(media.path), media.source)


def _handle(text: str, session: ChatSession, err, new_renderer: Callable) -> bool:
    """One input: a command or a message. Returns False when the user asked to leave."""
    try:
        cmd = parse_command(text)
        if cmd and cmd.name == "exit":
            return False
        if cmd and cmd.name == "regen":
            new_renderer().render(session.regen())
        elif cmd:
            try:
                err.print(session.run(cmd), markup=False, highlight=False)
            except KeyboardInterrupt:  # at a terminal, a slow `/image URL` say: drop it and keep the session
                if not sys.stdin.isatty():
                    raise
                err.print("(cancelled)", style="dim")
        else:
            new_renderer().render(session.ask(text[1:] if text.startswith("//") else text))
    except ErnieError as e:  # a bad command, bad media, over the context...: report, keep the session
        err.print(f"error: {e}\nhint: {e.hint or DEFAULT_HINT}", style="red", markup=False)
    return True


def _interactive(session: ChatSession, err, new_renderer: Callable, quiet: bool) -> None:
    history = _setup_readline()
    if not quiet:
        err.print(f"ernie chat · {session.engine.name} · /help for commands, Ctrl-D to leave", style="dim")
    interrupted_once = False
    try:
        while True:
            try:
                text = _read_message()
            except KeyboardInterrupt:
                if interrupted_once:
                    err.print()
                    raise
                interrupted_once = True
                err.print("\n(Ctrl-C again or Ctrl-D to leave)", style="dim")
                continue
            except EOFError:
                err.print()
                return
            interrupted_once = False
            if text.strip() and not _handle(text, session, err, new_renderer):
                return
    finally:
        _save_history(history)


def _read_message(read: Callable[[str], str] = input) -> str:
    """One message; a line starting with \"\"\" opens a block that ends at a line ending with \"\"\".

    `read(prompt)` gives the next line (EOFError at the end): input() in the REPL, the next piped line otherwise.
    """
    line = read(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    body = line.lstrip()[3:]
    if body.strip() and body.rstrip().endswith('"""'):  # \"\"\"one line\"\"\"
        return body.rstrip()[:-3]
    lines = [body]
    while len(lines) == 1 or not lines[-1].rstrip().endswith('"""'):
        lines.append(read("... "))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n")


def _setup_readline() -> Path | None:
    try:
        import readline
    except ImportError:  # no readline (some Windows/Pythons): plain input()
        return None
    readline.set_completer_delims(" \t\n")
    readline.set_completer(_complete)
    readline.parse_and_bind("tab: complete")
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        return None
    readline.set_history_length(2000)
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        readline.write_history_file(path)
    except OSError:
        pass


def _complete(text: str, state: int) -> str | None:
    import glob
    import readline

    line = readline.get_line_buffer()
    if line.startswith(("/image ", "/video ", "/save ", "/load ")):
        matches = [m + ("/" if os.path.isdir(m) else "") for m in glob.glob(os.path.expanduser(text) + "*")]
    elif line.startswith("/") and " " not in line:
        matches = [f"/{c} " for c in COMMANDS if f"/{c}".startswith(text)]
    else:
        matches = []
    return sorted(matches)[state] if state < len(matches) else None
