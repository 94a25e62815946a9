"""Preprocessed media kept for reuse: a picture or video that comes back is not decoded again.

A conversation is rebuilt from the start at every turn (`ernie chat`, and every request of the
OpenAI API, which sends the whole history each time), so without this every earlier picture and
video of it would be decoded, sampled, stamped and resized again at each turn: seconds for a
long video. Entries are keyed by the file's content (a BLAKE2 digest, so a server's temporary
copy of the same upload hits too) and by everything that shapes the result (the processor
configs, the sampling options); they hold the finished patch rows, at most ``max_bytes`` of them
in all, least recently used first out. Only successes are kept: a broken file fails every time.
The same idea as vLLM's multimodal processor cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable

DEFAULT_MAX_BYTES = 512 * 2**20
_CHUNK = 1 << 20


class ByteLRU:
    """A thread-safe least-recently-used map bounded by the bytes its values are said to take."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        """Keep ``value`` unless it is larger than the whole bound or ``key`` is already kept (two
        threads that made the same entry at once: the first stays); the least recently used leave."""
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = (value, size)
            self._bytes += size
            self._evict()

    def resize(self, max_bytes: int) -> None:
        """A new bound (0 keeps nothing); entries over it leave at once."""
        with self._lock:
            self.max_bytes = max(int(max_bytes), 0)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._items:
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size


class MediaCache:
    """A thread-safe LRU of preprocessed media, bounded by the bytes of their tensors."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.hits = self.misses = 0
        self._entries = ByteLRU(max_bytes)
        self._digests: dict[tuple, str] = {}  # (path, size, mtime_ns) -> content digest
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def size_bytes(self) -> int:
        return self._entries.size_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, max_bytes: int) -> None:
        """A new bound (0 turns the cache off); entries over it leave at once."""
        self._entries.resize(max_bytes)

    def clear(self) -> None:
        self._entries.clear()
        with self._lock:
            self._digests.clear()

    def get_or_make(self, source: Any, shape_key: tuple, make: Callable[[], Any], nbytes: Callable[[Any], int]) -> Any:
        """The cached result for ``source`` (a path or bytes) under ``shape_key``, else ``make()``,
        kept when it fits. Sources without a stable identity (URLs, PIL images, frame lists) are
        always made."""
        digest = self.digest(source) if self.max_bytes > 0 else None
        if digest is None:
            return make()
        key = (digest, shape_key)
        found = self._entries.get(key)
        with self._lock:
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        value = make()
        self._entries.put(key, value, nbytes(value))
        return value

    def digest(self, source: Any) -> str | None:
        """The content digest of a local file or of bytes; None for anything else, or a file that
        cannot be read (the loader then reports it)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            return hashlib.blake2b(source, digest_size=20).hexdigest()
        if not isinstance(source, (str, Path)) or str(source).startswith(("http://", "https://")):
            return None
        path = Path(source)
        try:
            stat = path.stat()
            if not S_ISREG(stat.st_mode):
                return None  # a pipe or device can be read once: the loader's
            identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            with self._lock:
                known = self._digests.get(identity)
            if known is not None:
                return known
            h = hashlib.blake2b(digest_size=20)
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except OSError:
            return None
        with self._lock:
            if len(self._digests) > 4096:  # temporary copies (a server's uploads) come and go
                self._digests.clear()
            self._digests[identity] = h.hexdigest()
        return h.hexdigest()


def max_bytes_from_env(value: str | None = None, default: int = DEFAULT_MAX_BYTES) -> int:
    """``ERNIE_MEDIA_CACHE_MB`` in bytes (``default`` when unset or empty; 0 turns the cache off).
    ValueError on a value that is not a number >= 0."""
    raw = os.environ.get("ERNIE_MEDIA_CACHE_MB") if value is None else value
    if raw is None or not raw.strip():
        return default
    mb = float(raw)
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(raw)
    return int(mb * 2**20)


# The process's cache, shared by every processor (the CLI sizes it from ERNIE_MEDIA_CACHE_MB).
MEDIA_CACHE = MediaCache()
