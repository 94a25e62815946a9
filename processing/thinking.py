"""Split a streamed answer into reasoning (`<think>...</think>`) and the answer proper.

The chat format writes a reasoned turn as `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; the
splitter undoes that: newlines right after `<think>` and right before `</think>` are trimmed from
the reasoning, newlines right after `</think>` from the answer (as the template's strip/lstrip do).
Tags may arrive split over any number of chunks (a chunk can be a single character): text that
could be the start of a tag is held back until it is known not to be one.

With thinking on, the prompt already ends in `<think>`, so the stream starts in reasoning
(`start_in_thinking=True`). With thinking off the stream starts in the answer; a `<think>` tag is
still recognised there, but only before any answer text.
"""

from __future__ import annotations

from processing.events import TextDelta, ThinkingDelta

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    def __init__(self, start_in_thinking: bool):
        self.in_thinking = start_in_thinking
        self._pending = ""  # unprocessed text (may hold a partial tag)
        self._newlines = ""  # reasoning newlines held: they are dropped if </think> follows
        self._at_start = True  # nothing emitted yet in the current segment
        self.thinking_parts: list[str] = []
        self.text_parts: list[str] = []

    @property
    def thinking(self) -> str:
        return "".join(self.thinking_parts)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def feed(self, chunk: str) -> list[TextDelta | ThinkingDelta]:
        out: list[TextDelta | ThinkingDelta] = []
        self._pending += chunk
        while True:
            tag = self._tag()
            at = self._pending.find(tag) if tag else -1
            if at < 0 or (tag == OPEN and self._pending[:at].strip()):
                break  # an opening tag counts only before any answer text
            self._emit(self._pending[:at], out, segment_ends=True)
            self._pending = self._pending[at + len(tag):]
            self.in_thinking = tag == OPEN
            self._at_start = True
        tag = self._tag()
        if tag == OPEN and OPEN in self._pending:
            tag = None  # found above but preceded by answer text: plain text
        hold = _partial_len(self._pending, tag) if tag else 0
        self._emit(self._pending[:len(self._pending) - hold], out, segment_ends=False)
        self._pending = self._pending[len(self._pending) - hold:]
        return out

    def finish(self) -> list[TextDelta | ThinkingDelta]:
        """Flush held text (a partial tag at the very end is ordinary text)."""
        out: list[TextDelta | ThinkingDelta] = []
        self._emit(self._pending, out, segment_ends=True)
        self._pending = ""
        return out

    def _tag(self) -> str | None:
        if self.in_thinking:
            return CLOSE
        return OPEN if self._at_start else None

    def _emit(self, text: str, out: list, segment_ends: bool) -> None:
        if self._at_start:
            text = text.lstrip("\n")
        if self.in_thinking:
            text = self._newlines + text
            kept = text.rstrip("\n")
            self._newlines = "" if segment_ends else text[len(kept):]
            text = kept
        if not text:
            return
        self._at_start = False
        if self.in_thinking:
            self.thinking_parts.append(text)
            out.append(ThinkingDelta(text))
        else:
            self.text_parts.append(text)
            out.append(TextDelta(text))


def _partial_len(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
