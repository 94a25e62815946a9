"""Streaming detokenizer: deltas joined == full decode; stop strings caught across tokens."""

import pytest

from processing.detokenize import StreamDecoder
from processing.tokenizer import ErnieTokenizer
from tests.helpers.tokenizer import make_tiny_processor_dir

TEXTS = ["Hello world, the dog is here.", "你好，世界！我们的时间", "dog 🐶🐱 emoji 👩‍👩‍👧 family", "naïve ∑ 𝔘 ok\n\nend",
         "<think>\nreason\n</think>\n\nanswer", "a" * 50 + "🐶"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ErnieTokenizer.from_dir(make_tiny_processor_dir(tmp_path_factory.mktemp("detok")))


def _stream(dec, ids):
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.finish())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_joined_deltas_equal_full_decode(tok, text):
    ids = tok.encode(text)
    deltas = _stream(StreamDecoder(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_held_until_complete(tok):
    ids = tok.encode("🐶")  # four byte-fallback tokens
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "", "", "🐶"]


def test_truncated_character_flushed_as_full_decode_does(tok):
    ids = tok.encode("ok🐶")[:-1]
    deltas = _stream(StreamDecoder(tok), ids)
    assert "".join(deltas) == tok.decode(ids) and deltas[-1].endswith("\ufffd")


def test_special_tokens_skipped_but_think_tags_kept(tok):
    ids = [1] + tok.encode("<think>x</think>y") + [3, 2]
    assert "".join(_stream(StreamDecoder(tok), ids)) == "<think>x</think>y"
    assert "".join(_stream(StreamDecoder(tok, keep=()), ids)) == "xy"
    assert "".join(_stream(StreamDecoder(tok, skip_special_tokens=False), ids)) == tok.decode(ids)


def test_stop_string_spanning_tokens(tok):
    text = "The answer is 4.\nUser: next question"
    ids = tok.encode(text)
    dec = StreamDecoder(tok, stop_strings=["\nUser:"])
    deltas = _stream(dec, ids)
    assert "".join(deltas) == "The answer is 4." == dec.text
    assert dec.stopped and dec.stop_string == "\nUser:"
    assert len(tok.encode("\nUser:")) > 1


def test_stop_string_prefix_held_then_released(tok):
    ids = tok.encode("ab\nUs ok")
    dec = StreamDecoder(tok, stop_strings=["\nUser:"])
    emitted = []
    for i in ids:
        emitted.append(dec.push(i))
        assert not dec.text.endswith("\nUs")  # a possible stop prefix is never emitted early
    emitted.append(dec.finish())
    assert "".join(emitted) == "ab\nUs ok" and not dec.stopped


def test_earliest_stop_wins_and_nothing_after_stop(tok):
    dec = StreamDecoder(tok, stop_strings=["world", "lo w"])
    out = "".join(_stream(dec, tok.encode("Hello world and more")))
    assert out == "Hel" and dec.stop_string == "lo w"
    assert dec.push(tok.encode("x")[0]) == ""


def test_stop_string_inside_multibyte_stream(tok):
    dec = StreamDecoder(tok, stop_strings=["世界"])
    assert "".join(_stream(dec, tok.encode("你好世界🐶"))) == "你好" and dec.stopped
