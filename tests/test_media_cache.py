"""processing/media_cache.py: preprocessed pictures and videos reused across turns and requests,
keyed by content and by every setting that shapes them, bounded in bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from processing.media_cache import MEDIA_CACHE, MediaCache, max_bytes_from_env
from tests.helpers.cli import assert_one_line_error, run_ernie

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "ernie_cli" / "assets" / "ernie-tiny"
IMAGE = ROOT / "examples" / "shapes.png"
VIDEO = ROOT / "examples" / "red-circle-left-to-right.mp4"


@pytest.fixture()
def cache():
    """The process's cache, empty and at its default size, for one test."""
    MEDIA_CACHE.clear()
    MEDIA_CACHE.resize(max_bytes_from_env(""))
    MEDIA_CACHE.hits = MEDIA_CACHE.misses = 0
    yield MEDIA_CACHE
    MEDIA_CACHE.clear()
    MEDIA_CACHE.resize(max_bytes_from_env(""))


@pytest.fixture(scope="module")
def processor():
    from processing.processor import ErnieVLProcessor

    return ErnieVLProcessor.from_pretrained(ASSET)


def inputs(processor, *media, **kw):
    content = [{"type": kind, kind: str(path)} for kind, path in media] + [{"type": "text", "text": "Describe."}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt", **kw)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_picture_and_a_video_seen_again_come_from_the_cache(cache, processor, tmp_path):
    first = inputs(processor, ("image", IMAGE), ("video", VIDEO))
    assert (cache.hits, cache.misses) == (0, 2)
    again = inputs(processor, ("image", IMAGE), ("video", VIDEO))
    assert (cache.hits, cache.misses) == (2, 2) and same(first, again)
    assert again.video_timestamps == first.video_timestamps
    copy = tmp_path / "upload.bin"  # a server's temporary copy of the same upload: same content, same entry
    shutil.copy(VIDEO, copy)
    assert same(inputs(processor, ("video", copy)), inputs(processor, ("video", VIDEO)))
    assert cache.hits == 4 and cache.misses == 2


def test_settings_that_shape_the_result_are_part_of_the_key(cache, processor):
    plain = inputs(processor, ("image", IMAGE))
    small = inputs(processor, ("image", IMAGE), min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    assert cache.misses == 2 and small["pixel_values"].shape[0] < plain["pixel_values"].shape[0]
    from dataclasses import replace

    saved = processor.video_config
    try:
        inputs(processor, ("video", VIDEO))
        processor.video_config = replace(saved, draw_timestamps=not saved.draw_timestamps)
        other = inputs(processor, ("video", VIDEO))
        assert cache.misses == 4  # the stamped and the unstamped frames are different entries
        processor.video_config = saved
        assert not torch.equal(inputs(processor, ("video", VIDEO))["pixel_values_videos"], other["pixel_values_videos"])
    finally:
        processor.video_config = saved


def test_a_changed_file_is_read_again(cache, processor, tmp_path):
    from PIL import Image

    path = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path)
    red = inputs(processor, ("image", path))
    Image.new("RGB", (64, 48), (10, 10, 200)).save(path)
    blue = inputs(processor, ("image", path))
    assert cache.hits == 0 and not torch.equal(red["pixel_values"], blue["pixel_values"])


def test_what_is_handed_out_can_be_changed_without_harm(cache, processor):
    first = inputs(processor, ("image", IMAGE))
    expected = first["pixel_values"].clone()
    first["pixel_values"].zero_()
    assert torch.equal(inputs(processor, ("image", IMAGE))["pixel_values"], expected)


def test_broken_files_are_not_kept(cache, processor, tmp_path):
    from model.errors import MediaError

    cut = tmp_path / "cut.png"
    cut.write_bytes(IMAGE.read_bytes()[:300])
    for _ in range(2):
        with pytest.raises(MediaError):
            inputs(processor, ("image", cut))
    assert len(cache) == 0 and cache.misses == 2


def test_least_recently_used_entries_leave_first_within_the_bound():
    made = []
    cache = MediaCache(max_bytes=250)

    def get(data: bytes):
        return cache.get_or_make(data, ("k",), lambda: made.append(data) or data, lambda value: 100)

    get(b"a"), get(b"b"), get(b"a"), get(b"c")  # c pushes out b (a was used after b)
    assert made == [b"a", b"b", b"c"] and len(cache) == 2 and cache.size_bytes == 200
    get(b"a")
    assert made == [b"a", b"b", b"c"]
    get(b"b")
    assert made[-1] == b"b"
    cache.resize(0)  # off: nothing kept, everything made
    assert len(cache) == 0
    get(b"a")
    assert made[-1] == b"a" and len(cache) == 0
    assert cache.get_or_make("https://example.com/a.png", ("k",), lambda: "made", lambda v: 1) == "made"


def test_the_size_comes_from_the_environment():
    assert max_bytes_from_env("") == 512 * 2**20 and max_bytes_from_env("0") == 0
    assert max_bytes_from_env("1.5") == int(1.5 * 2**20)
    for bad in ("abc", "-1", "nan", "inf"):
        with pytest.raises(ValueError):
            max_bytes_from_env(bad)


def test_a_bad_cache_size_is_a_one_line_error(tmp_path):
    proc = run_ernie(["describe", str(IMAGE), "--model", "ernie-tiny"], tmp_path, ERNIE_MEDIA_CACHE_MB="lots")
    assert_one_line_error(proc, "ERNIE_MEDIA_CACHE_MB", "lots")


def test_a_pipe_is_left_to_the_loader(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"data"))
    writer.start()
    try:
        assert MediaCache().digest(fifo) is None  # reading it would take what the loader needs
        assert fifo.read_bytes() == b"data"
    finally:
        writer.join(5)
