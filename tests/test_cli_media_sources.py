"""Media from stdin, pipes and URLs through the real `ernie`, with ernie-tiny.

Every route gives the same answer as the same file given by path; every stream is bounded (size
for stdin, pipes and downloads, a total deadline for downloads) and ends within seconds with one
`error:` line and bounded memory; the temporary store those media live in is gone when the
command ends, after success, an error, Ctrl-C or SIGTERM (TMPDIR points at a per-test directory).
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from model.errors import DownloadError
from tests.helpers.cli import ERNIE, TRACEBACK, Measured, assert_one_line_error, ernie_env, run_ernie, run_measured

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "shapes.png"
VIDEO = ROOT / "examples" / "red-circle-left-to-right.mp4"
MEDIA = {"image": IMAGE, "video": VIDEO}
TINY = ["--model", "ernie-tiny", "--temperature", "0"]
PNG_SIG = b"\x89PNG\r\n\x1a\n"
PRINTF_PNG_SIG = 'printf "\\211PNG\\r\\n\\032\\n"'  # the same 8 bytes, from bash
REPO = "baidu/ERNIE-4.5-VL-28B-A3B-PT"


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
def tmp(tmp_path):
    """(directory to run in, env additions): TMPDIR is a fresh directory the test checks afterwards."""
    (tmp_path / "tmp").mkdir()
    return tmp_path, {"TMPDIR": str(tmp_path / "tmp")}


def assert_store_gone(tmp_path: Path) -> None:
    left = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "tmp").rglob("*"))
    assert left == [], left


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """The answer for each example given by path: what every other route must reproduce."""
    cwd = tmp_path_factory.mktemp("paths")
    out = {}
    for kind, path in MEDIA.items():
        proc = run_ernie(["describe", str(path), *TINY], cwd)
        assert proc.returncode == 0, proc.stderr_text
        out[kind] = proc.stdout_text
    assert out["image"].strip() and out["image"] != out["video"]
    return out


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the examples, and the misbehaving servers the download limits are for."""

    protocol_version = "HTTP/1.0"
    stop: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            route = getattr(self, "route_" + self.path.strip("/").replace("-", "_").replace(".", "_"), None)
            route() if route else self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _head(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _file(self, path: Path) -> None:
        data = path.read_bytes()
        self._head(len(data))
        self.wfile.write(data)

    def route_shapes_png(self):
        self._file(IMAGE)

    def route_clip_mp4(self):
        self._file(VIDEO)

    def route_trickle(self):  # a valid start, then one byte a second
        self._head(100_000)
        self.wfile.write(PNG_SIG)
        while not self.stop.wait(1.0):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def route_trickle_headers(self):  # never finishes its headers
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        while not self.stop.wait(1.0):
            self.wfile.write(b"z")
            self.wfile.flush()

    def route_huge(self):  # declares 10 TB, then sends slowly
        self._head(10**13)
        self.wfile.write(PNG_SIG)
        while not self.stop.wait(0.5):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def route_endless(self):  # no Content-Length and no end
        self._head(None)
        self.wfile.write(PNG_SIG)
        zeros = bytes(1 << 16)
        while not self.stop.is_set():
            self.wfile.write(zeros)


@pytest.fixture
def server():
    stop = threading.Event()
    handler = type("BoundHandler", (Handler,), {"stop": stop})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def _bash(script: str, tmp_path: Path, **env: str) -> Measured:
    """`bash -c script` with $0 = the ernie executable; `exec` makes ernie the measured process."""
    return run_measured(["bash", "-c", script, str(ERNIE)], tmp_path, timeout=120, **env)


# --- the happy paths: the same answer from every route ---------------------------------------------

@pytest.mark.parametrize("kind", ["image", "video"])
def test_stdin_gives_the_answer_for_the_path(tmp, answers, kind):
    cwd, env = tmp
    proc = run_ernie(["describe", "-", *TINY], cwd, input=MEDIA[kind].read_bytes(), **env)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == answers[kind]
    assert_store_gone(cwd)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_url_gives_the_answer_for_the_path(tmp, answers, server, kind):
    cwd, env = tmp
    url = f"{server}/{'shapes.png' if kind == 'image' else 'clip.mp4'}"
    proc = run_ernie(["describe", url, *TINY], cwd, **env)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == answers[kind]
    assert_store_gone(cwd)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_process_substitution_gives_the_answer_for_the_path(tmp, answers, kind):
    cwd, env = tmp
    proc = _bash(f'exec "$0" describe <(cat "{MEDIA[kind]}") --model ernie-tiny --temperature 0', cwd, **env)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == answers[kind]
    assert_store_gone(cwd)


def test_named_pipe_gives_the_answer_for_the_path(tmp, answers):
    cwd, env = tmp
    fifo = cwd / "clip.pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(VIDEO.read_bytes()), daemon=True)
    writer.start()  # blocks in open() until ernie opens the pipe for reading
    proc = run_ernie(["describe", str(fifo), *TINY], cwd, **env)
    writer.join(10)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == answers["video"]
    assert_store_gone(cwd)


def test_dev_stdin_redirected_from_a_file_is_the_media_not_the_prompt(tmp, answers):
    """`ernie describe /dev/stdin < photo.png`: stdin is the media (a regular file here, read by path;
    from a pipe it is streamed like `<(...)`), so it is not also read as the prompt."""
    cwd, env = tmp
    with open(IMAGE, "rb") as f:
        proc = run_measured([str(ERNIE), "describe", "/dev/stdin", *TINY], cwd, stdin=f, timeout=120, **env)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == answers["image"]
    assert_store_gone(cwd)


def test_chat_image_and_video_urls_give_the_answers_for_the_paths(tmp, answers, server):
    cwd, env = tmp
    lines = [f"/image {server}/shapes.png", "Describe this image.", "/clear", f"/video {server}/clip.mp4",
             "Describe this video."]
    proc = run_ernie(["chat", *TINY], cwd, input="\n".join(lines) + "\n", **env)
    assert proc.returncode == 0, proc.stderr_text
    assert "error" not in proc.stderr_text
    assert proc.stdout_text == answers["image"] + answers["video"]
    assert_store_gone(cwd)


# --- bounded streams: size ------------------------------------------------------------------------

def _endless_png(pipe) -> None:
    pipe.write(PNG_SIG)
    zeros = bytes(1 << 20)
    while True:
        pipe.write(zeros)


def test_endless_stdin_stops_at_the_limit_with_bounded_memory(tmp):
    cwd, env = tmp
    proc = run_measured([str(ERNIE), "describe", "-", *TINY], cwd, feed=_endless_png, ERNIE_MAX_DOWNLOAD_MB="128",
                        **env)
    assert_one_line_error(proc, "stdin", "128 MB limit")
    assert "ERNIE_MAX_DOWNLOAD_MB" in proc.stderr_text
    assert proc.peak_rss_mib < 100, proc.peak_rss_mib  # streamed to disk: 128 MB never in memory
    assert proc.seconds < 60
    assert_store_gone(cwd)


def _yes(pipe) -> None:
    while True:
        pipe.write(b"y\n" * 4096)


@pytest.mark.parametrize("source", ["urandom", "yes"])
def test_endless_noise_on_stdin_ends_at_once(tmp, source):
    """Bytes that are not media stop the read at the first chunk (or, for random bytes that happen
    to look like a header, at the limit)."""
    cwd, env = tmp
    if source == "yes":
        proc = run_measured([str(ERNIE), "describe", "-", *TINY], cwd, feed=_yes, **env)
    else:
        with open("/dev/urandom", "rb") as f:
            proc = run_measured([str(ERNIE), "describe", "-", *TINY], cwd, stdin=f, ERNIE_MAX_DOWNLOAD_MB="16", **env)
    line = assert_one_line_error(proc, "stdin")
    assert "not an image" in line or "limit" in line, line
    assert proc.peak_rss_mib < 100, proc.peak_rss_mib
    assert proc.seconds < 60
    assert_store_gone(cwd)


def test_endless_pipe_stops_at_the_limit_with_bounded_memory(tmp):
    cwd, env = tmp
    script = f'exec "$0" describe <({PRINTF_PNG_SIG}; cat /dev/zero) --model ernie-tiny'
    proc = _bash(script, cwd, ERNIE_MAX_DOWNLOAD_MB="128", **env)
    assert_one_line_error(proc, "/dev/fd/", "128 MB limit")
    assert proc.peak_rss_mib < 100, proc.peak_rss_mib
    assert proc.seconds < 60
    assert_store_gone(cwd)


@pytest.mark.parametrize("in_flight", [None, "limit"])
def test_a_store_file_that_fails_to_close_is_a_media_error(tmp_path, in_flight):
    """A full disk can fail the last buffered write at close(): that is the store's one-line
    error too (it was an OSError traceback), or, with an error already on its way, that error;
    the partial file is removed either way."""
    from ernie_cli.media import _StoreFile
    from model.errors import MediaError

    class FullDisk:
        def write(self, chunk):
            return len(chunk)

        def close(self):
            raise OSError(27, "File too large")

    path = tmp_path / "part"
    with pytest.raises(MediaError) as caught:
        with _StoreFile(path, "stdin") as sink:
            sink._file.close()
            sink._file = FullDisk()
            sink.write(b"\x89PNG\r\n\x1a\n" + bytes(64))
            if in_flight:
                raise MediaError("stdin is larger than the limit")
    assert ("larger than the limit" if in_flight else "cannot keep streamed media") in str(caught.value)
    assert not path.exists()


def test_store_that_cannot_grow_is_one_line(tmp):
    """A full disk under $TMPDIR, played by a 1000-block file size limit (ulimit -f)."""
    cwd, env = tmp
    script = f'ulimit -f 1000; exec "$0" describe <({PRINTF_PNG_SIG}; head -c 3000000 /dev/zero) --model ernie-tiny'
    proc = _bash(script, cwd, **env)
    assert_one_line_error(proc, "cannot keep streamed media", "too large")
    assert "TMPDIR" in proc.stderr_text
    assert_store_gone(cwd)


def test_bad_limit_setting_is_one_line(tmp):
    cwd, env = tmp
    proc = run_ernie(["describe", "-", *TINY], cwd, input=IMAGE.read_bytes(), ERNIE_MAX_DOWNLOAD_MB="lots", **env)
    assert_one_line_error(proc, "ERNIE_MAX_DOWNLOAD_MB", "positive number")


# --- bounded downloads: size and time -------------------------------------------------------------

@pytest.mark.parametrize("route", ["trickle", "trickle-headers"])
def test_trickling_server_ends_at_the_deadline(tmp, server, route):
    cwd, env = tmp
    proc = run_measured([str(ERNIE), "describe", f"{server}/{route}", *TINY], cwd, ERNIE_URL_DEADLINE="2", **env)
    assert_one_line_error(proc, route, "did not finish within 2 s")
    assert "ERNIE_URL_DEADLINE" in proc.stderr_text
    assert 2 <= proc.seconds < 30, proc.seconds
    assert_store_gone(cwd)


def test_huge_declared_length_is_refused_up_front(tmp, server):
    cwd, env = tmp
    proc = run_measured([str(ERNIE), "describe", f"{server}/huge", *TINY], cwd, **env)
    line = assert_one_line_error(proc, "huge", "larger than the download limit", "200.0 MB")
    assert "at least" not in line  # the declared size, before any of the body was read
    assert proc.seconds < 30
    assert_store_gone(cwd)


def test_endless_server_stops_at_the_limit_with_bounded_memory(tmp, server):
    cwd, env = tmp
    proc = run_measured([str(ERNIE), "describe", f"{server}/endless", *TINY], cwd, ERNIE_MAX_DOWNLOAD_MB="128",
                        **env)
    assert_one_line_error(proc, "endless", "larger than the download limit", "at least")
    assert proc.peak_rss_mib < 100, proc.peak_rss_mib
    assert proc.seconds < 60
    assert_store_gone(cwd)


def test_library_download_deadline_and_declared_size(server):
    from processing.media import fetch_url

    start = time.monotonic()
    with pytest.raises(DownloadError) as slow:
        fetch_url(f"{server}/trickle", deadline=1)
    assert slow.value.cause == "deadline" and time.monotonic() - start < 10
    with pytest.raises(DownloadError) as huge:
        fetch_url(f"{server}/huge", max_bytes=10**6)
    assert huge.value.cause == "too_large" and "at least" not in str(huge.value)  # refused on its header
    assert fetch_url(f"{server}/shapes.png") == IMAGE.read_bytes()


# --- the store goes away on errors and signals ------------------------------------------------------

def test_store_removed_after_an_error_once_the_media_were_stored(tmp):
    cwd, env = tmp
    proc = run_ernie(["describe", "-", "--model", "./no-such-checkpoint"], cwd, input=IMAGE.read_bytes(), **env)
    assert_one_line_error(proc, "no-such-checkpoint")
    assert_store_gone(cwd)


@pytest.mark.parametrize("kind, cut", [("image", 300), ("video", 2000)])
def test_truncated_media_on_stdin_are_named_stdin_not_by_their_temporary_copy(tmp, kind, cut):
    cwd, env = tmp
    proc = run_ernie(["describe", "-", *TINY], cwd, input=MEDIA[kind].read_bytes()[:cut], **env)
    message = assert_one_line_error(proc, "stdin", "truncated or corrupt")
    assert "ernie-media-" not in proc.stderr_text, message
    assert "Errno" not in message, message  # the decoder's words, not its error number
    assert_store_gone(cwd)


def _store_files(cwd: Path) -> list[Path]:
    return list((cwd / "tmp").glob("ernie-media-*/media*"))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_store_removed_after_a_signal_while_reading_stdin(tmp, signum, code):
    cwd, env = tmp
    proc = subprocess.Popen([str(ERNIE), "describe", "-", *TINY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=ernie_env(cwd, **env))
    proc.stdin.write(PNG_SIG + bytes(1 << 20))
    proc.stdin.flush()
    _wait_for(lambda: _store_files(cwd))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert TRACEBACK.encode() not in err and out == b""
    assert_store_gone(cwd)


def test_store_removed_after_ctrl_c_during_a_download(tmp, server):
    cwd, env = tmp
    proc = subprocess.Popen([str(ERNIE), "describe", f"{server}/trickle", *TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd, env=ernie_env(cwd, **env))
    _wait_for(lambda: _store_files(cwd))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert TRACEBACK.encode() not in err
    assert_store_gone(cwd)


def _wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# --- the Hub unreachable ---------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [["info", REPO], ["pull", REPO], ["describe", str(IMAGE), "--model", REPO]],
                         ids=["info", "pull", "describe"])
def test_hub_unreachable_is_one_quick_line_that_fits(tmp_path, args):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = ernie_env(tmp_path, HF_ENDPOINT=endpoint)
    env.pop("HF_HUB_OFFLINE")
    proc = run_measured([str(ERNIE), *args], tmp_path, env=env)
    assert_one_line_error(proc, REPO, "unreachable", endpoint)
    assert "HF_HUB_OFFLINE" not in proc.stderr_text  # it is not set: nothing to unset
    assert "Retry" not in proc.stderr_text
    assert proc.seconds < 5, proc.seconds  # was 24 s of retries for info


def test_offline_hints_name_what_is_set(tmp_path):
    flag = run_ernie(["info", REPO, "--offline"], tmp_path, HF_HUB_OFFLINE="0")
    assert_one_line_error(flag, REPO, "--offline")
    assert "drop --offline" in flag.stderr_text and "HF_HUB_OFFLINE" not in flag.stderr_text
    env = run_ernie(["info", REPO], tmp_path)  # ernie_env sets HF_HUB_OFFLINE=1
    assert_one_line_error(env, REPO, "HF_HUB_OFFLINE")
    assert "unset HF_HUB_OFFLINE" in env.stderr_text


def test_chat_ctrl_c_cancels_a_slow_download_and_keeps_the_session(tmp, server):
    pexpect = pytest.importorskip("pexpect")
    cwd, env = tmp
    child = pexpect.spawn(str(ERNIE), ["chat", *TINY], cwd=str(cwd), env=ernie_env(cwd, TERM="xterm", **env),
                          encoding="utf-8", codec_errors="replace", timeout=90, dimensions=(40, 120))
    child.expect_exact(">>> ")
    child.sendline(f"/image {server}/trickle")
    _wait_for(lambda: _store_files(cwd))
    child.sendintr()
    child.expect_exact("(cancelled)")
    child.expect_exact(">>> ")
    assert _store_files(cwd) == []  # the partial download is gone at once
    child.sendline(f"/image {server}/shapes.png")
    child.expect_exact("attached image")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert TRACEBACK not in child.before
    assert_store_gone(cwd)
