"""ErnieVLProcessor: placeholder expansion, token types, padding, errors; live parity with transformers 5.23."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import processing
from model.errors import ProcessorError
from processing.processor import ErnieVLProcessor
from tests.helpers import tokenizer as tokenizer_helpers
from tests.helpers.tokenizer import make_tiny_processor_dir

SMALL = dict(image_kwargs=dict(max_pixels=28 * 28 * 64),
             video_kwargs=dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, min_frames=2, max_frames=8))


def gradient(h, w, mode="RGB"):
    """A smooth picture (resampling backends agree on it to ~1e-6)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(h + w - 2, 1))], -1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_processor_dir(tmp_path_factory.mktemp("proc"), **SMALL)


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return ErnieVLProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        for i in range(10):
            frame = np.zeros((64, 80, 3), np.uint8)
            frame[..., 0] = i * 20
            frame[10:30, i * 5:i * 5 + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _user(*items):
    return [{"role": "user", "content": list(items)}]


def test_text_only(proc):
    out = proc.apply_chat_template([{"role": "user", "content": "Hi 你好"}])
    ids = proc.tokenizer.encode("<|begin_of_sentence|>User: Hi 你好\nAssistant: <think>\n\n</think>\n\n")
    assert out["input_ids"].tolist() == [ids]
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids"}
    assert out["attention_mask"].all() and not out["mm_token_type_ids"].any() and not out["moe_mm_token_type_ids"].any()
    assert proc.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith("</think>\n\n")


def test_image_expands_to_thw_over_4_with_token_types(proc):
    out = proc.apply_chat_template(_user({"type": "image", "image": gradient(90, 130)}, {"type": "text", "text": "?"}))
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (t, h * 14, w * 14) == (1, 84, 140)
    ids = out["input_ids"][0]
    n = t * h * w // 4
    assert int((ids == proc.image_token_id).sum()) == n and out["pixel_values"].shape == (t * h * w, 588)
    assert out["mm_token_type_ids"][0].tolist() == [1 if i == proc.image_token_id else 0 for i in ids.tolist()]
    moe = out["moe_mm_token_type_ids"][0]
    start = ids.tolist().index(proc.image_start_token_id)
    assert moe[start:start + n + 2].tolist() == [1] * (n + 2) and int(moe.sum()) == n + 2


def test_video_expands_to_thw_over_8_and_reports_timestamps(proc, video_path):
    out = proc.apply_chat_template(_user({"type": "video", "path": video_path}, {"type": "text", "text": "?"}), fps=2)
    t, h, w = out["video_grid_thw"][0].tolist()
    ids = out["input_ids"][0]
    assert int((ids == proc.video_token_id).sum()) == t * h * w // 8
    assert int((out["mm_token_type_ids"][0] == 2).sum()) == t * h * w // 8
    assert int((out["moe_mm_token_type_ids"][0] == 2).sum()) == t * h * w // 8 + 2
    assert out.video_timestamps == [[0.0, 0.5, 1.0, 1.5, 2.0]] and t == 6  # 5 frames padded to 6


def test_batch_left_padding_equals_singles(proc):
    convs = [[{"role": "user", "content": "short"}],
             _user({"type": "image", "image": gradient(60, 60)}, {"type": "text", "text": "a longer question here"})]
    batch = proc.apply_chat_template(convs)
    for row, conv in enumerate(convs):
        single = proc.apply_chat_template(conv)
        n = single["input_ids"].shape[1]
        for key in ("input_ids", "mm_token_type_ids", "moe_mm_token_type_ids"):
            assert batch[key][row, -n:].tolist() == single[key][0].tolist()
        pad = batch["input_ids"].shape[1] - n
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * n
        assert batch["input_ids"][row, :pad].tolist() == [proc.tokenizer.pad_token_id] * pad
    right = proc(text=["a", "a b c d"], padding_side="right")
    assert right["attention_mask"][0].tolist()[-1] == 0


def test_frames_list_video_and_decode(proc):
    frames = [gradient(64, 80) for _ in range(3)]
    out = proc.apply_chat_template(_user({"type": "video", "video": frames, "fps": 2}))
    assert out["video_grid_thw"][0, 0] == 4 and out.video_timestamps == [[0.0, 0.5, 1.0]]
    ids = proc.tokenizer.encode("<|begin_of_sentence|>Hi 🐶<|end_of_sentence|>")
    assert proc.decode(torch.tensor(ids), skip_special_tokens=True) == "Hi 🐶"
    assert proc.batch_decode(torch.tensor([ids]), skip_special_tokens=False) == [proc.tokenizer.decode(ids)]


def test_placeholder_mismatch_is_a_processor_error(proc):
    with pytest.raises(ProcessorError, match="1 picture and 0 video placeholders but 2 pictures"):
        proc(text="<|IMAGE_PLACEHOLDER|>", images=[gradient(40, 40), gradient(40, 40)])


def test_nested_processor_config_only(tmp_path):
    d = make_tiny_processor_dir(tmp_path, split_files=False, image_kwargs=dict(max_pixels=28 * 28 * 4))
    proc = ErnieVLProcessor.from_pretrained(d)
    assert proc.image_config.max_pixels == 28 * 28 * 4 and proc.video_config.temporal_patch_size == 2


def test_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(ProcessorError, match="not a checkpoint directory"):
        ErnieVLProcessor.from_pretrained(tmp_path / "nope")
    d = make_tiny_processor_dir(tmp_path / "a", split_files=False)
    (d / "processor_config.json").unlink()
    with pytest.raises(ProcessorError, match="no image processor config"):
        ErnieVLProcessor.from_pretrained(d)
    d = make_tiny_processor_dir(tmp_path / "b")
    cfg = json.loads((d / "video_preprocessor_config.json").read_text())
    (d / "video_preprocessor_config.json").write_text(json.dumps({**cfg, "merge_size": 4}))
    with pytest.raises(ProcessorError, match="disagree on patch/merge size"):
        ErnieVLProcessor.from_pretrained(d)
    d = make_tiny_processor_dir(tmp_path / "c")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if "image" not in k}))
    with pytest.raises(ProcessorError, match="does not name the multimodal tokens"):
        ErnieVLProcessor.from_pretrained(d)


# --- live parity with transformers 5.23 ------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_dir):
    transformers = pytest.importorskip("transformers")
    from transformers.video_utils import load_video

    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    ref = transformers.AutoProcessor.from_pretrained(tiny_dir)
    # Pictures: compare with the reference's PIL backend. Its default torchvision backend resizes
    # differently (bicubic without PIL's support widening): ~1e-2 apart on smooth pictures.
    ref.image_processor = Ernie4_5_VLMoeImageProcessorPil.from_pretrained(tiny_dir)

    def fetch_with_pyav(urls, sample_indices_fn=None):  # torchcodec is not installed; decode with PyAV
        if isinstance(urls, list):
            return list(zip(*[fetch_with_pyav(u, sample_indices_fn) for u in urls]))
        return load_video(urls, backend="pyav", sample_indices_fn=sample_indices_fn)

    ref.video_processor.fetch_videos = fetch_with_pyav
    return ref


def _img(image):
    return {"type": "image", "image": image}


def _txt(text):
    return {"type": "text", "text": text}


PARITY_CASES = {
    "text_only": ([{"role": "user", "content": "Hello, who are you? 你好"}], {}),
    "thinking_on": ([{"role": "user", "content": "2+2?"}], {"enable_thinking": True}),
    "tiny_image_upscaled": (_user(_img(gradient(20, 20)), _txt("what?")), {}),
    "wide_image": (_user(_txt("dog?"), _img(gradient(90, 330))), {}),
    "large_image_downscaled": (_user(_img(gradient(400, 300))), {}),
    "grayscale_and_rgba": (_user(_img(gradient(70, 50, "L")), _img(gradient(50, 70, "RGBA")), _txt("compare")), {}),
    "system_multi_turn": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [_img(gradient(60, 80))]},
                           {"role": "assistant", "content": "A gradient."},
                           {"role": "user", "content": [_img(gradient(80, 60)), _txt("and this?")]}],
                          {"enable_thinking": True}),
}


def _compare(ours, ref):
    assert set(ours) == set(ref)
    for key in ref:
        a, b = ours[key], ref[key]
        if b.is_floating_point():
            assert a.shape == b.shape and (a - b).abs().max() < 1e-3, key
        else:
            assert a.tolist() == b.tolist(), key


@pytest.mark.reference
@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_parity_chat(proc, reference, name):
    messages, kw = PARITY_CASES[name]
    ours = proc.apply_chat_template(messages, **kw)
    ref = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", enable_thinking=kw.get("enable_thinking", False))
    _compare(ours, ref)


@pytest.mark.reference
@pytest.mark.parametrize("fps", [None, 2])
def test_parity_video_and_image(proc, reference, video_path, fps):
    messages = _user({"type": "video", "path": video_path}, _img(gradient(90, 130)), _txt("same scene?"))
    kw = {} if fps is None else {"fps": fps}
    ours = proc.apply_chat_template(messages, **kw)
    ref = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", enable_thinking=False, processor_kwargs=kw)
    _compare(ours, ref)


@pytest.mark.reference
def test_parity_noisy_image_pixels(proc, reference):
    text = ["Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>x"]
    images = [noise(90, 130), noise(300, 200, seed=1)]
    text = [text[0] * 2]
    _compare(proc(text=text, images=images), reference(text=text, images=images, return_tensors="pt"))


@pytest.mark.reference
def test_parity_batch_left_padding(proc, reference):
    texts = ["<|begin_of_sentence|>User: hi", "<|begin_of_sentence|>User: <|IMAGE_PLACEHOLDER|> a much longer one"]
    images = [gradient(60, 60)]
    ref = reference(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    _compare(proc(text=texts, images=images), ref)


def test_from_processing_import_the_processor():
    """The name the seed's usage example uses, like ``from model import ErnieVL``."""
    from processing import ErnieVLProcessor as exported
    from processing.processor import ErnieVLProcessor as defined

    assert exported is defined
    with pytest.raises(AttributeError):
        processing.NoSuchThing  # noqa: B018


def test_tiny_processor_dirs_fall_back_to_the_packaged_font(tmp_path, monkeypatch):
    """On a machine without a system TrueType font the helper copies the font ernie-tiny ships, so
    the video processor still draws its timestamps with the font its config names."""
    monkeypatch.setattr(tokenizer_helpers, "_FONT_CANDIDATES", (str(tmp_path / "no-such-font.ttf"),))
    d = make_tiny_processor_dir(tmp_path / "proc")
    name = json.loads((d / "video_preprocessor_config.json").read_text())["font"]
    assert (d / name).read_bytes() == tokenizer_helpers.PACKAGE_FONT.read_bytes()
    processor = ErnieVLProcessor.from_pretrained(d)
    assert Path(processor.video_config.font_path) == d / name
