"""Video processing: frame sampling, timestamps, decoding, stamping, padding, patches, config, and
parity with transformers 5.23's ERNIE video processor (live when installed, goldens always)."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import MediaError
from processing import video as V
from processing.image import smart_resize
from processing.media_cache import ByteLRU
from processing.video import (DecodedVideo, VideoProcessorConfig, format_timestamp, load_video,
                              preprocess_videos, sample_indices, stamp_frame)
from tests.helpers import media

GOLDENS = Path(__file__).parent / "goldens" / "processing"
MANIFEST = json.loads((GOLDENS / "manifest.json").read_text())
SAMPLING = json.loads((GOLDENS / "sampling.json").read_text())
FONT = str(GOLDENS / "font.ttf")
# the settings the goldens were made with: small frames and few of them
GOLDEN_CFG = VideoProcessorConfig.from_dict(
    {"size": MANIFEST["video_size"], **MANIFEST["video_frames"], "font": "font.ttf",
     "draw_on_frames": True}, base_dir=GOLDENS)
SMALL = VideoProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28, min_frames=4,
                             max_frames=12, font_path=FONT)


# ---------------------------------------------------------------------------------------------
# Sampling and timestamps (pure)


@pytest.mark.parametrize("case", SAMPLING["sample_frames"],
                         ids=lambda c: f"{c['total']}@{c['video_fps']}-fps{c['fps']}-n{c['num_frames']}"
                                       f"-{c['min_frames']}..{c['max_frames']}")
def test_sample_indices_match_reference_golden(case):
    got = sample_indices(case["total"], case["video_fps"], fps=case["fps"],
                         num_frames=case["num_frames"], min_frames=case["min_frames"],
                         max_frames=case["max_frames"])
    assert got == case["indices"]


def test_sample_indices_hand_computed():
    # 2.5 s at 10 fps sampled at 2 fps: 5 frames, 5 apart
    assert sample_indices(25, 10.0, fps=2, min_frames=4, max_frames=12) == [0, 5, 10, 15, 20]
    # 1 s at 30 fps at 2 fps wants 2 frames: clamped up to min_frames 16 -> spacing 30/16
    assert sample_indices(30, 30.0, fps=2) == [int(i * 30 / 16) for i in range(16)]
    # no fps: every frame, but never more than max_frames
    assert sample_indices(10, 25.0, min_frames=16) == list(range(10))
    assert len(sample_indices(5000, 25.0, max_frames=180)) == 180
    # a fractional count: 100 frames at 1/3 keeps ceil(100 / 3) indices
    assert sample_indices(100, 30.0, fps=10, min_frames=1) == [int(i * 3.0) for i in range(34)]


def test_sample_indices_rejects_bad_requests():
    with pytest.raises(MediaError, match="either a sampling fps or a number of frames"):
        sample_indices(100, 25.0, fps=1, num_frames=20)
    with pytest.raises(MediaError, match="between 16 and 180, found 8"):
        sample_indices(100, 25.0, num_frames=8)
    with pytest.raises(MediaError, match="Cannot sample 40 frames from a video that has 30"):
        sample_indices(30, 25.0, num_frames=40)
    with pytest.raises(MediaError, match="positive sampling fps"):
        sample_indices(30, 25.0, fps=0)


@pytest.mark.parametrize("case", SAMPLING["timestamps"], ids=lambda c: str(c["seconds"]))
def test_timestamps_match_reference_golden(case):
    assert format_timestamp(case["seconds"]) == case["text"]


def test_timestamp_hand_computed():
    assert format_timestamp(3725.5) == "time: 01:02:05.50"
    assert format_timestamp(0.1) == "time: 00:00:00.10"


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return media.make_video(tmp_path_factory.mktemp("v") / "clip.mp4", fps=10, frames=25)


def test_load_video_keeps_exactly_the_sampled_frames(clip):
    video = load_video(clip, SMALL, fps=2)
    assert video.indices == [0, 5, 10, 15, 20]
    assert media.read_indices(video.frames) == video.indices  # the pixels are those frames
    assert video.frames.shape == (5, 48, 64, 3) and video.frames.dtype == np.uint8
    assert (video.fps, video.total_frames, video.duration) == (10.0, 25, 2.5)
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_load_video_defaults_and_overrides(clip):
    every = load_video(clip, SMALL)  # cfg.fps None: every frame up to max_frames (12)
    assert len(every.indices) == 12 and media.read_indices(every.frames) == every.indices
    fixed = load_video(clip, SMALL, num_frames=6)
    assert fixed.indices == [int(i * 25 / 6) for i in range(6)]
    capped = load_video(clip, SMALL, max_frames=4)  # min_frames follows a lower max
    assert len(capped.indices) == 4
    from_cfg = load_video(clip, VideoProcessorConfig(fps=4, min_frames=1, font_path=FONT))
    assert from_cfg.indices == sample_indices(25, 10.0, fps=4, min_frames=1)


def test_load_video_from_bytes_matches_path(clip):
    a, b = load_video(clip, SMALL, fps=2), load_video(clip.read_bytes(), SMALL, fps=2)
    assert a.indices == b.indices and np.array_equal(a.frames, b.frames)


def test_container_without_frame_count_is_counted(tmp_path):
    path = media.make_video(tmp_path / "c.webm", fps=12, frames=14, codec="libvpx")
    import av

    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # WebM does not state it
    video = load_video(path, SMALL, num_frames=7)
    assert video.total_frames == 14 and video.indices == [0, 2, 4, 6, 8, 10, 12]
    assert media.read_indices(video.frames) == video.indices


def test_opencv_fallback_decodes_the_same_frames(clip):
    pick = dict(fps=2.0, num_frames=None, min_frames=4, max_frames=12)
    ours = V._decode_opencv(clip, "clip", SMALL, pick)
    reference = load_video(clip, SMALL, fps=2)
    assert ours.indices == reference.indices and ours.total_frames == 25
    assert media.read_indices(ours.frames) == reference.indices
    assert np.abs(ours.frames.astype(int) - reference.frames).mean() < 2


def test_decoded_size_budget_is_enforced(clip):
    with pytest.raises(MediaError, match="need .* GiB, over the"):
        load_video(clip, VideoProcessorConfig(max_decoded_bytes=10_000, font_path=FONT))
    with pytest.raises(MediaError, match="at most 1,000 pixels, found 64x48"):
        load_video(clip, VideoProcessorConfig(max_frame_pixels=1000, font_path=FONT))


# ---------------------------------------------------------------------------------------------
# Stamping, padding, patches


def test_stamp_draws_black_text_with_white_outline_top_left():
    frame = np.full((200, 300, 3), 128, np.uint8)
    out = stamp_frame(frame, "time: 00:00:01.50", FONT)
    changed = np.argwhere((out != 128).any(-1))
    font_size = 20  # int(0.1 * min(300, 200))
    assert changed[:, 0].max() < 2 * font_size and changed[:, 1].min() < font_size
    assert (out == 0).all(-1).any() and (out == 255).all(-1).any()
    assert np.array_equal(out[100:], frame[100:])
    other = stamp_frame(frame, "time: 00:00:02.50", FONT)
    assert not np.array_equal(out, other)


def test_missing_font_falls_back_with_a_warning():
    frame = np.full((300, 300, 3), 128, np.uint8)
    with pytest.warns(UserWarning, match="Pillow's bundled font"):
        out = stamp_frame(frame, "time: 00:00:00.00", None)
    assert (out < 40).all(-1).any() and (out > 215).all(-1).any()  # dark text, light outline
    assert np.array_equal(out[60:], frame[60:])


def _stamped_whole(frame: np.ndarray, text: str, font_path: str) -> np.ndarray:
    """Stamping as the reference does it: the whole frame through Pillow, a fresh font."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(frame)
    size = int(min(image.size) * V.STAMP_SIZE_FACTOR)
    ImageDraw.Draw(image).text((0, 0), text, font=ImageFont.truetype(font_path, size), fill=(0, 0, 0),
                               stroke_width=int(size * V.STAMP_SIZE_FACTOR), stroke_fill=(255, 255, 255))
    return np.asarray(image)


@pytest.mark.parametrize("shape", [(10, 12), (12, 300), (128, 160), (200, 300), (400, 50), (720, 1280)])
def test_stamping_the_corner_gives_the_bytes_of_stamping_the_whole_frame(shape):
    rng = np.random.default_rng(shape[0])
    frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    original = frame.copy()
    for text in ("time: 00:00:00.00", "time: 01:02:05.25", "time: 00:00:00.00"):  # the last: masks kept
        expected = _stamped_whole(frame, text, FONT)
        assert np.array_equal(stamp_frame(frame, text, FONT), expected), (shape, text)
        inplace = frame.copy()
        V.stamp_in_place(inplace, text, FONT)
        assert np.array_equal(inplace, expected), (shape, text)
    assert np.array_equal(frame, original)  # stamp_frame leaves its input alone


def test_text_masks_are_rendered_once_and_bounded(monkeypatch):
    from PIL import ImageFont

    store = ByteLRU(max_bytes=10 ** 9)
    monkeypatch.setattr(V, "_STAMP_MASKS", store)
    renders = []
    original = ImageFont.FreeTypeFont.getmask2
    monkeypatch.setattr(ImageFont.FreeTypeFont, "getmask2",
                        lambda self, *a, **k: renders.append(a[0]) or original(self, *a, **k))
    frame = np.full((120, 200, 3), 90, np.uint8)
    first = stamp_frame(frame, "time: 00:00:03.00", FONT)
    rendered = len(renders)
    assert rendered >= 2  # the outline and the fill
    for _ in range(3):
        assert np.array_equal(stamp_frame(frame, "time: 00:00:03.00", FONT), first)
    assert len(renders) == rendered  # kept
    stamp_frame(frame, "time: 00:00:04.00", FONT)
    assert len(renders) == 2 * rendered  # another text is rendered
    stamp_frame(np.full((240, 400, 3), 90, np.uint8), "time: 00:00:03.00", FONT)
    assert len(renders) == 3 * rendered  # another size too

    small = ByteLRU(max_bytes=100)
    small.put("a", "A", 60)
    small.put("b", "B", 30)
    assert small.get("a") == "A"  # now the most recent
    small.put("c", "C", 30)  # over 100: the least recently used ("b") goes
    assert (small.get("a"), small.get("b"), small.get("c")) == ("A", None, "C")
    small.put("huge", "H", 101)  # larger than the whole store: not kept, nothing evicted
    assert small.get("huge") is None and small.get("a") == "A"


def test_stamping_from_several_threads_matches_one_thread():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, (96 + 8 * i, 160, 3), dtype=np.uint8) for i in range(12)]
    texts = [format_timestamp(i * 0.5) for i in range(12)]
    expected = [_stamped_whole(f, t, FONT) for f, t in zip(frames, texts)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda ft: stamp_frame(ft[0], ft[1], FONT), zip(frames, texts)))
            assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def _video(frames: np.ndarray, fps: float = 10.0) -> DecodedVideo:
    n = len(frames)
    return DecodedVideo(frames=frames, indices=list(range(n)), timestamps=[i / fps for i in range(n)],
                        fps=fps, duration=n / fps, total_frames=n)


def test_odd_count_repeats_the_last_frame_and_grid_counts_frames():
    frames = np.stack([media.pattern(56, 56, seed=i) for i in range(3)])
    cfg = VideoProcessorConfig(min_pixels=56 * 56, max_pixels=56 * 56, font_path=FONT)
    batch = preprocess_videos([_video(frames)], cfg)
    assert batch.video_grid_thw.tolist() == [[4, 4, 4]]
    per_frame = batch.pixel_values_videos.view(4, 16, 588)
    assert torch.equal(per_frame[2], per_frame[3]) and not torch.equal(per_frame[1], per_frame[2])
    assert batch.timestamps == [[0.0, 0.1, 0.2]]


def test_timestamps_are_drawn_before_resizing():
    frames = np.full((2, 400, 400, 3), 128, np.uint8)
    stamped = VideoProcessorConfig(min_pixels=56 * 56, max_pixels=56 * 56, font_path=FONT)
    plain = VideoProcessorConfig(min_pixels=56 * 56, max_pixels=56 * 56, draw_timestamps=False)
    a = preprocess_videos([_video(frames)], stamped).pixel_values_videos.view(2, 16, 588)
    b = preprocess_videos([_video(frames)], plain).pixel_values_videos.view(2, 16, 588)
    assert not torch.equal(a[0, 0], b[0, 0])  # the top-left patch carries the stamp
    assert torch.equal(a[0, -1], b[0, -1])  # the bottom-right patch does not


def test_video_bounds_and_batch_of_two():
    small = np.stack([media.pattern(64, 48, seed=i) for i in range(4)])
    big = np.stack([media.pattern(90, 50, seed=i) for i in range(2)])
    batch = preprocess_videos([_video(small), _video(big)], SMALL)
    h0, w0 = smart_resize(48, 64, 28, SMALL.min_pixels, SMALL.max_pixels)
    h1, w1 = smart_resize(50, 90, 28, SMALL.min_pixels, SMALL.max_pixels)
    assert batch.video_grid_thw.tolist() == [[4, h0 // 14, w0 // 14], [2, h1 // 14, w1 // 14]]
    assert batch.pixel_values_videos.shape == (4 * h0 * w0 // 196 + 2 * h1 * w1 // 196, 588)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_from_dict_resolves_the_font(tmp_path):
    (tmp_path / "Roboto-Regular.ttf").write_bytes((GOLDENS / "font.ttf").read_bytes())
    d = {"video_processor": {"size": {"shortest_edge": 1000, "longest_edge": 5000}, "fps": 2,
                             "min_frames": 8, "max_frames": 64, "font": "Roboto-Regular.ttf",
                             "draw_on_frames": True, "temporal_patch_size": 2}}
    cfg = VideoProcessorConfig.from_dict(d, base_dir=tmp_path)
    assert cfg.font_path == str(tmp_path / "Roboto-Regular.ttf")
    assert (cfg.fps, cfg.min_frames, cfg.max_frames, cfg.min_pixels, cfg.max_pixels) == (2.0, 8, 64, 1000, 5000)
    assert VideoProcessorConfig.from_dict(d, base_dir=tmp_path / "elsewhere").font_path is None
    default = VideoProcessorConfig.from_dict({})
    assert (default.min_pixels, default.max_pixels, default.temporal_patch_size) == (
        299 * 28 * 28, 1196 * 28 * 28, 2)
    with pytest.raises(MediaError, match="temporal_patch_size 2"):
        VideoProcessorConfig.from_dict({"temporal_patch_size": 1})


# ---------------------------------------------------------------------------------------------
# Parity: goldens (always) and the live reference (when installed)


def _golden_load(name: str) -> DecodedVideo:
    _, _, _, _, fps, num_frames = MANIFEST["video_cases"][name]
    return load_video(GOLDENS / "videos" / f"{name}.mp4", GOLDEN_CFG, fps=fps, num_frames=num_frames)


@pytest.mark.parametrize("name", sorted(MANIFEST["video_cases"]))
def test_matches_reference_golden(name):
    expected = SAMPLING["videos"][name]
    video = _golden_load(name)
    assert video.indices == expected["indices"]
    assert [format_timestamp(t) for t in video.timestamps] == expected["timestamps"]
    assert (video.fps, video.total_frames) == (expected["fps"], expected["total_frames"])
    batch = preprocess_videos([video], GOLDEN_CFG)
    with np.load(GOLDENS / "videos.npz") as z:
        grid, rows = z[f"{name}/grid"], z[f"{name}/pixels"]
    assert batch.video_grid_thw.tolist() == grid.tolist()
    ours = _to_uint8(batch.pixel_values_videos.numpy())
    assert ours.shape == rows.shape
    # mean abs diff 0.01 in normalised units is ~0.7 of a uint8 level
    assert np.abs(ours.astype(float) - rows).mean() < 0.01 * 255 * 0.26


def _to_uint8(rows: np.ndarray) -> np.ndarray:
    n, width = rows.shape
    mean = np.array(V.CLIP_MEAN)[None, :, None]
    std = np.array(V.CLIP_STD)[None, :, None]
    x = (rows.reshape(n, 3, width // 3).astype(np.float64) * std + mean) * 255
    return np.rint(x).clip(0, 255).reshape(n, width)


LIVE = [(10, 25, 64, 48, 2.0, None), (29.97, 40, 90, 50, 3.0, None), (24, 9, 40, 40, None, None),
        (25, 30, 48, 64, None, 6)]


@pytest.mark.reference
@pytest.mark.parametrize("fps_v,frames,width,height,fps,num_frames", LIVE)
def test_matches_live_reference(tmp_path, fps_v, frames, width, height, fps, num_frames):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from transformers.video_utils import read_video_pyav

    size = {"shortest_edge": SMALL.min_pixels, "longest_edge": SMALL.max_pixels}
    ref = transformers.Ernie4_5_VLMoeVideoProcessor(font=FONT, size=size, min_frames=4, max_frames=12)
    path = media.make_video(tmp_path / "v.mp4", fps_v, frames, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames_ref, meta = read_video_pyav(str(path), functools.partial(
            ref.sample_frames, fps=fps, num_frames=num_frames))
        expected = ref(videos=[frames_ref], video_metadata=[meta], do_sample_frames=False,
                       return_tensors="pt")
    video = load_video(path, SMALL, fps=fps, num_frames=num_frames)
    assert video.indices == [int(i) for i in meta.frames_indices]
    assert [format_timestamp(t) for t in video.timestamps] == [
        ref._convert_timestamp(t) for t in meta.timestamps]
    assert np.array_equal(video.frames, frames_ref)
    batch = preprocess_videos([video], SMALL)
    assert batch.video_grid_thw.tolist() == expected["video_grid_thw"].tolist()
    assert (batch.pixel_values_videos - expected["pixel_values_videos"]).abs().mean().item() < 0.01
