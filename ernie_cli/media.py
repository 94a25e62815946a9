"""Turn what the user typed (a path, an http(s) URL, `-` for stdin, a pipe) into a checked local media file.

Every failure a user can cause becomes a MediaError that names the file and the problem, before
any model is loaded: a missing path, a directory, an empty or truncated file, a text file named
.png, an unsupported type, a URL that fails, a stream or download that is too large or too slow.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from model.errors import DownloadError, ErnieError, MediaError
from processing.media import download

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp"}
CHUNK = 1 << 20
SNIFF_BYTES = 512


@dataclass(frozen=True)
class MediaInput:
    kind: str  # "image" | "video"
    path: Path  # a local file; streamed media (stdin, pipes, downloads) land in the resolver's store
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


@dataclass(frozen=True)
class Limits:
    """Bounds on media that arrive as a stream (stdin, a pipe, a download), from the environment.

    $ERNIE_MAX_DOWNLOAD_MB (200) caps every stream; downloads also get $ERNIE_URL_TIMEOUT (30 s for
    each connect and read) and $ERNIE_URL_DEADLINE (300 s for the whole download).
    """

    max_bytes: int = 200 * 2**20
    timeout: float = 30.0
    deadline: float = 300.0

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(max_bytes=int(env_number("ERNIE_MAX_DOWNLOAD_MB", 200) * 2**20),
                   timeout=env_number("ERNIE_URL_TIMEOUT", 30), deadline=env_number("ERNIE_URL_DEADLINE", 300))


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name`` (``default`` when unset or empty);
    anything else is a one-line ErnieError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ErnieError(f"${name} must be a positive number, found {raw!r}", hint=f"unset it for the default ({default:g})")
    return value


# What to do about each kind of failed download, naming the setting that helps.
DOWNLOAD_HINTS = {
    "too_large": "download it yourself and pass its path, or raise $ERNIE_MAX_DOWNLOAD_MB",
    "deadline": "the server is too slow: download it yourself and pass its path, or raise $ERNIE_URL_DEADLINE",
    "timeout": "check the URL and your network, or raise $ERNIE_URL_TIMEOUT",
    "network": "check the URL and your network",
    "http": "check the URL",
}


class MediaResolver:
    """Resolves references one by one into checked local files.

    Media that arrive as a stream (stdin, a pipe or process substitution such as `<(curl -s URL)`,
    a download) are read once, in chunks, into a private temporary store under $TMPDIR, bounded by
    `Limits`; the type comes from the content. The store lives as long as the resolver: use it as a
    context manager around everything that reads the media, and it is removed on the way out, after
    success, an error, Ctrl-C, or SIGTERM/SIGHUP (turned into an exit while the resolver is open).
    """

    def __init__(self, stdin: BinaryIO | None = None, limits: Limits | None = None, decode_check: bool = True):
        self._stdin = stdin
        self._limits = limits
        self._decode = decode_check  # see check_file
        self._store: Path | None = None
        self._count = 0
        self._handlers: dict[int, object] = {}

    def __enter__(self) -> "MediaResolver":
        self._handlers = _exit_on_termination()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.cleanup()
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
            self._handlers = {}

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_env()
        return self._limits

    def resolve(self, ref: str) -> MediaInput:
        if ref == "-":
            return self._from_stream(self._take_stdin(), "-", "stdin")
        if ref.startswith(("http://", "https://")):
            return self._from_url(ref)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", ref):
            raise MediaError(f"unsupported URL scheme in {ref!r}; expected a file path, http(s) URL or -",
                             hint="download the file first and pass its path")
        path = Path(ref).expanduser()
        if not _is_stream(path):
            return check_file(path, ref, decode=self._decode)
        try:
            stream = open(path, "rb", buffering=0)  # a pipe can be read once: straight into the store
        except OSError as e:
            raise MediaError(f"cannot read {ref}: {e.strerror}") from None
        with stream:
            return self._from_stream(stream, ref, ref)

    def resolve_bytes(self, data: bytes, label: str) -> MediaInput:
        """Bytes from elsewhere (a request body): into the store like stdin (same limit), checked like a file."""
        return self._from_stream(io.BytesIO(data), label, label)

    def cleanup(self) -> None:
        if self._store is not None:
            self._finalizer()
            self._store = None

    def _take_stdin(self) -> BinaryIO:
        if self._stdin is None:
            raise MediaError("`-` reads media from stdin, but stdin was already used or is a terminal",
                             hint="pipe the file in: cat photo.jpg | ernie describe -")
        stream, self._stdin = self._stdin, None
        return stream

    def _from_stream(self, stream: BinaryIO, ref: str, label: str) -> MediaInput:
        limit = self.limits.max_bytes
        with _StoreFile(self._new_path(), label) as sink:
            while chunk := stream.read(CHUNK):
                if sink.size + len(chunk) > limit:
                    raise MediaError(f"{label} is larger than the {limit / 2**20:g} MB limit for media from stdin, "
                                     "pipes and URLs; stopped reading there",
                                     hint="save it to a file and pass its path, or raise $ERNIE_MAX_DOWNLOAD_MB")
                sink.write(chunk)
        return check_file(sink.final_path, ref, label, decode=self._decode)

    def _from_url(self, url: str) -> MediaInput:
        limits = self.limits
        with _StoreFile(self._new_path(), url) as sink:
            try:
                download(url, sink, max_bytes=limits.max_bytes, timeout=limits.timeout, deadline=limits.deadline)
            except DownloadError as e:
                raise DownloadError(str(e), hint=DOWNLOAD_HINTS.get(e.cause, e.hint), cause=e.cause) from None
        return check_file(sink.final_path, url, decode=self._decode)

    def _new_path(self) -> Path:
        if self._store is None:
            try:
                self._store = Path(tempfile.mkdtemp(prefix="ernie-media-"))
            except OSError as e:
                raise _store_error(e) from None
            # also removed when a resolver used without `with` is collected, or at interpreter exit
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._store, ignore_errors=True)
        self._count += 1
        return self._store / f"media{self._count}"


def _empty_stream_hint(label: str) -> str:
    if label.startswith(("http://", "https://")):
        return "the server sent an empty body; check the URL"
    if label.startswith("data:"):
        return "the data: URL carries no payload"
    return f"did the command feeding {label} fail?"


class _StoreFile:
    """A file in the store being filled by a stream: sniffs the type from the first bytes (so a text
    stream stops at once), names the file by it when the stream ends, and removes it on failure."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self.size = 0
        self.head = b""
        self.final_path = path
        self._file = None

    def __enter__(self) -> "_StoreFile":
        try:
            self._file = open(self.path, "wb")
        except OSError as e:
            raise _store_error(e) from None
        return self

    def write(self, chunk: bytes) -> int:
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[:SNIFF_BYTES - len(self.head)]
            if len(self.head) == SNIFF_BYTES:
                self._kind()
        try:
            self._file.write(chunk)
        except OSError as e:  # a full disk, say
            raise _store_error(e) from None
        self.size += len(chunk)
        return len(chunk)

    def __exit__(self, kind, error, tb) -> None:
        try:
            self._file.close()  # writes out the last buffered bytes: a full disk can fail here too
        except OSError as e:
            self.path.unlink(missing_ok=True)
            if kind is None:
                raise _store_error(e) from None
            return  # the error already on its way says what went wrong
        if kind is None:
            try:
                found = self._kind()
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            self.final_path = self.path.with_suffix(found[1])
            self.path.rename(self.final_path)
        else:
            self.path.unlink(missing_ok=True)

    def _kind(self) -> tuple[str, str]:
        if not self.head:
            raise MediaError(f"{self.label} gave 0 bytes; expected an image or video",
                             hint=_empty_stream_hint(self.label))
        found = sniff(self.head)
        if found is None:
            raise MediaError(f"{self.label} is not an image or video (starts with {self.head[:16]!r})",
                             hint="supported: PNG, JPEG, GIF, BMP, TIFF, WebP images; MP4, MOV, WebM, MKV, AVI videos")
        return found


def _store_error(error: OSError) -> MediaError:
    return MediaError(f"cannot keep streamed media under {tempfile.gettempdir()}: {error.strerror or error}",
                      hint="free some space there, or point $TMPDIR at a directory with room")


def reads_stdin(ref: str) -> bool:
    """True for `-` and for a path that names this process's stdin (/dev/stdin, /dev/fd/0, ...)."""
    if ref == "-":
        return True
    try:
        return os.path.samestat(os.stat(ref), os.fstat(0))
    except (OSError, ValueError):
        return False


def _is_stream(path: Path) -> bool:
    """True for what can be read only once: a FIFO (named pipe, `<(...)`, /dev/stdin), a character device."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False  # check_file names the problem
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _exit_on_termination() -> dict[int, object]:
    """While a store exists, SIGTERM and SIGHUP end the command through Python (so `with` blocks
    clean up), exiting 128 + the signal number as a shell would; returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    replaced = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:  # nohup's SIG_IGN and the like stay as they are
            replaced[signum] = signal.signal(signum, leave)
    return replaced


def check_file(path: Path, ref: str, label: str | None = None, decode: bool = True) -> MediaInput:
    """Kind from content (not name), then a cheap decode so truncated files fail here.

    `ref` is what the user typed (kept as the media's source); `label` names it in errors
    (default: `ref`; "stdin" for `-`). `decode=False` skips the decode, for callers that build
    the prompt right away (the processor decodes the file then, with errors of its own): a
    server, and `describe --each`, whose model is loaded or loading already.
    """
    ref, source = label or ref, ref
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
        raise MediaError(f"{ref} is empty (0 bytes); expected an image or video",  # streams stop in _StoreFile
                         hint="was it cut short while it was written or downloaded?")
    found = sniff(head)
    ext = path.suffix.lower()
    if found is None:
        if ext in IMAGE_EXTS or ext in VIDEO_EXTS:
            raise MediaError(f"{ref} is named {ext} but its content is not an image or video "
                             f"(starts with {head[:16]!r})", hint="is it the file you meant?")
        raise MediaError(f"unsupported media type: {ref} is neither a known image nor video format",
                         hint="supported: PNG, JPEG, GIF, BMP, TIFF, WebP images; MP4, MOV, WebM, MKV, AVI videos")
    kind = found[0]
    if decode:
        (_check_image if kind == "image" else _check_video)(path, ref)
    return MediaInput(kind, path, source)


def _check_image(path: Path, ref: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        raise MediaError(f"{ref} is a truncated or corrupt image ({_without_path(e, path, ref)})",
                         hint="re-export or re-download it") from None


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
        # FFmpeg's own words ("Invalid data found when processing input"), without its errno and path
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {_without_path(e, path, ref)}"
        raise MediaError(f"{ref} is a truncated or corrupt video ({reason})", hint="re-encode or re-download it") from None


def _without_path(error: Exception, path: Path, ref: str) -> str:
    """The decoder's message with the file named as the user named it (not a temporary copy's path)."""
    return str(error).replace(str(path), ref)
