"""A tiny ERNIE-style tokenizer + processor directory, built in ~0.1 s, for tests.

`make_tiny_processor_dir(dir)` writes the text and processor files of a converted (transformers
format) ERNIE 4.5 VL checkpoint, shrunk: a 1024-token byte-fallback BPE trained on a seeded
synthetic corpus (so any UTF-8 text, CJK and emoji included, round-trips), with ERNIE's special
tokens at the fixed ids that tests/tiny_configs.py uses. Both `processing.processor.ErnieVLProcessor`
and transformers' `AutoProcessor` load the directory.

Layout of the vocabulary (ids):
  0..10   special tokens (SPECIAL_TOKENS below, in order)
  11..266 byte-fallback tokens <0x00>..<0xFF>
  267..   learned BPE pieces (spaces written as "▁", as in ERNIE's SentencePiece vocabulary)
"""

from __future__ import annotations

import importlib.resources
import json
import random
import shutil
from pathlib import Path

VOCAB_SIZE = 1024

SPECIAL_TOKENS = (
    "<unk>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>",
    "<|IMAGE_END|>", "<|VIDEO_START|>", "<|VIDEO_END|>", "<|VIDEO_PLACEHOLDER|>", "<think>", "</think>",
)
TOKEN_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

# Named tokens, as the transformers conversion script writes them into tokenizer_config.json.
NAMED_TOKENS = {
    "image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>",
}

PACKAGE_FONT = Path(str(importlib.resources.files("ernie_cli") / "assets" / "ernie-tiny" / "DejaVuSans.ttf"))
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:/Windows/Fonts/arial.ttf",
)

_WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who its now find "
    "long down day did get come made may part dog cat picture video image describe frame answer think"
).split()
_CJK = "你好世界我们的是不在人有这中大为上个国和地到以说时要就出会可也对生能而子那得于着下自之年过发后作里用道行所然家"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TEMPLATE_PHRASES = ("User: What kind of dog is this?", "Assistant: ", "Picture 1:", "Video 1:", "time: 00:00:01.50")


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        toks = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.6:
                toks.append(rng.choice(_WORDS))
            elif r < 0.8:
                toks.append("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 7))))
            elif r < 0.9:
                toks.append("".join(rng.choice(_CJK) for _ in range(rng.randint(1, 4))))
            else:
                toks.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(toks) + rng.choice([".", "?", "!", ",", ":", ""]))
    return lines + list(_TEMPLATE_PHRASES) * 20


def build_tiny_tokenizer():
    """The tiny `tokenizers.Tokenizer` (deterministic: same corpus, same merges, same ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_bytes = 256
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - n_bytes, special_tokens=list(SPECIAL_TOKENS),
                                  limit_alphabet=200, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    draft.train_from_iterator(_corpus(), trainer)
    learned = json.loads(draft.to_str())["model"]
    # Re-number: specials first, then the 256 byte-fallback tokens, then the learned pieces.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b for b in range(n_bytes)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, f"tiny tokenizer has {len(vocab)} tokens, expected {VOCAB_SIZE}"
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(chat_template: str | None) -> dict:
    config = {
        "tokenizer_class": "TokenizersBackend",
        "model_max_length": 4096,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<|begin_of_sentence|>",
        "eos_token": "<|end_of_sentence|>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "extra_special_tokens": list(SPECIAL_TOKENS[3:]),
        **NAMED_TOKENS,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor_config(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 6177) -> dict:
    return {
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "patch_size": 14, "temporal_patch_size": 1,
        "merge_size": 2, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "image_mean": _MEAN, "image_std": _STD, "image_processor_type": "Ernie4_5_VLMoeImageProcessor",
    }


def video_processor_config(font_name: str, min_pixels: int = 299 * 28 * 28, max_pixels: int = 1196 * 28 * 28,
                           min_frames: int = 16, max_frames: int = 180) -> dict:
    return {
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "font": font_name,
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_sample_frames": True, "return_metadata": False,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_frames": min_frames,
        "max_frames": max_frames, "draw_on_frames": True, "image_mean": _MEAN, "image_std": _STD,
        "video_processor_type": "Ernie4_5_VLMoeVideoProcessor",
    }


def find_font() -> Path:
    """A TrueType font for the video processor to draw timestamps with: a system font when this
    machine has one, else the one the package ships with ernie-tiny (DejaVu Sans)."""
    for candidate in _FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return PACKAGE_FONT


def _chat_template() -> str:
    return (Path(__file__).resolve().parent.parent / "goldens" / "chat" / "chat_template_clean.jinja").read_text(
        encoding="utf-8")


def make_tiny_processor_dir(directory: str | Path, font: str | Path | None = None, *,
                            image_kwargs: dict | None = None, video_kwargs: dict | None = None,
                            split_files: bool = True) -> Path:
    """Write a tiny converted-checkpoint processor into `directory` and return it.

    Files: tokenizer.json, tokenizer_config.json, chat_template.jinja (the clean ERNIE template),
    processor_config.json (nested image/video processor configs), preprocessor_config.json and
    video_preprocessor_config.json (the same configs, flat), the font file, generation_config.json.
    font: a .ttf to copy in (default: ``find_font()``, a system font or the package's). image_kwargs / video_kwargs override the pixel / frame bounds
    (e.g. `dict(max_pixels=28*28*64)` keeps tests small). split_files=False writes only the nested
    processor_config.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(directory / "tokenizer.json"))
    template = _chat_template()
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(chat_template=None))

    font_path = Path(font) if font is not None else find_font()
    font_name = font_path.name
    shutil.copyfile(font_path, directory / font_name)
    image_cfg = image_processor_config(**(image_kwargs or {}))
    video_cfg = video_processor_config(font_name, **(video_kwargs or {}))
    _write_json(directory / "processor_config.json", {
        "image_processor": image_cfg, "video_processor": video_cfg, "processor_class": "Ernie4_5_VLMoeProcessor",
    })
    if split_files:
        _write_json(directory / "preprocessor_config.json", {**image_cfg, "processor_class": "Ernie4_5_VLMoeProcessor"})
        _write_json(directory / "video_preprocessor_config.json",
                    {**video_cfg, "processor_class": "Ernie4_5_VLMoeProcessor"})
    _write_json(directory / "generation_config.json", {
        "bos_token_id": TOKEN_IDS["<|begin_of_sentence|>"], "eos_token_id": TOKEN_IDS["<|end_of_sentence|>"],
        "pad_token_id": TOKEN_IDS["<unk>"], "do_sample": True, "temperature": 0.2, "top_p": 0.8,
        "repetition_penalty": 1.0,
    })
    return directory


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
