"""Typed events that generation hands to whoever renders it (CLI, JSON, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.generation.stats import GenerationStats


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer, safe to print (never a split multi-byte character)."""

    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of the model's reasoning (between <think> and </think>)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of one generation. reason: 'stop' (eos or stop string), 'length', 'interrupted'."""

    reason: str
    stats: GenerationStats | None = None
    text: str = ""
    thinking: str | None = None
    extra: dict = field(default_factory=dict)
