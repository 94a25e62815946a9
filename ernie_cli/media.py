"""Turn what the user typed (a path, an http(s) URL, `-` for stdin) into a checked local media file.

Every failure a user can cause becomes a MediaError that names the file and the problem, before
any model is loaded: a missing path, a directory, an empty or truncated file, a text file named
.png, an unsupported type, a URL that fails or is too large.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.errors import MediaError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp"}
CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaInput:
    kind: str  # "image" | "video"
    path: Path  # a local file; downloads and stdin bytes land in a private temp dir
    source: str  # as the user gave it


def sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, extension) from a file's first bytes, or None when it is neither image nor video."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", ".jpg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", ".gif"
    if head.startswith(b"BM") and len(head) > 14:
        return "image", ".bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", ".tif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", ".webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", ".avi"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
            return None
        return "video", ".mov" if brand == b"qt  " else ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", ".mkv"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "video", ".mpg"
    if head.startswith(b"FLV"):
        return "video", ".flv"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "video", ".ts"
    return None


def url_limits() -> tuple[int, float]:
    """(max bytes, timeout seconds) for downloads: $ERNIE_MAX_DOWNLOAD_MB (200), $ERNIE_URL_TIMEOUT (30)."""
    max_mb = float(os.environ.get("ERNIE_MAX_DOWNLOAD_MB", "200"))
    return int(max_mb * 1024 * 1024), float(os.environ.get("ERNIE_URL_TIMEOUT", "30"))


class MediaResolver:
    """Resolves references one by one; owns the temp dir that holds downloads and stdin bytes."""

    def __init__(self, stdin=None):
        self._stdin = stdin
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def resolve(self, ref: str) -> MediaInput:
        if ref == "-":
            return self._from_bytes(self._read_stdin(), "-", "stdin")
        if ref.startswith(("http://", "https://")):
            return self._from_bytes(download(ref), ref, ref)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", ref):
            raise MediaError(f"unsupported URL scheme in {ref!r}; expected a file path, http(s) URL or -",
                             hint="download the file first and pass its path")
        return check_file(Path(ref).expanduser(), ref)

    def resolve_bytes(self, data: bytes, label: str) -> MediaInput:
        """Bytes from elsewhere (a request body): sniffed, written to the temp dir, checked like a file."""
        return self._from_bytes(data, label, label)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _read_stdin(self) -> bytes:
        if self._stdin is None:
            raise MediaError("`-` reads media from stdin, but stdin was already used or is a terminal",
                             hint="pipe the file in: cat photo.jpg | ernie describe -")
        data, self._stdin = self._stdin.read(), None
        return data

    def _from_bytes(self, data: bytes, ref: str, label: str) -> MediaInput:
        if not data:
            raise MediaError(f"{label} gave 0 bytes; expected an image or video")
        found = sniff(data[:512])
        if found is None:
            raise MediaError(f"{label} is not an image or video (starts with {data[:16]!r})",
                             hint="supported: PNG, JPEG, GIF, BMP, TIFF, WebP images; MP4, MOV, WebM, MKV, AVI videos")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ernie-media-")
        self._count += 1
        path = Path(self._tmp.name) / f"media{self._count}{found[1]}"
        path.write_bytes(data)
        return check_file(path, ref)


def download(url: str) -> bytes:
    max_bytes, timeout = url_limits()
    request = urllib.request.Request(url, headers={"User-Agent": "ernie-cli"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise _too_large(url, declared, max_bytes)
            data = bytearray()
            while chunk := response.read(CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise _too_large(url, len(data), max_bytes)
            return bytes(data)
    except urllib.error.HTTPError as e:
        raise MediaError(f"could not download {url}: HTTP {e.code} {e.reason}", hint="check the URL") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MediaError(f"could not download {url}: {reason}",
                         hint="check the URL and your network, or raise $ERNIE_URL_TIMEOUT") from None


def _too_large(url: str, size: int, limit: int) -> MediaError:
    return MediaError(f"{url} is larger than the download limit ({size / 2**20:.1f} MB > {limit / 2**20:.0f} MB)",
                      hint="download it yourself, or raise $ERNIE_MAX_DOWNLOAD_MB")


def check_file(path: Path, ref: str) -> MediaInput:
    """Kind from content (not name), then a cheap decode so truncated files fail here."""
    if not path.exists():
        raise MediaError(f"no such file: {ref}", hint="check the path")
    if path.is_dir():
        raise MediaError(f"{ref} is a directory; expected an image or video file")
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as e:
        raise MediaError(f"cannot read {ref}: {e.strerror}") from None
    if not head:
        raise MediaError(f"{ref} is empty (0 bytes); expected an image or video")
    found = sniff(head)
    ext = path.suffix.lower()
    if found is None:
        if ext in IMAGE_EXTS or ext in VIDEO_EXTS:
            raise MediaError(f"{ref} is named {ext} but its content is not an image or video "
                             f"(starts with {head[:16]!r})", hint="is it the file you meant?")
        raise MediaError(f"unsupported media type: {ref} is neither a known image nor video format",
                         hint="supported: PNG, JPEG, GIF, BMP, TIFF, WebP images; MP4, MOV, WebM, MKV, AVI videos")
    kind = found[0]
    (_check_image if kind == "image" else _check_video)(path, ref)
    return MediaInput(kind, path, ref)


def _check_image(path: Path, ref: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        raise MediaError(f"{ref} is a truncated or corrupt image ({e})", hint="re-export or re-download it") from None


def _check_video(path: Path, ref: str) -> None:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{ref} has no video stream", hint="pass an image or a video with pictures")
            next(container.decode(video=0))
    except MediaError:
        raise
    except StopIteration:
        raise MediaError(f"{ref} is a video without a single decodable frame", hint="re-encode or re-download it") from None
    except Exception as e:  # av raises its own error tree for broken containers
        raise MediaError(f"{ref} is a truncated or corrupt video ({type(e).__name__}: {e})",
                         hint="re-encode or re-download it") from None
