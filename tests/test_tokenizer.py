"""The tokenizer wrapper and the tiny test tokenizer (tests/helpers/tokenizer.py)."""

import json
from pathlib import Path

import pytest

from model.config import tiny
from model.errors import ProcessorError
from processing.tokenizer import ErnieTokenizer
from tests.helpers.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, make_tiny_processor_dir
from tests.tiny_configs import TOKEN_IDS

GOLDENS = json.loads((Path(__file__).parent / "goldens" / "chat" / "chat_goldens.json").read_text(encoding="utf-8"))
TEXTS = ["Hello world", "你好，世界！", "dog 🐶 and cat 🐱 ∑ ¿qué? naïve", "\n\n  spaces   and\ttabs\n",
         "<think>\nreason\n</think>\n\nanswer", "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", "😀" * 3,
         "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok", "time: 00:00:01.50"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_processor_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return ErnieTokenizer.from_dir(tiny_dir)


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_dir):
    again = make_tiny_processor_dir(tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_special_ids_match_tiny_model_configs(tok):
    assert len(tok) == VOCAB_SIZE == tiny().text.vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(11))
    assert tok.multimodal_ids == TOKEN_IDS
    cfg = tiny()
    assert (cfg.image_token_id, cfg.video_token_id, cfg.image_start_token_id) == (
        tok.token_id("image_token"), tok.token_id("video_token"), tok.token_id("image_start_token"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert (tok.think_start_id, tok.think_end_id) == (9, 10)
    assert tok.eos_token_ids == (2,)
    assert tok.special_ids == frozenset(range(11))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE for i in ids)


def test_byte_fallback_and_special_tokens(tok):
    ids = tok.encode("🐶")
    assert [tok.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x90>", "<0xB6>"]
    ids = tok.encode("a<|IMAGE_PLACEHOLDER|>b</think>")
    assert 3 in ids and 10 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids, skip_special_tokens=True, keep=[10]) == "ab</think>"


@pytest.mark.parametrize("case", GOLDENS["cases"], ids=[c["name"] for c in GOLDENS["cases"]])
def test_ids_match_reference_golden(tok, case):
    """tiny_ids: transformers 5.23 AutoTokenizer on the same tiny tokenizer (scripts/make_chat_goldens.py)."""
    assert tok.encode(case["clean"]) == case["tiny_ids"]


def test_generation_config_eos_added(tmp_path):
    d = make_tiny_processor_dir(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10]}))
    assert ErnieTokenizer.from_dir(d).eos_token_ids == (2, 10)


def test_named_tokens_under_model_specific_key(tmp_path):
    d = make_tiny_processor_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    named = {k: cfg.pop(k) for k in list(cfg) if k.endswith("_token") and k.startswith(("image", "video"))}
    cfg["model_specific_special_tokens"] = {k: {"content": v} for k, v in named.items()}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ErnieTokenizer.from_dir(d).multimodal_ids == TOKEN_IDS


def test_missing_tokenizer_json_points_at_revision(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    with pytest.raises(ProcessorError, match="no tokenizer.json") as e:
        ErnieTokenizer.from_dir(tmp_path)
    assert "refs/pr/10" in e.value.hint


def test_bad_files_raise_processor_error(tmp_path):
    d = make_tiny_processor_dir(tmp_path)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ProcessorError, match="not valid JSON"):
        ErnieTokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"image_token": "<|NOT_THERE|>"}))
    with pytest.raises(ProcessorError, match="NOT_THERE"):
        ErnieTokenizer.from_dir(d)
    (d / "tokenizer.json").write_text("garbage")
    with pytest.raises(ProcessorError, match="could not be loaded"):
        ErnieTokenizer.from_dir(d)


@pytest.mark.reference
def test_live_parity_with_transformers(tok, tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert ref.image_token_id == tok.token_id("image_token") and ref.video_token_id == tok.token_id("video_token")
    assert set(ref.all_special_ids) == set(tok.special_ids)
    for text in TEXTS:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
