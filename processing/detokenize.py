"""Token ids -> text, one token at a time, safe to print as it comes.

`StreamDecoder.push(id)` returns the text that became final with that token:

* never half a character: byte-fallback tokens (`<0xE4>`, ...) and multi-token characters are
  held until they decode completely (no trailing U+FFFD);
* decoding restarts from a recent token, not from the beginning (O(1) work per token), yet joined
  deltas equal the full decode: each step decodes the same window twice (without and with the new
  tokens) and emits the difference, so decoder rules that depend on the position in the window
  (a Metaspace decoder dropping a leading space) apply equally to both;
* text that could be the start of a stop string is held back until it either completes the stop
  string (then `stopped` is set and the stop string and everything after it are dropped) or
  cannot anymore.
"""

from __future__ import annotations

from typing import Iterable

_INCOMPLETE = "\ufffd"


class StreamDecoder:
    """Incremental detokenizer with stop strings.

    skip_special_tokens drops the tokenizer's special tokens except those in `keep` (by default
    `<think>` / `</think>`, which the thinking splitter needs to see).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop_strings: Iterable[str] = (),
                 keep: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        if keep is None:
            keep = [i for i in (tokenizer.think_start_id, tokenizer.think_end_id) if i is not None]
        self._skip = frozenset(tokenizer.special_ids) - frozenset(keep) if skip_special_tokens else frozenset()
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here are already emitted (as far as the decoder is concerned)
        self._held = ""  # decoded text held back for stop strings
        self.stopped = False
        self.stop_string: str | None = None
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text now safe to emit ('' when nothing new, or after a stop)."""
        if self.stopped:
            return ""
        if int(token_id) in self._skip:
            return ""
        self._ids.append(int(token_id))
        return self._release(self._decoded_delta(final=False), final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def finish(self) -> str:
        """Flush everything held back (an unfinished character decodes as the full decode would)."""
        if self.stopped:
            return ""
        return self._release(self._decoded_delta(final=True), final=True)

    # --- internals ---------------------------------------------------------------------------------

    def _decoded_delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        after = self.tokenizer.decode(self._ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(_INCOMPLETE)):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def _release(self, delta: str, final: bool) -> str:
        buf = self._held + delta
        hits = [(buf.find(s), s) for s in self.stop_strings if s in buf]
        if hits:
            at, stop = min(hits)
            self.stopped, self.stop_string, self._held = True, stop, ""
            return self._emit(buf[:at])
        keep = 0 if final else _partial_stop_len(buf, self.stop_strings)
        self._held = buf[len(buf) - keep:] if keep else ""
        return self._emit(buf[:len(buf) - keep])

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
