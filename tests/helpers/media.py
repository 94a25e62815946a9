"""Test media made on the fly: small images in every mode, PyAV-encoded videos, broken files.

Videos carry their frame index in their pixels: the bottom half is 8 vertical stripes, black or
white by the bits of the index, so a test can read back which frames a decoder kept even after
lossy compression (``read_indices``).
"""

from __future__ import annotations

import io
import struct
import wave
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------------
# Images


def pattern(width: int, height: int, seed: int = 0, noise: float = 20.0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus noise, so resizing and patch order both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], axis=-1)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def make_image(mode: str, width: int = 40, height: int = 30, seed: int = 0,
               noise: float = 20.0) -> Image.Image:
    """A PIL image in ``mode``: RGB, RGBA, LA, L, P, P+transparency ('PT'), CMYK, I;16, 1."""
    rgb = Image.fromarray(pattern(width, height, seed, noise))
    if mode == "RGBA":
        alpha = Image.fromarray(pattern(width, height, seed + 1)[:, :, 0])
        out = rgb.copy()
        out.putalpha(alpha)
        return out
    if mode == "LA":
        return make_image("RGBA", width, height, seed).convert("LA")
    if mode == "PT":
        out = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        out.info["transparency"] = 0
        return out
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    if mode == "I;16":
        grey = pattern(width, height, seed)[:, :, 0].astype(np.uint16) * 257  # full 16-bit range
        return Image.fromarray(grey).convert("I;16") if Image.fromarray(grey).mode != "I;16" \
            else Image.fromarray(grey)
    return rgb.convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(width: int = 60, height: int = 40, orientation: int = 6) -> bytes:
    """A JPEG stored width x height whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    image = Image.fromarray(pattern(width, height, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif(frames: int = 3, width: int = 32, height: int = 24) -> bytes:
    images = [Image.fromarray(pattern(width, height, seed)) for seed in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression-bomb stand-in)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


FAKE_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
FAKE_AVIF = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64


# ------------------------------------------------------------------------------------------------
# Videos


def make_video(path: Path, fps: float = 10, frames: int = 20, width: int = 64, height: int = 48,
               codec: str = "mpeg4", faststart: bool = False) -> Path:
    """Encode ``frames`` frames at ``fps``: textured top half, frame index in bits below."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for i in range(frames):
            pixels = pattern(width, height, i)  # texture for the resize and stamp checks
            pixels[height // 2:] = index_stripes(i, width, height - height // 2)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def index_stripes(index: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3): 8 stripes, stripe b white when bit b of ``index`` (mod 256) is set."""
    bits = np.array([(index >> b) & 1 for b in range(8)], dtype=np.uint8) * 255
    return np.repeat(bits[np.arange(width) * 8 // width], 3).reshape(1, width, 3).repeat(height, 0)


def read_indices(frames: np.ndarray) -> list[int]:
    """The frame index each decoded (T, H, W, 3) frame carries (mod 256)."""
    T, H, W, _ = frames.shape
    out = []
    for frame in frames:
        band = frame[H // 2 + 2: H - 2].mean(axis=(0, 2))  # (W,) away from block edges
        bits = [band[(2 * b + 1) * W // 16] > 128 for b in range(8)]
        out.append(sum(1 << b for b, on in enumerate(bits) if on))
    return out


def empty_video(path: Path) -> Path:
    """A container with a video stream and no frames (give an .avi path: MP4 drops the stream)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    return path


def audio_only(path: Path, seconds: float = 0.2) -> Path:
    """A WAV file: a valid media container without a video stream."""
    rate = 8000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(rate * seconds))
    return path


def truncate(path: Path, keep: float = 0.5, out: Path | None = None) -> Path:
    """Write the first ``keep`` fraction of ``path``'s bytes to ``out`` (default: in place)."""
    data = path.read_bytes()
    out = out or path
    out.write_bytes(data[: int(len(data) * keep)])
    return out
