"""Where media bytes come from: local paths, raw bytes, or http(s) URLs; and what kind they are.

Everything here raises ``MediaError`` for problems a user can cause (a missing file, a directory,
an empty file, a URL that fails, is too large or too slow: ``DownloadError``). Image and video
decoding live in ``image.py`` and ``video.py``; both start from ``read_source``.
"""

from __future__ import annotations

import http.client
import io
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Union

from model.errors import DownloadError, MediaError

Source = Union[str, Path, bytes, bytearray, memoryview]

URL_TIMEOUT_S = 30.0  # each connect and read
URL_DEADLINE_S = 300.0  # the whole download: 512 MiB needs 1.7 MB/s, a 5 MB picture 17 kB/s
URL_MAX_BYTES = 512 * 1024 * 1024  # 512 MiB: a long 1080p clip fits, a runaway stream does not
CHUNK = 1 << 16

HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"qt  ",
                b"M4V ", b"M4VP", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"dash", b"mmp4", b"f4v "}
IMAGE_FORMATS = {"png", "jpeg", "gif", "bmp", "webp", "tiff", "ico", "heic", "avif", "jpeg2000"}

PILLOW_PLUGINS = {"heic": "pillow-heif", "avif": "pillow-avif-plugin"}


def sniff_format(data: bytes) -> str | None:
    """The container format named by the first bytes of a file, or None when unknown.

    Returns one of: png, jpeg, gif, bmp, webp, tiff, ico, heic, avif, jpeg2000 (images) or
    mp4, mov, webm, avi, flv, mpegts, mpegps, ogg (videos).
    """
    head = bytes(data[:64])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpegps"
    if len(data) >= 189 and data[0] == 0x47 and data[188] == 0x47:
        return "mpegts"
    return None


def _sniff_ftyp(head: bytes) -> str | None:
    """ISO base media files: the major brand (and compatible brands) say HEIF, AVIF or video."""
    box_size = int.from_bytes(head[:4], "big")
    brands = [head[8:12]] + [head[i:i + 4] for i in range(16, min(box_size, len(head)), 4)]
    if brands[0] in AVIF_BRANDS:
        return "avif"
    if brands[0] in HEIF_BRANDS:
        return "heic"
    if brands[0] == b"qt  ":
        return "mov"
    if brands[0] in VIDEO_BRANDS or any(b in VIDEO_BRANDS for b in brands):
        return "mp4"
    return None


def sniff_kind(data: bytes) -> str | None:
    """'image', 'video' or None, from the magic bytes alone (never from a file name)."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    return "image" if fmt in IMAGE_FORMATS else "video"


def looks_like_text(data: bytes) -> bool:
    """True for bytes that decode as UTF-8 text without control characters (a .txt named .png)."""
    head = bytes(data[:4096])
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the 4096 boundary is still text.
        try:
            text = head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


def describe(source: object) -> str:
    """A short name for a source in error messages (a path, a URL, or 'N bytes')."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def read_source(source: Source, *, timeout: float = URL_TIMEOUT_S,
                max_bytes: int = URL_MAX_BYTES) -> bytes | Path:
    """Bytes for in-memory or downloaded media, a checked Path for local files.

    Local files are not read here (videos are streamed by the decoder); they are checked to
    exist, to be regular files, and to be non-empty.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError("Expected image or video bytes, found an empty buffer.",
                             hint="Pass the file's contents, or its path.")
        return data
    if is_url(source):
        return fetch_url(source, timeout=timeout, max_bytes=max_bytes)
    if isinstance(source, (str, Path)):
        return check_path(Path(source).expanduser())
    raise MediaError(f"Expected a path, a URL or bytes for an image or video, found a "
                     f"{type(source).__name__}.", hint="Pass a file path, an http(s) URL or bytes.")


def check_path(path: Path) -> Path:
    """The path itself when it names a non-empty regular file; MediaError otherwise."""
    if not path.exists():
        raise MediaError(f"Media file not found: {path}.",
                         hint="Check the path (relative paths start at the current directory).")
    if path.is_dir():
        raise MediaError(f"Expected an image or video file, found a directory: {path}.",
                         hint="Name a file inside it.")
    if not path.is_file():
        raise MediaError(f"Expected a regular image or video file, found a special file: {path}.")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as err:
        raise MediaError(f"Cannot read media file {path}: {err.strerror or err}.",
                         hint="Check the file's permissions.") from err
    if size == 0:
        raise MediaError(f"Expected an image or video, found an empty file (0 bytes): {path}.",
                         hint="The file may still be downloading or was truncated; re-create it.")
    return path


def fetch_url(url: str, *, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES,
              deadline: float = URL_DEADLINE_S) -> bytes:
    """Download a URL into memory, bounded as `download` bounds it; every failure is a MediaError."""
    buffer = io.BytesIO()
    download(url, buffer, max_bytes=max_bytes, timeout=timeout, deadline=deadline)
    if not buffer.getbuffer().nbytes:
        raise MediaError(f"Expected image or video data from {url}, found an empty response.")
    return buffer.getvalue()


def download(url: str, sink: BinaryIO, *, max_bytes: int = URL_MAX_BYTES, timeout: float = URL_TIMEOUT_S,
             deadline: float = URL_DEADLINE_S) -> int:
    """Stream `url` into `sink` in chunks; returns the number of bytes written.

    Bounded three ways, each failure a DownloadError naming its cause: `max_bytes` (a declared
    Content-Length over it is refused before the body is read, an undeclared body is cut there),
    `timeout` (each connect and each read) and `deadline` (the whole download, headers included, so
    a server that trickles bytes cannot keep it alive). The transfer runs in a daemon thread so the
    deadline holds even inside a blocking read; at the deadline the thread is told to stop and left
    behind (it ends at its next read, at most `timeout` later, and writes nothing more).
    """
    transfer = _Transfer(url, sink, max_bytes, timeout)
    worker = threading.Thread(target=transfer.run, name="ernie-download", daemon=True)
    worker.start()
    try:
        worker.join(deadline)
    finally:
        transfer.stop.set()  # also on Ctrl-C in the caller: the worker writes nothing more
    if worker.is_alive():
        raise DownloadError(f"Could not download {url}: it did not finish within {deadline:g} s "
                            f"({_size(transfer.received)} received).",
                            hint="The server is too slow; download the file yourself and pass its path.",
                            cause="deadline")
    if transfer.error is not None:
        raise transfer.error
    return transfer.received


class _Transfer:
    """One download's state, shared by the worker thread that fills it and the caller that waits."""

    def __init__(self, url: str, sink: BinaryIO, max_bytes: int, timeout: float):
        self.url, self.sink, self.max_bytes, self.timeout = url, sink, max_bytes, timeout
        self.stop = threading.Event()
        self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._copy()
        except MediaError as err:
            self.error = err
        except urllib.error.HTTPError as err:
            self.error = DownloadError(f"Could not download {self.url}: the server answered HTTP {err.code} "
                                       f"({err.reason}).", hint="Check the URL, or download the file and pass "
                                       "its path.", cause="http")
        except TimeoutError:
            self.error = DownloadError(f"Could not download {self.url}: no data for {self.timeout:g} s.",
                                       hint="Check the URL and your connection, or pass a local file.",
                                       cause="timeout")
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            cause = "timeout" if isinstance(reason, TimeoutError) else "network"
            self.error = DownloadError(f"Could not download {self.url}: {reason}.",
                                       hint="Check the URL and your connection, or pass a local file.", cause=cause)
        except BaseException as err:  # anything else is handed to the caller's thread as it is
            self.error = err

    def _copy(self) -> None:
        request = urllib.request.Request(self.url, headers={"User-Agent": "ernie-cli"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
                raise _too_large(self.url, int(declared), self.max_bytes, exact=True)
            while not self.stop.is_set():
                chunk = response.read1(CHUNK)  # what has arrived, up to CHUNK: never waits to fill it
                if not chunk:
                    return
                if self.received + len(chunk) > self.max_bytes:
                    raise _too_large(self.url, self.received + len(chunk), self.max_bytes, exact=False)
                if self.stop.is_set():
                    return
                self.sink.write(chunk)
                self.received += len(chunk)


def _too_large(url: str, size: int, limit: int, exact: bool) -> DownloadError:
    found = _size(size) if exact else f"at least {_size(size)}"
    return DownloadError(f"Refusing to download {url}: it is larger than the download limit "
                         f"({found} > {_size(limit)}).", hint="Download it yourself and pass the local path.",
                         cause="too_large")


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MB"


def read_head(source: bytes | Path, n: int = 4096) -> bytes:
    """The first n bytes of in-memory or on-disk media (for sniffing)."""
    if isinstance(source, bytes):
        return source[:n]
    with open(source, "rb") as f:
        return f.read(n)


def unsupported_message(name: str, head: bytes, kind: str) -> tuple[str, str | None]:
    """(message, hint) for media no decoder could open, naming the missing package when known."""
    fmt = sniff_format(head)
    if fmt in PILLOW_PLUGINS:
        package = PILLOW_PLUGINS[fmt]
        return (f"{name} is a {fmt.upper()} image, but no {fmt.upper()} decoder is installed.",
                f"Install it with `pip install {package}`, or convert the image to PNG or JPEG.")
    if looks_like_text(head):
        return (f"Expected {kind} data in {name}, found a text file.",
                f"Pass a real {kind} file; its name's extension does not make it one.")
    if fmt is None:
        return (f"Expected {kind} data in {name}, found an unrecognised format.",
                "Convert it to PNG or JPEG (images) or MP4 (videos).")
    return (f"Cannot decode {name}: it looks like {fmt} but is corrupt or truncated.",
            "Re-export or re-download the file.")
