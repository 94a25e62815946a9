"""Re-capture the terminal pictures in docs/ from real `ernie` runs inside tmux.

Run from the repository root with ernie installed (`pip install -e .`) and tmux present:

    python scripts/capture_docs.py

Each scene types its commands into a fresh tmux session (a real pseudo-terminal, 100 columns),
waits for the prompt to come back, and saves the pane as plain text (docs/NAME.txt) and as an
SVG rendered by rich from the pane's colours (docs/NAME.svg).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PROMPT = "$ "

# (name, [(keys typed, text to wait for after them)])
SCENES = {
    "describe": [("ernie describe shapes.png --model ernie-tiny -v", PROMPT)],
    "json": [("ernie describe red-circle-left-to-right.mp4 --model ernie-tiny --json | python3 -m json.tool",
              PROMPT)],
    "chat": [
        ("ernie chat shapes.png --model ernie-tiny", ">>> "),
        ("Describe this image.", ">>> "),
        ("/video red-circle-left-to-right.mp4", ">>> "),
        ("Describe this video.", ">>> "),
        ("/stats", ">>> "),
        ("/save chat.json", ">>> "),
    ],
}


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def prompts(session: str, needle: str) -> tuple[int, bool]:
    """How many lines start with the prompt, and whether the last line is a bare prompt.

    capture-pane drops trailing spaces, so a waiting prompt shows as e.g. ">>>" or "$".
    """
    lines = [ln for ln in tmux("capture-pane", "-p", "-t", session).splitlines() if ln.strip()]
    mark = needle.strip()
    return sum(ln.startswith(mark) for ln in lines), bool(lines) and lines[-1].strip() == mark


def wait_for(session: str, needle: str, seen: int, timeout: float = 90.0) -> None:
    """Until a new bare prompt appears (the command before it has finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count, waiting = prompts(session, needle)
        if count > seen and waiting:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{session}: no new {needle.strip()!r} prompt after {timeout:.0f} s")


def run_scene(name: str, steps: list[tuple[str, str]], workdir: Path) -> str:
    session = f"ernie-docs-{name}"
    shell = f"env -i PATH={shutil.which('ernie').rsplit('/', 1)[0]}:/usr/bin:/bin TERM=xterm-256color " \
            f"HOME={workdir} PS1='{PROMPT}' bash --norc --noprofile"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "40", "-c", str(workdir), shell)
    try:
        tmux("send-keys", "-t", session, "clear", "Enter")
        time.sleep(0.5)
        for keys, needle in steps:
            seen = prompts(session, needle)[0]
            tmux("send-keys", "-t", session, keys, "Enter")
            wait_for(session, needle, seen)
        return tmux("capture-pane", "-p", "-e", "-t", session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def save(name: str, ansi: str) -> None:
    text = Text.from_ansi(ansi.rstrip("\n"))
    (DOCS / f"{name}.txt").write_text(text.plain + "\n", encoding="utf-8")
    console = Console(record=True, width=100, file=open("/dev/null", "w"), force_terminal=True)
    console.print(text)
    (DOCS / f"{name}.svg").write_text(console.export_svg(title=f"ernie {name}"), encoding="utf-8")


def main() -> int:
    if not shutil.which("tmux") or not shutil.which("ernie"):
        print("needs tmux and an installed `ernie` on PATH", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for f in ("shapes.png", "red-circle-left-to-right.mp4"):
            shutil.copy(ROOT / "examples" / f, work / f)
        for name, steps in SCENES.items():
            save(name, run_scene(name, steps, work))
            print(f"wrote docs/{name}.txt and docs/{name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
