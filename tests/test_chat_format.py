"""The Python chat formatter reproduces jinja renderings of ERNIE's chat template byte for byte.

Goldens: tests/goldens/chat/chat_goldens.json, made by scripts/make_chat_goldens.py.
"""

import json
from pathlib import Path

import pytest

from model.errors import MediaError, ProcessorError
from processing.chat_format import collect_media, render_chat

GOLDENS = json.loads((Path(__file__).parent / "goldens" / "chat" / "chat_goldens.json").read_text(encoding="utf-8"))
CASES = GOLDENS["cases"]


def _render(case):
    kw = dict(case["kwargs"])
    return render_chat(case["messages"], add_generation_prompt=kw.pop("add_generation_prompt", True),
                       enable_thinking=kw.pop("enable_thinking", False))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_clean_template(case):
    assert _render(case) == case["clean"]


SINGLE = [c for c in CASES if c["single_user_turn"]]


@pytest.mark.parametrize("case", SINGLE, ids=[c["name"] for c in SINGLE])
def test_matches_converted_template_on_single_user_turns(case):
    assert _render(case) == case["hf"]


def test_goldens_cover_the_formats_features():
    names = {c["name"] for c in CASES}
    assert {"system_text", "multi_turn", "reasoning_field", "think_tags_in_content", "two_images", "video",
            "image_and_video", "text_thinking_on", "text_list", "text_string"} <= names
    assert len(SINGLE) >= 8
    # The converted template's defects really show up where the clean one differs.
    differing = [c for c in CASES if c["clean"] != c["hf"]]
    assert differing and all(not c["single_user_turn"] for c in differing)


def test_pictures_and_videos_numbered_separately_across_turns():
    img, vid = {"type": "image", "path": "a.png"}, {"type": "video", "path": "v.mp4"}
    text = render_chat([{"role": "user", "content": [img, vid, img]}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": [vid, img]}])
    assert [text.count(f"Picture {n}:") for n in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert [text.count(f"Video {n}:") for n in (1, 2, 3)] == [1, 1, 0]
    assert text.index("Video 2:") < text.index("Picture 3:")


def test_thinking_modes():
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat(msgs).endswith("\nAssistant: <think>\n\n</think>\n\n")
    assert render_chat(msgs, enable_thinking=True).endswith("\nAssistant: <think>")
    assert render_chat(msgs, enable_thinking=None).endswith("\nAssistant: ")
    assert render_chat(msgs, add_generation_prompt=False) == "<|begin_of_sentence|>User: x"


def test_collect_media_in_prompt_order_with_any_source():
    from PIL import Image

    pil = Image.new("RGB", (4, 4))
    frames = [pil, pil]
    msgs = [
        {"role": "system", "content": [{"type": "image", "image": pil}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "video", "video": frames, "fps": 2},
                                     {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                     {"type": "image", "image": b"\x89PNG"}]},
        {"role": "assistant", "content": [{"type": "image", "path": "ignored.png"}]},
        {"role": "user", "content": [{"type": "video_url", "url": "clip.mp4"}]},
    ]
    media = collect_media(msgs)
    assert [m.kind for m in media] == ["image", "video", "image", "image", "video"]
    assert media[0].source is pil and media[1].source is frames and media[1].options == {"fps": 2}
    assert media[2].source == "http://x/y.png" and media[3].source == b"\x89PNG" and media[4].source == "clip.mp4"
    # the prompt shows exactly as many slots as collect_media finds
    text = render_chat(msgs)
    assert text.count("<|IMAGE_PLACEHOLDER|>") == 3 and text.count("<|VIDEO_PLACEHOLDER|>") == 2


def test_bad_messages_raise_typed_errors():
    with pytest.raises(ProcessorError, match="expected a dict with 'role'"):
        render_chat([{"content": "no role"}])
    with pytest.raises(ProcessorError, match="list of messages"):
        render_chat("hello")
    with pytest.raises(MediaError, match="has no source"):
        collect_media([{"role": "user", "content": [{"type": "image"}]}])
