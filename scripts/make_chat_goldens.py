"""Render ERNIE chat-template goldens into tests/goldens/chat/.

Reads the two reference templates (/work/shared/reference/chat_template_{clean,hf}.jinja, or
--reference DIR), renders every conversation below with jinja2's sandboxed environment
(trim_blocks=True, lstrip_blocks=True: how transformers 5.23 renders chat templates), and writes
tests/goldens/chat/chat_goldens.json plus copies of both templates (tests read only these copies).

Run:  .venv/bin/python scripts/make_chat_goldens.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "goldens" / "chat"

IMG = {"type": "image", "path": "cat.png"}
IMG_URL = {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}}
VID = {"type": "video", "path": "clip.mp4"}
VID_URL = {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}


def _t(text: str) -> dict:
    return {"type": "text", "text": text}


SYSTEM = {"role": "system", "content": "You are a multimodal AI assistant called ERNIE."}

# name -> (messages, template kwargs). "single" marks a single user turn without system prompt,
# where the clean and the converted (hf) template must agree.
CASES: dict[str, tuple[list, dict]] = {
    "text_string": ([{"role": "user", "content": "Hello, who are you?"}], {}),
    "text_list": ([{"role": "user", "content": [_t("Hello"), _t(" there")]}], {}),
    "text_thinking_off": ([{"role": "user", "content": "2+2?"}], {"enable_thinking": False}),
    "text_thinking_on": ([{"role": "user", "content": "2+2?"}], {"enable_thinking": True}),
    "no_generation_prompt": ([{"role": "user", "content": "Hi"}], {"add_generation_prompt": False}),
    "image_then_text": ([{"role": "user", "content": [IMG, _t("Describe it.")]}], {}),
    "dog_question": ([{"role": "user", "content": [_t("What kind of dog is this?"), IMG_URL]}], {}),
    "two_images": ([{"role": "user", "content": [IMG, _t("and"), IMG_URL, _t("compare")]}], {}),
    "video": ([{"role": "user", "content": [VID, _t("What happens?")]}], {}),
    "image_and_video": ([{"role": "user", "content": [IMG, VID_URL, _t("Same scene?"), IMG]}], {"enable_thinking": True}),
    "cjk_emoji": ([{"role": "user", "content": "你好，世界 🐶 ¿qué?"}], {}),
    "newlines_text": ([{"role": "user", "content": "line one\n\nline two\n"}], {}),
    "system_text": ([SYSTEM, {"role": "user", "content": "Hi"}], {}),
    "system_list": ([{"role": "system", "content": [_t("Be brief.")]}, {"role": "user", "content": [IMG, _t("?")]}], {}),
    "multi_turn": ([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ], {}),
    "multi_turn_media_numbering": ([
        SYSTEM,
        {"role": "user", "content": [IMG, VID, _t("first")]},
        {"role": "assistant", "content": [_t("A cat "), _t("and a clip.")]},
        {"role": "user", "content": [IMG_URL, VID_URL, _t("second")]},
    ], {"enable_thinking": False}),
    "reasoning_field": ([
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "reasoning_content": "\nBecause of physics.\n", "content": "\nIt falls."},
        {"role": "user", "content": "And then?"},
    ], {"enable_thinking": True}),
    "reasoning_field_list": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "reasoning_content": [_t("step 1"), _t(", step 2")], "content": [_t("A")]},
        {"role": "user", "content": "Q2"},
    ], {}),
    "think_tags_in_content": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nLet me think.\n\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "Sure?"},
    ], {}),
    "think_close_only": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "reasoning without open tag</think>\n\nanswer"},
    ], {"add_generation_prompt": False}),
    "empty_think_in_content": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nplain answer"},
        {"role": "user", "content": "Q2"},
    ], {}),
    "assistant_last_no_prompt": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ], {"add_generation_prompt": False}),
    "two_users_in_a_row": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}),
    "unknown_role_ignored": ([{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}], {}),
}


def _render(env, template: str, messages: list, kwargs: dict) -> str:
    return env.from_string(template).render(messages=messages, add_generation_prompt=kwargs.get(
        "add_generation_prompt", True), **{k: v for k, v in kwargs.items() if k != "add_generation_prompt"})


def _tiny_tokenizer_ids(texts: list[str]) -> list[list[int]] | None:
    """The reference tokenizer's ids for `texts` on the tiny test tokenizer, or None without transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    import tempfile

    sys.path.insert(0, str(ROOT))
    from tests.helpers.tokenizer import make_tiny_processor_dir

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(make_tiny_processor_dir(tmp))
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="/work/shared/reference", type=Path)
    args = parser.parse_args()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    templates = {name: (args.reference / f"chat_template_{name}.jinja").read_text(encoding="utf-8")
                 for name in ("clean", "hf")}
    OUT.mkdir(parents=True, exist_ok=True)
    for name in templates:
        shutil.copyfile(args.reference / f"chat_template_{name}.jinja", OUT / f"chat_template_{name}.jinja")
    cases = []
    for name, (messages, kwargs) in CASES.items():
        single = len(messages) == 1 and messages[0]["role"] == "user"
        cases.append({"name": name, "messages": messages, "kwargs": kwargs, "single_user_turn": single,
                      **{name_: _render(env, t, messages, kwargs) for name_, t in templates.items()}})
    tiny_ids = _tiny_tokenizer_ids([c["clean"] for c in cases])
    if tiny_ids is not None:
        for case, ids in zip(cases, tiny_ids):
            case["tiny_ids"] = ids
    golden = {
        "source": "scripts/make_chat_goldens.py: jinja2 ImmutableSandboxedEnvironment(trim_blocks=True, "
                  "lstrip_blocks=True) over /work/shared/reference/chat_template_{clean,hf}.jinja",
        "command": ".venv/bin/python scripts/make_chat_goldens.py",
        "versions": {"python": sys.version.split()[0], "jinja2": version("jinja2"),
                     "transformers": version("transformers") if tiny_ids is not None else None},
        "tiny_ids": "clean rendering tokenized by transformers' AutoTokenizer on tests/helpers/tokenizer.py's "
                    "tiny tokenizer (present when transformers was installed)",
        "cases": cases,
    }
    (OUT / "chat_goldens.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT / 'chat_goldens.json'}")


if __name__ == "__main__":
    main()
