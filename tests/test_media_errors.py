"""Every way a user can hand us bad media ends in a MediaError that says what was expected, what
was found and what to do; plus magic-byte sniffing and URL fetching (local server only)."""

from __future__ import annotations

import http.server
import importlib.util
import threading

import pytest

from model.errors import ErnieError, MediaError
from processing.image import load_image
from processing.media import read_source, sniff_format, sniff_kind
from processing.video import VideoProcessorConfig, load_video
from tests.helpers import media

CFG = VideoProcessorConfig(min_frames=2, max_frames=8, draw_timestamps=False)


def png_bytes(width=20, height=10) -> bytes:
    return media.encode(media.make_image("RGB", width, height), "PNG")


def expect(fn, *patterns: str) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn()
    for pattern in patterns:
        assert pattern in str(info.value) + " " + (info.value.hint or ""), str(info.value)
    assert isinstance(info.value, ErnieError)
    return info.value


# ---------------------------------------------------------------------------------------------
# Sources


def test_missing_file(tmp_path):
    expect(lambda: load_image(tmp_path / "nope.png"), "not found", "nope.png")
    expect(lambda: load_video(tmp_path / "nope.mp4", CFG), "not found")


def test_directory(tmp_path):
    expect(lambda: load_image(tmp_path), "found a directory", "Name a file inside it")


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    expect(lambda: load_image(tmp_path / "e.png"), "empty file (0 bytes)")
    expect(lambda: load_image(b""), "empty buffer")


def test_wrong_source_type():
    expect(lambda: read_source(12), "found a int")


# ---------------------------------------------------------------------------------------------
# Images


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, this is not a picture\n")
    expect(lambda: load_image(path), "found a text file", "extension does not make it one")


def test_unsupported_format():
    expect(lambda: load_image(bytes(range(256)) * 4), "unrecognised format", "Convert it")


def test_corrupt_and_truncated_images():
    data = png_bytes(64, 64)
    expect(lambda: load_image(data[: len(data) // 2]), "corrupt or truncated", "Re-export")
    jpeg = media.encode(media.make_image("RGB", 64, 64), "JPEG")
    broken = jpeg[:20] + b"\x00" * 40 + jpeg[60:]
    expect(lambda: load_image(broken[: len(broken) // 3]), "corrupt or truncated")
    expect(lambda: load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50), "Cannot decode")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = media.png_with_declared_size(30000, 30000)
    err = expect(lambda: load_image(bomb), "Refusing to decode", "900,000,000 pixels",
                 "decompression bomb")
    assert "Downscale" in err.hint
    expect(lambda: load_image(png_bytes(20, 10), max_pixels=100), "at most 100 pixels, found 20x10")
    # between Pillow's warning and error thresholds: still refused, with the declared size
    expect(lambda: load_image(media.png_with_declared_size(10000, 10000)), "found 100,000,000 pixels")


def test_absurd_aspect_ratio():
    expect(lambda: load_image(png_bytes(300, 1)), "aspect ratio of at most 200:1", "300:1", "Crop")


@pytest.mark.parametrize("fmt,data,package", [("HEIC", media.FAKE_HEIC, "pillow-heif"),
                                              ("AVIF", media.FAKE_AVIF, "pillow-avif-plugin")])
def test_heic_avif_without_decoder_names_the_package(fmt, data, package):
    module = {"HEIC": "pillow_heif", "AVIF": "pillow_avif"}[fmt]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed: the format is decodable here")
    from PIL import features

    if fmt == "AVIF" and features.check("avif"):
        pytest.skip("this Pillow decodes AVIF natively")
    expect(lambda: load_image(data), f"{fmt} image", f"pip install {package}")


# ---------------------------------------------------------------------------------------------
# Videos


def test_truncated_video_without_index(tmp_path):
    clip = media.make_video(tmp_path / "c.mp4", fps=10, frames=30)
    cut = media.truncate(clip, 0.5, tmp_path / "cut.mp4")
    expect(lambda: load_video(cut, CFG), "looks like mp4 but is corrupt or truncated")


def test_truncated_video_with_index(tmp_path):
    clip = media.make_video(tmp_path / "c.mp4", fps=10, frames=60, faststart=True)
    cut = media.truncate(clip, 0.5, tmp_path / "cut.mp4")
    expect(lambda: load_video(cut, CFG, fps=10, max_frames=60), "truncated", "declares 60 frames")


def test_file_without_video_stream(tmp_path):
    wav = media.audio_only(tmp_path / "sound.wav")
    expect(lambda: load_video(wav, CFG), "Expected a video stream", "found none (1 audio streams)")


def test_zero_frame_video(tmp_path):
    empty = media.empty_video(tmp_path / "empty.avi")
    expect(lambda: load_video(empty, CFG), "0 frames")


def test_image_passed_as_video():
    expect(lambda: load_video(png_bytes(), CFG), "Expected a video, found an image")


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_text("just words\n" * 20)
    expect(lambda: load_video(path, CFG), "found a text file")


# ---------------------------------------------------------------------------------------------
# Sniffing


@pytest.mark.parametrize("data,fmt,kind", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "png", "image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "jpeg", "image"),
    (b"GIF89a" + b"\x00" * 20, "gif", "image"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "webp", "image"),
    (media.FAKE_HEIC, "heic", "image"),
    (media.FAKE_AVIF, "avif", "image"),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 8, "mp4", "video"),
    (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\x00" * 8, "mov", "video"),
    (b"\x1a\x45\xdf\xa3" + b"\x00" * 20, "webm", "video"),
    (b"RIFF\x00\x00\x00\x00AVI LIST" + b"\x00" * 20, "avi", "video"),
    (b"hello world, plain text", None, None),
    (b"", None, None),
])
def test_sniff(data, fmt, kind):
    assert sniff_format(data) == fmt and sniff_kind(data) == kind


def test_sniff_real_files(tmp_path):
    assert sniff_kind(png_bytes()) == "image"
    assert sniff_kind(media.make_video(tmp_path / "v.mp4", frames=2).read_bytes()) == "video"
    assert sniff_kind(media.animated_gif()) == "image"


# ---------------------------------------------------------------------------------------------
# URLs (a local server on 127.0.0.1 only)


@pytest.fixture(scope="module")
def server():
    payloads = {"/cat.png": png_bytes(30, 20), "/big.bin": b"\x00" * 5000}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = payloads.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_downloads(server):
    assert load_image(f"{server}/cat.png").size == (30, 20)


def test_url_errors(server):
    expect(lambda: load_image(f"{server}/missing.png"), "HTTP 404")
    expect(lambda: read_source(f"{server}/big.bin", max_bytes=1000), "Refusing to download",
           "5000 bytes", "pass the local path")
    port_closed = "http://127.0.0.1:9/x.png"  # the discard port: nothing listens there
    expect(lambda: read_source(port_closed, timeout=2), "Could not download")
