"""Domain objects the commands build from flags, and the places ernie keeps state.

Torch-free and Typer-free: the engine, the renderer and the REPL all speak these types.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from model.env import env_flag

TINY_MODEL = "ernie-tiny"
DEFAULT_MODEL = "baidu/ERNIE-4.5-VL-28B-A3B-PT"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = ("int8", "int4")
DEFAULT_HINT = "ERNIE_DEBUG=1 shows where it failed"  # for the rare error that brings no hint of its own
GENERATION_THREAD = "ernie-generate"  # the engine's worker; app.main() checks for a live one before exiting


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: low <= value (or low < value when low_open), value <= high."""

    low: float
    high: float | None = None
    low_open: bool = False

    def rule(self) -> str:
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)


# One set of bounds for flags, ERNIE_* variables, chat's /set and /load, checked before anything loads.
BOUNDS = {
    "max_new_tokens": Bound(1), "temperature": Bound(0), "top_p": Bound(0, 1, low_open=True), "top_k": Bound(0),
    "min_p": Bound(0, 1), "repetition_penalty": Bound(0, low_open=True), "thinking_budget": Bound(1),
    "fps": Bound(0, low_open=True), "max_frames": Bound(2), "max_pixels": Bound(28 * 28),
}


def range_problem(name: str, value: float | None) -> str | None:
    """What is wrong with `name=value` under BOUNDS ("top_p must be in (0, 1], got 5"), or None when it is fine."""
    bound = BOUNDS.get(name)
    if value is None or bound is None or bound.accepts(value):
        return None
    return f"{name} must be {bound.rule()}, got {value:g}"


def check_ranges(obj: Any) -> None:
    """ValueError naming the first field of a settings dataclass that is out of its bounds."""
    for f in fields(obj):
        problem = range_problem(f.name, getattr(obj, f.name))
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class LoadOptions:
    """Which model to load and where."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offline: bool | None = None
    server: str | None = None  # an OpenAI-compatible server's URL: generate there instead (ernie_cli/remote.py)
    api_key: str | None = None  # its bearer key
    quantize: str | None = None  # "int8" / "int4": weight-only, quantized while loading

    def status_line(self) -> str:
        """What the spinner says while the model loads (or, with --server, while ernie finds it)."""
        if not self.server:
            return f"Loading {self.model}…"
        return f"Connecting to {self.server}…" if self.model == DEFAULT_MODEL else f"Connecting to {self.server} ({self.model})…"


@dataclass(frozen=True)
class MediaOptions:
    """Processor overrides; None keeps the checkpoint's own preprocessor config."""

    fps: float | None = None
    max_frames: int | None = None
    timestamps: bool = True
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        check_ranges(self)


# Fields of GenerationSettings that map 1:1 onto the checkpoint's generation config.
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class GenerationSettings:
    """What the user asked for; None means "the checkpoint's generation_config.json decides"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    think: bool | None = None  # None: the checkpoint's habit (Thinking variants think)
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    def overrides(self) -> dict[str, Any]:
        """The sampling fields the user set, ready for GenerationConfig.replace()."""
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}

    def with_setting(self, name: str, raw: str) -> "GenerationSettings":
        """Parse `name=raw` as typed by a user (`/set temperature=0.7`); ValueError names the problem."""
        kinds = {f.name: f.type for f in fields(self)}
        if name not in kinds or name == "think":
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(settable_names())}")
        if raw.lower() in ("", "none", "default"):
            return replace(self, **{name: () if name == "stop" else None})
        if name == "stop":
            return replace(self, stop=tuple(s for s in raw.split(",") if s))
        cast = int if "int" in str(kinds[name]) else float
        try:
            value = cast(raw)
        except ValueError:
            raise ValueError(f"{name} expects {'an integer' if cast is int else 'a number'}, got {raw!r}") from None
        return replace(self, **{name: value})

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}


def settable_names() -> list[str]:
    return [f.name for f in fields(GenerationSettings) if f.name != "think"]


@dataclass
class Part:
    """One piece of a user message: text, or a media reference (path or URL, as the user gave it)."""

    kind: str  # "text" | "image" | "video"
    value: str  # the text, or a checked local file path
    source: str | None = None  # media only: the path or URL as the user gave it

    @property
    def ref(self) -> str:
        return self.source or self.value


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    parts: list[Part] = field(default_factory=list)
    thinking: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.value for p in self.parts if p.kind == "text")

    @property
    def media(self) -> list[Part]:
        return [p for p in self.parts if p.kind != "text"]

    def to_json(self) -> dict[str, Any]:
        content = [{"type": "text", "text": p.value} if p.kind == "text" else {"type": p.kind, p.kind: p.ref}
                   for p in self.parts]
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.thinking:
            out["thinking"] = self.thinking
        return out

    def to_processor(self) -> dict[str, Any]:
        """The message as the processor's chat format takes it (media by local path)."""
        if self.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": self.text}
            if self.thinking:
                out["reasoning_content"] = self.thinking
            return out
        content = [{"type": "text", "text": p.value} if p.kind == "text" else {"type": p.kind, "path": p.value}
                   for p in self.parts if p.kind != "text" or p.value]
        return {"role": self.role, "content": content}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Message":
        parts = [Part(c["type"], c["text" if c["type"] == "text" else c["type"]]) for c in raw["content"]]
        return cls(raw["role"], parts, raw.get("thinking"))


def user_message(prompt: str, media: list) -> Message:
    """The user turn: prompt text first, then the media (MediaInput) in order."""
    return Message("user", [Part("text", prompt)] + [Part(m.kind, str(m.path), m.source) for m in media])


def default_prompt(kinds: list[str]) -> str:
    if not kinds:
        return "Hello."
    if all(k == "video" for k in kinds):
        return "Describe this video." if len(kinds) == 1 else "Describe these videos."
    if all(k == "image" for k in kinds):
        return "Describe this image." if len(kinds) == 1 else "Describe these images."
    return "Describe these images and videos."


# --- where state lives ---------------------------------------------------------------------------

def ernie_home() -> Path:
    """$ERNIE_HOME, else $XDG_STATE_HOME/ernie, else ~/.local/state/ernie."""
    if os.environ.get("ERNIE_HOME"):
        return Path(os.environ["ERNIE_HOME"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "ernie"


def history_path() -> Path:
    return ernie_home() / "history"


def debug_enabled() -> bool:
    return env_flag("ERNIE_DEBUG")
