"""ernie-tiny: the synthetic shapes generator, its tokenizer, and the shipped checkpoint.

Tier 1 (milliseconds): scenes are deterministic, shapes never overlap, colours stay within the
jitter, answers list shapes left to right, clips move the way their answer says.
Tier 3 (seconds): the shipped model answers freshly generated scenes through the real
pipeline (processor + model + greedy generate) well above chance, so a broken pipeline
(swapped channels, wrong patch order, a frame-order bug) fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "ernie_cli" / "assets" / "ernie-tiny"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_ernie_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


shapes = _load_script("shapes")


# --- scenes -----------------------------------------------------------------------------------

def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(n)]


def test_scenes_are_deterministic_given_a_seed():
    a, b = _scenes(20, seed=3), _scenes(20, seed=3)
    assert a == b
    assert a != _scenes(20, seed=4)
    assert np.array_equal(np.asarray(shapes.render(a[5])), np.asarray(shapes.render(b[5])))


def test_scene_bounds_counts_and_sizes():
    scenes = _scenes(300)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    for s in scenes:
        assert 96 <= s.width <= 320 and 96 <= s.height <= 320
        assert all(225 <= c <= 255 for c in s.background)
        for sh in s.shapes:
            x0, y0, x1, y1 = sh.box
            assert 0 <= x0 and x1 <= s.width and 0 <= y0 and y1 <= s.height
            assert 0.15 * min(s.width, s.height) - 1e-6 <= sh.size <= 0.40 * min(s.width, s.height) + 1e-6


def test_shapes_never_overlap():
    for s in _scenes(300, seed=1):
        for i, a in enumerate(s.shapes):
            for b in s.shapes[i + 1:]:
                assert shapes._disjoint(a, b, 0), (a, b)


def test_rendered_colours_stay_within_the_jitter_of_their_name():
    for s in _scenes(60, seed=2):
        px = np.asarray(shapes.render(s)).astype(int)
        for sh in s.shapes:
            centre = px[int(sh.cy), int(sh.cx)] if sh.kind != "triangle" else px[int(sh.cy + sh.size / 4), int(sh.cx)]
            assert tuple(centre) == sh.rgb
            assert np.abs(centre - np.array(shapes.COLOURS[sh.colour])).max() <= shapes.JITTER
        # the corner is background, never a shape
        assert tuple(px[0, 0]) == s.background


def test_answer_lists_shapes_left_to_right():
    red = shapes.Shape("circle", "red", (220, 40, 40), 150.0, 50.0, 30.0)
    blue = shapes.Shape("square", "blue", (40, 90, 220), 40.0, 120.0, 30.0)
    green = shapes.Shape("triangle", "green", (40, 170, 60), 90.0, 20.0, 30.0)
    assert shapes.describe([red]) == "A red circle."
    assert shapes.describe([red, blue]) == "A blue square and a red circle."
    assert shapes.describe([red, blue, green]) == "A blue square, a green triangle and a red circle."
    orange = shapes.Shape("circle", "orange", (245, 140, 30), 10.0, 50.0, 10.0)
    assert shapes.describe([red, orange]) == "An orange circle and a red circle."
    for s in _scenes(100, seed=5):
        xs = [sh.cx for sh in s.shapes]
        assert xs == sorted(xs)
        words = s.answer.lower().rstrip(".").replace(",", " and").split(" and ")
        assert [w.strip().removeprefix("an ").removeprefix("a ") for w in words] == \
            [f"{sh.colour} {sh.kind}" for sh in s.shapes]


def test_jpeg_round_trip_keeps_colours_close():
    s = shapes.EXAMPLE_SCENE
    a = np.asarray(shapes.render(s)).astype(int)
    b = np.asarray(shapes.as_jpeg(shapes.render(s))).astype(int)
    for sh in s.shapes:
        y, x = int(sh.cy + (sh.size / 4 if sh.kind == "triangle" else 0)), int(sh.cx)
        assert np.abs(a[y, x] - b[y, x]).max() <= 12


# --- clips ------------------------------------------------------------------------------------

def _centroid(frame: np.ndarray, background: tuple[int, int, int]) -> tuple[float, float]:
    mask = np.abs(frame.astype(int) - np.array(background)).sum(-1) > 30
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_clips_move_the_way_their_answer_says():
    rng = random.Random(11)
    seen = set()
    for _ in range(24):
        clip = shapes.random_clip(rng)
        seen.add(clip.direction)
        assert 10 <= clip.fps <= 30 and 2.0 <= clip.duration <= 6.05
        assert clip.width % 2 == 0 and clip.height % 2 == 0 and 96 <= min(clip.width, clip.height)
        first = _centroid(np.asarray(shapes.render_frame(clip, 0)), clip.background)
        last = _centroid(np.asarray(shapes.render_frame(clip, clip.n_frames - 1)), clip.background)
        dx, dy = last[0] - first[0], last[1] - first[1]
        expected = {"left to right": (dx > 0), "right to left": (dx < 0),
                    "top to bottom": (dy > 0), "bottom to top": (dy < 0)}[clip.direction]
        assert expected, clip
        travel, side = (abs(dx), clip.width) if clip.direction in shapes.DIRECTIONS[:2] else (abs(dy), clip.height)
        assert travel >= 0.35 * side  # crosses most of the free track, not a wiggle
        article = "An" if clip.shape.colour == "orange" else "A"
        assert clip.answer == f"{article} {clip.shape.colour} {clip.shape.kind} moves from {clip.direction}."
    assert seen == set(shapes.DIRECTIONS)


def test_saved_video_decodes_with_its_frame_count_and_rate(tmp_path):
    av = pytest.importorskip("av")
    clip = shapes.example_clip("circle", "red", "left to right")
    path = shapes.save_video(clip, tmp_path / "c.mp4")
    with av.open(str(path)) as f:
        decoded = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(decoded) == clip.n_frames
    xs = [_centroid(fr, clip.background)[0] for fr in decoded]
    assert xs[0] < xs[len(xs) // 2] < xs[-1]


# --- tokenizer and training examples ---------------------------------------------------------

evaluation = _load_script("eval_tiny")
training = _load_script("train_tiny")


def test_tokenizer_is_reproducible_and_matches_the_shipped_one():
    built = training.build_tokenizer()
    assert json.loads(built.to_str()) == json.loads((ASSET / "tokenizer.json").read_text())
    for i, token in enumerate(training.SPECIAL_TOKENS):
        assert built.token_to_id(token) == i
    for text in ("An orange triangle, a red square and a blue circle.", "Héllo 世界 🙂"):
        assert built.decode(built.encode(text).ids, skip_special_tokens=False) == text
    # the answers' words are whole tokens: a short answer is a handful of ids
    assert len(built.encode("A purple triangle moves from bottom to top.").ids) <= 9


def test_training_labels_cover_exactly_the_answer_and_eos():
    from processing.processor import ErnieVLProcessor

    processor = ErnieVLProcessor.from_pretrained(ASSET)
    inputs, labels, kinds, _ = training.random_batch(random.Random(0), processor, 0.9, 4)
    assert labels.shape == inputs["input_ids"].shape and len(kinds) == 4
    for row in range(4):
        kept = labels[row][labels[row] != -100].tolist()
        text = processor.decode(kept)
        assert text.endswith("<|end_of_sentence|>") and kept == inputs["input_ids"][row, -len(kept):].tolist()
        assert text.startswith(("A ", "An ")) and ("moves from" in text) == (kinds[row] == "video")
        assert not any(t in text for t in ("Assistant", "<think>", "<|IMAGE", "<|VIDEO"))


def test_follow_up_samples_carry_an_earlier_exchange_and_label_only_the_last_answer():
    from processing.processor import ErnieVLProcessor

    processor = ErnieVLProcessor.from_pretrained(ASSET)
    inputs, labels, kinds, sources = training.random_batch(random.Random(1), processor, 0.9, 3, multi_turn=1.0)
    assert len(kinds) == len(sources) == 6  # two pictures or clips per sample, in prompt order
    n_media = int((inputs["input_ids"] == processor.image_start_token_id).sum()
                  + (inputs["input_ids"] == processor.tokenizer.token_to_id("<|VIDEO_START|>")).sum())
    assert n_media == 6
    eos = processor.tokenizer.eos_token_id
    for row in range(3):
        ids = inputs["input_ids"][row].tolist()
        kept = labels[row][labels[row] != -100].tolist()
        assert ids.count(eos) == 2 and kept.count(eos) == 1  # the earlier answer is context, not a target
        assert kept == ids[-len(kept):]
        text = processor.decode(ids)
        assert text.count("User: ") == 2 and text.count("Assistant: ") == 2
        earlier = sources[2 * row] if kinds[2 * row] == "image" else sources[2 * row][0]  # scene, or (clip, frames)
        assert f"Assistant: {earlier.answer}<|end_of_sentence|>" in text


# --- the shipped checkpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(model, processor) loaded from the shipped files, the way the CLI loads them."""
    torch = pytest.importorskip("torch")
    from model import load_pretrained
    from processing.processor import ErnieVLProcessor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2M-parameter model: one thread is fastest, and fair to a shared CPU
    try:
        yield load_pretrained(str(ASSET), device="cpu"), ErnieVLProcessor.from_pretrained(ASSET)
    finally:
        torch.set_num_threads(threads)


def test_asset_is_a_complete_checkpoint_in_baidu_layout():
    from safetensors import safe_open

    from model.config import ErnieVLConfig
    from processing.tokenizer import ErnieTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                 "generation_config.json", "DejaVuSans.ttf", "DejaVuSans-LICENSE.txt", "README.md"):
        assert (ASSET / name).is_file(), name
    raw = json.loads((ASSET / "config.json").read_text())
    assert "text_config" not in raw and isinstance(raw["moe_num_experts"], list)  # Baidu's flat form
    config = ErnieVLConfig.from_dict(raw)
    with safe_open(str(ASSET / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    sparse = [i for i in range(config.text.num_hidden_layers) if config.text.is_moe_layer(i)]
    assert sparse and config.text.mlp_layer_types[0] == "dense"
    E = config.text.moe_num_experts
    for i in sparse:  # text and vision banks, both routers, the shared expert
        assert {f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.mlp.gate.weight_1",
                f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias",
                f"model.layers.{i}.mlp.experts.{2 * E - 1}.down_proj.weight",
                f"model.layers.{i}.mlp.shared_experts.up_proj.weight"} <= keys
    assert any(k.startswith("vision_model.blocks.") for k in keys)
    assert "model.resampler_model.spatial_linear.0.weight" in keys
    assert not any(k.startswith("model.vision_model.") for k in keys)
    tok = ErnieTokenizer.from_dir(ASSET)
    assert tok.token_to_id("<|IMAGE_PLACEHOLDER|>") == config.image_token_id
    assert tok.token_to_id("<|VIDEO_PLACEHOLDER|>") == config.video_token_id
    assert tok.token_to_id("<|IMAGE_START|>") == config.image_start_token_id
    assert tok.eos_token_id in config.text.eos_token_id
    assert len(tok) <= config.text.vocab_size


def test_processor_settings_keep_inputs_small(tiny, tmp_path):
    """The checkpoint's own processor configs bound a 320x320 picture to 64 tokens, a clip to 4-8 frames."""
    _, processor = tiny
    img = shapes.render(shapes.Scene(320, 320, (240, 240, 240), ()))
    inputs = processor(text=["Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"], images=[img])
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 64
    clip = shapes.example_clip("circle", "red", "left to right")  # 3 s at 10 fps
    video = processor.load_video(shapes.save_video(clip, tmp_path / "c.mp4"))
    assert 4 <= len(video.frames) <= 8


def test_answers_held_out_scenes_and_clips_through_the_real_pipeline(tiny):
    """20 fresh images and 6 fresh clips, read from files, greedy decoding.

    The shipped checkpoint scores 96.5% of 200 images and 98% of 50 clips in scripts/eval_tiny.py
    (docs/ernie-tiny.md). Chance is about 1 in 18 for one shape, far lower for more, and 1 in 72
    for a clip. Swapped channels or a broken resize fail the colour checks, a wrong patch order
    the scene check, a frame-order bug the clip check.
    """
    model, processor = tiny
    failures: list = []
    result = evaluation.evaluate_loaded(model, processor, 20, 6, seed=424242, failures=failures)
    assert result["image_colour_accuracy"] >= 0.9, (result, failures)
    assert result["video_colour_accuracy"] == 1.0, (result, failures)
    assert result["image_accuracy"] >= 0.8, (result, failures)
    assert result["video_accuracy"] >= 5 / 6, (result, failures)


def test_answers_second_chat_turns_about_new_pictures_and_clips(tiny):
    """A new picture or clip after a first exchange (what `ernie chat` sends): the model must
    describe the new one, not repeat or blend the earlier answer. 96% of 50 in
    scripts/eval_tiny.py --followups 50; a pipeline that mixed up which media belongs to which turn
    (placeholder order, 3D positions after the first picture, the cache) would fail here."""
    model, processor = tiny
    failures: list = []
    result = evaluation.evaluate_followups(model, processor, 6, seed=515151, failures=failures)
    assert result["followup_accuracy"] >= 4 / 6, (result, failures)


OPPOSITE = {"left to right": "right to left", "right to left": "left to right",
            "top to bottom": "bottom to top", "bottom to top": "top to bottom"}


def _backwards(clip):
    """The same frames in reverse order (frame i of the result is frame n-1-i of clip)."""
    return dataclasses.replace(clip, shape=clip.shape.moved(*clip.end), end=(clip.shape.cx, clip.shape.cy),
                               direction=OPPOSITE[clip.direction])


def test_backwards_clip_is_the_reversed_frames():
    clip = shapes.example_clip("circle", "red", "left to right")
    assert np.array_equal(shapes.frames(_backwards(clip)), shapes.frames(clip)[::-1])


@pytest.mark.parametrize("kind,colour,direction", [("circle", "red", "left to right"),
                                                   ("square", "blue", "top to bottom"),
                                                   ("triangle", "yellow", "right to left"),
                                                   ("square", "purple", "bottom to top")])
def test_a_clip_played_backwards_moves_the_other_way(tiny, tmp_path, kind, colour, direction):
    """Direction comes from the frames' order and timestamps: reverse them and the answer flips.

    A pipeline that drops, shuffles or reorders frames (or pairs them wrongly in the temporal
    merge) cannot get both right.
    """
    model, processor = tiny
    clip = shapes.example_clip(kind, colour, direction)
    for c in (clip, _backwards(clip)):
        path = shapes.save_video(c, tmp_path / f"{c.direction.replace(' ', '-')}.mp4")
        answer = evaluation.describe(model, processor, "video", path)
        assert evaluation.video_correct(answer, c), (c.answer, answer)


def _two_colour_scenes(n: int, seed: int):
    rng = random.Random(seed)
    while n:
        scene = shapes.random_scene(rng, 2)
        if scene.shapes[0].colour != scene.shapes[1].colour:
            n -= 1
            yield scene


def test_colour_order_follows_the_layout_and_flips_when_mirrored(tiny, tmp_path):
    """Left-to-right order comes from where the patches are: mirror the picture, the order flips.

    A pipeline that scrambles patch order or transposes pictures drops both rates to chance (1/2).
    """
    model, processor = tiny
    right = flipped = 0
    scenes = list(_two_colour_scenes(16, seed=99))
    for i, scene in enumerate(scenes):
        expected = [s.colour for s in scene.shapes]
        shapes.render(scene).save(tmp_path / f"{i}.png")
        shapes.render(scene).transpose(0).save(tmp_path / f"{i}-mirrored.png")  # FLIP_LEFT_RIGHT
        said = evaluation.parse_answer(evaluation.describe(model, processor, "image", tmp_path / f"{i}.png"))
        right += [c for c, _ in said] == expected
        said = evaluation.parse_answer(evaluation.describe(model, processor, "image", tmp_path / f"{i}-mirrored.png"))
        flipped += [c for c, _ in said] == expected[::-1]
    assert right / len(scenes) >= 0.85 and flipped / len(scenes) >= 0.85, (right, flipped)


def test_swapping_red_and_blue_channels_swaps_the_colour_named(tiny, tmp_path):
    from PIL import Image

    model, processor = tiny
    scene = shapes.Scene(200, 160, (240, 240, 240), (shapes.Shape("square", "red", shapes.COLOURS["red"], 100.0, 80.0, 60.0),))
    shapes.save_image(scene, tmp_path / "red.png")
    r, g, b = shapes.render(scene).split()
    Image.merge("RGB", (b, g, r)).save(tmp_path / "swapped.png")  # (220, 40, 40) -> (40, 40, 220)
    said = evaluation.parse_answer(evaluation.describe(model, processor, "image", tmp_path / "red.png"))
    assert said and {c for c, _ in said} == {"red"}, said
    said = evaluation.parse_answer(evaluation.describe(model, processor, "image", tmp_path / "swapped.png"))
    assert said and {c for c, _ in said} <= {"blue", "purple"}, said  # nearest named colours to (40, 40, 220)
