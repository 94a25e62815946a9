"""OpenAI's chat wire format, both ways, without a model or a socket (ernie_cli/openai_api.py)."""

from __future__ import annotations

import pytest

from ernie_cli.openai_api import (ApiError, chunk_json, completion_json, media_label, parse_chat_request,
                                  request_body, usage_json)
from ernie_cli.settings import GenerationSettings, Message, Part


def parse(**body):
    return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body})


def test_string_and_part_contents_become_messages_with_media_refs():
    chat = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                     {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]},
        {"role": "assistant", "content": "A cat.", "reasoning_content": "Fur, whiskers."},
        {"role": "user", "content": "Sure?"}]})
    system, first, answer, last = chat.messages
    assert (system.role, system.text) == ("system", "Be brief.")
    assert [p.kind for p in first.parts] == ["text", "image", "video"]
    assert [(ref.kind, ref.url) for _, ref in chat.media] == [("image", "https://x/y.png"),
                                                             ("video", "data:video/mp4;base64,AAAA")]
    assert first.parts[2].source == "data:video/mp4"  # inline data is named by its type, not its bytes
    assert (answer.role, answer.text, answer.thinking) == ("assistant", "A cat.", "Fur, whiskers.")
    assert last.text == "Sure?" and chat.model == "m" and not chat.stream


def test_sampling_fields_map_onto_settings():
    chat = parse(max_completion_tokens=7, max_tokens=99, temperature=0.5, top_p=0.9, top_k=40, min_p=0.1,
                 repetition_penalty=1.2, seed=3, stop="END", stream=True, stream_options={"include_usage": True},
                 chat_template_kwargs={"enable_thinking": True}, user="ignored", presence_penalty=0)
    s = chat.settings
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty, s.seed, s.stop,
            s.think) == (7, 0.5, 0.9, 40, 0.1, 1.2, 3, ("END",), True)
    assert chat.stream and chat.include_usage


@pytest.mark.parametrize("top_k", [-1, 0])
def test_top_k_off_values_mean_unset(top_k):
    assert parse(top_k=top_k).settings.top_k is None


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"seed": "1"}, "seed"), ({"stop": ["a", 3]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["s"] * 17}, "stop"),
    ({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"stream_options": {}}, "stream_options"),
    ({"stream": "yes"}, "stream"), ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking"),
    ({"model": 5}, "model"),
])
def test_bad_fields_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param, e.value.message


@pytest.mark.parametrize("messages, needle", [
    (None, "messages"), ([], "found an empty array"), ("hi", "messages"), ([["user", "hi"]], "messages[0]"),
    ([{"role": "tool", "content": "x"}], "role"), ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": None}], "found null"), ([{"role": "user"}], "content must be"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}], "http(s)"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": "https://x"}]},
      {"role": "user", "content": "?"}], "only user messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
])
def test_bad_messages_are_400(messages, needle):
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": messages})
    assert e.value.status == 400 and needle in e.value.message


def test_errors_have_openai_shape():
    assert ApiError(404, "no such model", param="model", code="model_not_found").to_json() == {
        "error": {"message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"}}
    assert ApiError(503, "busy").to_json()["error"]["type"] == "server_error"


def test_completion_and_chunks():
    chat = parse(stream=True, stream_options={"include_usage": True})
    usage = usage_json(10, 3)
    assert usage == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    whole = completion_json(chat, "m", "A cat.", None, "interrupted", usage)
    assert whole["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "A cat.",
                                                           "reasoning_content": None},
                                   "logprobs": None, "finish_reason": "abort"}
    assert whole["id"] == chat.id and whole["object"] == "chat.completion"
    delta = chunk_json(chat, "m", {"content": "A"})
    assert delta["choices"][0]["finish_reason"] is None and delta["usage"] is None
    last = chunk_json(chat, "m", None, usage=usage)
    assert last["choices"] == [] and last["usage"] == usage
    quiet = parse(stream=True)
    assert "usage" not in chunk_json(quiet, "m", {"content": "A"})


def test_request_body_round_trips_through_the_parser():
    settings = GenerationSettings(max_new_tokens=5, temperature=0.7, top_k=3, stop=("x",), think=False, seed=1)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    body = request_body("m", messages, settings)
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 5
    back = parse_chat_request(body)
    assert back.settings == settings and back.model == "m" and back.include_usage


def test_media_label():
    assert media_label("data:image/png;base64,AAAA") == "data:image/png"
    assert media_label("https://x/y.png") == "https://x/y.png"


def test_wire_messages_inline_media(tmp_path):
    from ernie_cli.remote import wire_messages

    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = wire_messages([Message("user", [Part("text", "look"), Part("image", str(png), "a.png")]),
                         Message("assistant", [Part("text", "ok")], "hmm"), Message("user", [Part("text", "and?")])])
    assert out[0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert out[1] == {"role": "assistant", "content": "ok", "reasoning_content": "hmm"}
    assert out[2] == {"role": "user", "content": "and?"}
