"""ERNIE 4.5 VL's chat format, written out in Python.

    <|begin_of_sentence|>{system}\\n
    User: {text, with Picture N:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> inline}
    \\nAssistant: {answer}<|end_of_sentence|>                      (a past assistant turn)
    \\nAssistant: <think>\\n{reasoning}\\n</think>\\n\\n{answer}<|end_of_sentence|>   (with reasoning)
    \\nAssistant: <think>\\n\\n</think>\\n\\n                           (generation prompt, thinking off)
    \\nAssistant: <think>                                         (generation prompt, thinking on)

This is the "clean" form of the template that transformers writes into converted checkpoints: the
same output without that template's two whitespace defects (12 stray spaces after a system prompt
and before past assistant turns, and `<|end_of_sentence |>` with a space). Pictures and videos are
numbered separately, across the whole conversation. tests/goldens/chat/ holds jinja renderings
this module must reproduce byte for byte.

Messages: {"role": "system" | "user" | "assistant", "content": str | [item, ...]} where an item is
{"type": "text", "text": ...}, {"type": "image" | "image_url", <source>} or
{"type": "video" | "video_url", <source>}; the source sits under "image"/"video", "path", "url",
or OpenAI's {"image_url": {"url": ...}}, and may be a path, URL, PIL image, raw bytes, or (video) a
list of frames. Assistant messages may carry `reasoning_content`, or `<think>...</think>` in content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.errors import MediaError, ProcessorError

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
IMAGE_SLOT = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
VIDEO_SLOT = "<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"
THINKING_OFF_PROMPT = "<think>\n\n</think>\n\n"
THINKING_ON_PROMPT = "<think>"

IMAGE_TYPES = ("image", "image_url")
VIDEO_TYPES = ("video", "video_url")
_SOURCE_KEYS = {"image": ("image", "image_url", "path", "url"), "video": ("video", "video_url", "path", "url")}


@dataclass
class MediaItem:
    """One picture or video of the conversation, in order; `options` are its other item keys."""

    kind: str  # "image" | "video"
    source: Any
    options: dict = field(default_factory=dict)


def render_chat(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool | None = False) -> str:
    """The prompt string for `messages` (see the module docstring for the format).

    enable_thinking: False (default) closes an empty <think> block so the model answers directly;
    True opens <think> so it reasons first; None adds no think tag at all.
    """
    counts = {"image": 0, "video": 0}
    parts = [BOS]
    for message in _checked(messages):
        role = message["role"]
        if role in ("system", "user"):
            parts.append("User: " if role == "user" else "")
            parts.append(_render_content(message.get("content"), counts))
            parts.append("\n" if role == "system" else "")
        elif role == "assistant":
            parts.append(_render_assistant(message))
    if add_generation_prompt:
        parts.append("\nAssistant: ")
        if enable_thinking is False:
            parts.append(THINKING_OFF_PROMPT)
        elif enable_thinking is True:
            parts.append(THINKING_ON_PROMPT)
    return "".join(parts)


def collect_media(messages: list[dict]) -> list[MediaItem]:
    """Pictures and videos in the order the prompt shows them (system and user turns only)."""
    found = []
    for message in _checked(messages):
        content = message.get("content")
        if message["role"] not in ("system", "user") or isinstance(content, str) or content is None:
            continue
        for item in content:
            kind = _media_kind(item)
            if kind is not None:
                found.append(MediaItem(kind, _source(item, kind), _options(item, kind)))
    return found


def split_reasoning(content: str, reasoning: str) -> tuple[str, str]:
    """(reasoning, answer) of a past assistant turn; `<think>..</think>` in content wins, as in the template."""
    if "</think>" in content:
        head, _, _ = content.partition("</think>")
        reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    return reasoning, content


# --- helpers ---------------------------------------------------------------------------------------

def _checked(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ProcessorError(f"a conversation is a list of messages, found {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ProcessorError(f"message {i} is {message!r}; expected a dict with 'role' and 'content'",
                                 hint='write messages as {"role": "user", "content": "..."}')
    return list(messages)


def _render_content(content: Any, counts: dict[str, int]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for item in content:
        if not isinstance(item, dict):
            raise ProcessorError(f"content item {item!r} is not a dict; expected e.g. {{'type': 'text', 'text': ...}}")
        kind = item.get("type")
        if kind == "text":
            out.append(_text(item.get("text")))
        elif kind in IMAGE_TYPES:
            counts["image"] += 1
            out.append(f"Picture {counts['image']}:{IMAGE_SLOT}")
        elif kind in VIDEO_TYPES:
            counts["video"] += 1
            out.append(f"Video {counts['video']}:{VIDEO_SLOT}")
    return "".join(out)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _text_only(field_value: Any) -> str:
    """The text items of an assistant field joined (media in assistant turns are not rendered)."""
    if isinstance(field_value, str):
        return field_value
    if isinstance(field_value, (list, tuple)):
        return "".join(_text(i.get("text")) for i in field_value if isinstance(i, dict) and i.get("type") == "text")
    return ""


def _render_assistant(message: dict) -> str:
    reasoning, answer = split_reasoning(_text_only(message.get("content")), _text_only(message.get("reasoning_content")))
    if reasoning:
        return f"\nAssistant: <think>\n{reasoning.strip(chr(10))}\n</think>\n\n{answer.lstrip(chr(10))}{EOS}"
    return f"\nAssistant: {answer}{EOS}"


def _media_kind(item: Any) -> str | None:
    kind = item.get("type") if isinstance(item, dict) else None
    return "image" if kind in IMAGE_TYPES else "video" if kind in VIDEO_TYPES else None


def _source(item: dict, kind: str) -> Any:
    for key in _SOURCE_KEYS[kind]:
        value = item.get(key)
        if isinstance(value, dict) and "url" in value:
            value = value["url"]
        if value is not None:
            return value
    raise MediaError(f"{kind} item {sorted(item)} has no source; expected one of the keys "
                     f"{list(_SOURCE_KEYS[kind])}", hint=f'write {{"type": "{kind}", "path": "file"}}')


def _options(item: dict, kind: str) -> dict:
    return {k: v for k, v in item.items() if k != "type" and k not in _SOURCE_KEYS[kind]}
