"""Each bad input a user can give `ernie describe` -> exit 1, one line naming the problem, no traceback.

All of these fail before any model is loaded (the model named is one that does not exist, so a
media check that let a file through would fail on the model instead, with a different message).
"""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from tests.helpers.cli import assert_one_line_error, run_ernie
from tests.helpers.media import audio_only, empty_video, encode, make_image, make_video, truncate

NO_MODEL = ["--model", "nosuchowner/nosuchmodel"]


@pytest.fixture
def server(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _describe(tmp_path, *args, **kw):
    return run_ernie(["describe", *args, *NO_MODEL], tmp_path, **kw)


def test_missing_path(tmp_path):
    assert_one_line_error(_describe(tmp_path, "nothere.png"), "no such file", "nothere.png")


def test_directory(tmp_path):
    (tmp_path / "pics").mkdir()
    assert_one_line_error(_describe(tmp_path, "pics"), "pics", "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    proc = _describe(tmp_path, "empty.jpg")
    assert_one_line_error(proc, "empty.jpg", "empty")
    assert "ERNIE_DEBUG" not in proc.stderr_text, proc.stderr_text  # a hint of its own, not the catch-all


def test_empty_stdin_asks_about_the_command_feeding_it(tmp_path):
    proc = _describe(tmp_path, "-", input=b"")
    assert_one_line_error(proc, "stdin", "0 bytes")
    assert "hint: did the command feeding stdin fail?" in proc.stderr_text, proc.stderr_text


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("just some notes\n")
    assert_one_line_error(_describe(tmp_path, "notes.png"), "notes.png", "not an image")


@pytest.mark.parametrize("name", ["notes.txt", "sound.wav"])
def test_unsupported_type(tmp_path, name):
    path = tmp_path / name
    audio_only(path) if name.endswith(".wav") else path.write_text("hello")
    assert_one_line_error(_describe(tmp_path, name), name, "unsupported")


def test_truncated_image(tmp_path):
    data = encode(make_image("RGB", 64, 48), "PNG")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_one_line_error(_describe(tmp_path, "cut.png"), "cut.png", "truncated")


def test_truncated_video(tmp_path):
    make_video(tmp_path / "clip.mp4", frames=12)
    truncate(tmp_path / "clip.mp4", keep=0.4)
    assert_one_line_error(_describe(tmp_path, "clip.mp4"), "clip.mp4", "video")


def test_video_without_frames(tmp_path):
    empty_video(tmp_path / "none.avi")
    assert_one_line_error(_describe(tmp_path, "none.avi"), "none.avi", "frame")


def test_url_not_found(tmp_path, server):
    base, _ = server
    assert_one_line_error(_describe(tmp_path, f"{base}/missing.png"), "404", "missing.png")


def test_url_serving_text(tmp_path, server):
    base, root = server
    (root / "page.png").write_text("<html>not a picture</html>")
    assert_one_line_error(_describe(tmp_path, f"{base}/page.png"), "not an image")


def test_url_over_the_size_limit(tmp_path, server):
    base, root = server
    (root / "big.png").write_bytes(encode(make_image("RGB", 256, 256, noise=80), "PNG"))
    proc = _describe(tmp_path, f"{base}/big.png", ERNIE_MAX_DOWNLOAD_MB="0.01")
    assert_one_line_error(proc, "big.png", "download limit")


def test_url_unreachable(tmp_path, server):
    base, _ = server
    dead = base.rsplit(":", 1)[0] + ":9"  # discard port: nothing listens there
    assert_one_line_error(_describe(tmp_path, f"{dead}/a.png"), "could not download")


def test_unsupported_url_scheme(tmp_path):
    assert_one_line_error(_describe(tmp_path, "ftp://example.com/a.png"), "ftp://", "scheme")


def test_stdin_text_is_not_media(tmp_path):
    assert_one_line_error(_describe(tmp_path, "-", input=b"plain words"), "stdin", "not an image")


def test_good_media_from_url_and_stdin_get_past_the_checks(tmp_path, server):
    """The same checks accept real media: the run goes on and fails only at the (missing) model."""
    base, root = server
    png = encode(make_image("RGB", 32, 32), "PNG")
    (root / "ok.png").write_bytes(png)
    make_video(root / "ok.mp4", frames=6)
    proc = _describe(tmp_path, f"{base}/ok.png", f"{base}/ok.mp4", "-", input=encode(make_image("RGB"), "JPEG"))
    assert_one_line_error(proc, "nosuchowner/nosuchmodel")
