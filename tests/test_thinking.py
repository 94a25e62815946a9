"""<think> splitting: chunk boundaries anywhere, template newlines trimmed."""

import random

import pytest

from processing.events import TextDelta, ThinkingDelta
from processing.thinking import ThinkSplitter


def _run(stream, start_in_thinking, chunks):
    sp = ThinkSplitter(start_in_thinking)
    events = [e for c in chunks(stream) for e in sp.feed(c)] + sp.finish()
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert (thinking, text) == (sp.thinking, sp.text)
    assert all(e.text for e in events)  # no empty deltas
    return thinking, text


def _chars(s):
    return list(s)


def _random_chunks(s, seed=0):
    rng, out, i = random.Random(seed), [], 0
    while i < len(s):
        n = rng.randint(1, 5)
        out.append(s[i:i + n])
        i += n
    return out


def _whole(s):
    return [s]


CHUNKERS = [_chars, _random_chunks, _whole]


@pytest.mark.parametrize("chunks", CHUNKERS)
def test_thinking_on_stream(chunks):
    # The model's output after a prompt ending in "<think>" (the template's reasoned-turn layout).
    stream = "\nFirst, 2+2.\n\nThat is 4.\n</think>\n\nThe answer is 4.\n"
    assert _run(stream, True, chunks) == ("First, 2+2.\n\nThat is 4.", "The answer is 4.\n")


@pytest.mark.parametrize("chunks", CHUNKERS)
def test_thinking_off_plain_answer(chunks):
    assert _run("Hello <b>there</b> <thin", False, chunks) == ("", "Hello <b>there</b> <thin")


@pytest.mark.parametrize("chunks", CHUNKERS)
def test_think_block_at_answer_start_is_recognised_only_there(chunks):
    stream = "\n<think>\nhmm\n</think>\n\nok, <think> is a tag"
    assert _run(stream, False, chunks) == ("hmm", "ok, <think> is a tag")


@pytest.mark.parametrize("chunks", CHUNKERS)
def test_unfinished_reasoning_and_partial_tag_flushed(chunks):
    assert _run("still thinking\n\n</thi", True, chunks) == ("still thinking\n\n</thi", "")


def test_newlines_inside_reasoning_kept_and_trailing_dropped_only_before_tag():
    sp = ThinkSplitter(True)
    ev = sp.feed("a\n\n")
    assert ev == [ThinkingDelta("a")]  # newlines held: they may precede </think>
    assert sp.feed("b") == [ThinkingDelta("\n\nb")]
    assert sp.feed("\n</think>x") == [TextDelta("x")]


def test_lookalike_tags_are_text():
    assert _run("</thinking> and </think", True, _chars) == ("</thinking> and </think", "")
    assert _run("<thinx>a", False, _chars) == ("", "<thinx>a")
