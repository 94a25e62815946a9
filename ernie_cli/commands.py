"""Bodies of `ernie describe` (and the input helpers `ernie chat` shares): validate, load, render."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from ernie_cli.media import MediaInput, MediaResolver, reads_stdin
from ernie_cli.settings import GenerationSettings, LoadOptions, MediaOptions, Message, Part, default_prompt, user_message
from model.errors import ErnieError, MediaError


def read_text_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ErnieError(f"{what} file {path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise ErnieError(f"{what} file {path} is a directory; expected a text file",
                         hint="pass the file inside it") from None
    except UnicodeDecodeError:
        raise ErnieError(f"{what} file {path} is not UTF-8 text", hint="save it as UTF-8") from None


def system_prompt(system: str | None, system_file: Path | None) -> Message | None:
    text = read_text_file(system_file, "system prompt").strip() if system_file else system
    return Message("system", [Part("text", text)]) if text else None


def resolve_media(refs: list[str], resolver: MediaResolver) -> list[MediaInput]:
    if refs.count("-") > 1:
        raise MediaError("`-` (stdin) can be given only once")
    return [resolver.resolve(ref) for ref in refs]


def describe_prompt(prompt: str | None, prompt_file: Path | None, media: list[MediaInput], stdin_free: bool,
                    quiet: bool = False) -> str:
    """--prompt, else --prompt-file, else a prompt piped to stdin (when no media came from it), else a default."""
    if prompt is not None:
        return prompt
    if prompt_file is not None:
        return read_text_file(prompt_file, "prompt").strip()
    piped = stdin_prompt(quiet) if stdin_free else None
    return piped or default_prompt([m.kind for m in media])


STDIN_WAIT_S = 1.0  # a pipe silent this long gets a note on stderr saying what ernie waits for


def stdin_prompt(quiet: bool = False) -> str | None:
    """The prompt on stdin, read only where it was meant for ernie (README, "Prompt from stdin"):

    - a pipe (`echo question | ernie describe x.jpg`): read to its end; if it stays silent for a second, a note
      on stderr says so (`sleep 30 | ernie describe x.jpg` is not a silent wait);
    - a regular file, only when ernie has all of it (`ernie describe x.jpg < question.txt`): a file a shell loop
      is reading line by line (`while read f; do ernie describe "$f"; done < list.txt`) is past its start, and
      is left alone;
    - a terminal, /dev/null or another device: not read.
    """
    if sys.stdin is None:
        return None
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            if os.lseek(fd, 0, os.SEEK_CUR) != 0:
                return None
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            if not quiet and not _readable_within(fd, STDIN_WAIT_S):
                print("ernie: waiting for the prompt on stdin (pass -p, or </dev/null, not to read it)…",
                      file=sys.stderr, flush=True)
        else:
            return None
        return sys.stdin.read().strip() or None
    except (OSError, ValueError):  # a closed or odd stdin: no prompt from it
        return None


def _readable_within(fd: int, seconds: float) -> bool:
    import select

    try:
        return bool(select.select([fd], [], [], seconds)[0])
    except (OSError, ValueError):  # no select() on this kind of file (Windows pipes)
        return True


def run_describe(media_refs: list[str], *, prompt, prompt_file, system, system_file, load: LoadOptions,
                 media_options: MediaOptions, settings: GenerationSettings, fmt: str, quiet: bool, verbose: bool,
                 hide_thinking: bool) -> None:
    from ernie_cli.engines import make_engine
    from ernie_cli.render import make_renderer

    uses_stdin = any(map(reads_stdin, media_refs))  # then the prompt does not come from stdin
    with MediaResolver(sys.stdin.buffer if "-" in media_refs and not sys.stdin.isatty() else None) as resolver:
        media = resolve_media(media_refs, resolver)  # streamed media live in the resolver's store until the end
        conversation = [m for m in (system_prompt(system, system_file),) if m]
        conversation.append(user_message(describe_prompt(prompt, prompt_file, media, not uses_stdin, quiet), media))
        renderer = make_renderer(fmt, quiet=quiet, verbose=verbose, hide_thinking=hide_thinking)
        engine = make_engine(load.server)
        renderer.status(load.status_line())
        try:
            engine.load(load, media_options)
        finally:
            renderer.stop_status()
        done = renderer.render(engine.generate(conversation, settings))
    if done is not None and done.reason == "interrupted":
        raise KeyboardInterrupt
