"""Videos -> vision patches: decode (PyAV, OpenCV fallback), sample frames, stamp times, patchify.

Behaviour follows transformers 5.23's ERNIE 4.5 VL video processor:

* the frame count, fps and duration come from the container's video stream;
* frames are sampled at ``fps`` (or a fixed ``num_frames``), the count clamped to
  [min_frames, max_frames] and to the number of frames, at evenly spaced indices;
* each sampled frame gets ``time: HH:MM:SS.ss`` drawn at its top-left corner at full
  resolution (black text, white outline) before it is resized;
* an odd number of frames repeats the last one (the model merges frames in pairs);
* frames are resized (antialiased bicubic) within the video pixel bounds, normalised, and cut
  into 14x14 patches frame by frame, merge window by merge window; the grid's t counts frames.

Hostile files are bounded: only the frames needed are kept, each frame's size is capped, and the
total decoded size is checked before decoding starts.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from model.errors import MediaError
from processing.image import (CLIP_MEAN, CLIP_STD, check_aspect_ratio, config_fields,
                              smart_resize)
from processing.media import Source, describe, read_head, read_source, sniff_kind, unsupported_message
from processing.media_cache import ByteLRU

MAX_FRAME_PIXELS = 7680 * 4320  # 8K UHD
MAX_DECODED_BYTES = 3 * 1024 ** 3  # the selected frames, RGB, at their native size
STAMP_SIZE_FACTOR = 0.1  # font size / shorter side, and outline width / font size
# Frames smaller than this (pixels) decode on one thread: FFmpeg's threads cost more than they
# save there. h264 clips of 60 frames, PyAV 18, 2 cores: 160x128 0.6 ms on one thread against 1.2
# with FFmpeg's default; 480x270 1.3 against 1.5; 640x360 1.8 against 1.6; 1280x720 5.9 against 3.6.
THREADED_DECODE_FROM = 640 * 360


@dataclass(frozen=True)
class VideoProcessorConfig:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 299 * 28 * 28
    max_pixels: int = 1196 * 28 * 28
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_convert_rgb: bool = True
    fps: float | None = None  # None (and no num_frames): every frame, within the bounds below
    num_frames: int | None = None
    min_frames: int = 16
    max_frames: int = 180
    draw_timestamps: bool = True
    font_path: str | None = None  # None: Pillow's bundled font, with a warning
    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | Path | None = None) -> "VideoProcessorConfig":
        """From video_preprocessor_config.json, or processor_config.json's 'video_processor' part.

        The font the config names (``font``) is looked up in ``base_dir`` (the checkpoint
        directory); when it is not there, timestamps fall back to Pillow's font.
        """
        d = d.get("video_processor", d)
        default = cls()
        fields = config_fields(d, default)
        if fields["temporal_patch_size"] != 2:
            raise MediaError(f"Expected temporal_patch_size 2 in the video processor config, found "
                             f"{fields['temporal_patch_size']}.", hint="ERNIE 4.5 VL merges frames in pairs.")
        fps, num_frames = d.get("fps"), d.get("num_frames")
        return cls(
            **fields,
            fps=float(fps) if fps is not None else None,
            num_frames=int(num_frames) if num_frames is not None else None,
            min_frames=int(d.get("min_frames", default.min_frames)),
            max_frames=int(d.get("max_frames", default.max_frames)),
            draw_timestamps=bool(d.get("draw_on_frames", default.draw_timestamps)),
            font_path=_resolve_font(d.get("font"), base_dir),
        )


def _resolve_font(name: str | None, base_dir: str | Path | None) -> str | None:
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path) if path.is_file() else None


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8, the selected frames only
    indices: list[int]  # index of each selected frame in decode order
    timestamps: list[float]  # seconds: index / fps
    fps: float
    duration: float  # seconds: total_frames / fps
    total_frames: int


@dataclass(frozen=True)
class VideoBatch:
    pixel_values_videos: torch.Tensor  # (sum of t*h*w over videos, 3*patch*patch) float32
    video_grid_thw: torch.Tensor  # (n_videos, 3) int64: t = frames after padding to even
    timestamps: list[list[float]]  # per video, per selected frame (before padding)


# ----------------------------------------------------------------------------------------------
# Frame selection and timestamps (pure)


def sample_indices(total_frames: int, video_fps: float, fps: float | None = None,
                   num_frames: int | None = None, min_frames: int = 16,
                   max_frames: int = 180) -> list[int]:
    """Indices of the frames to keep, evenly spaced from 0.

    With ``num_frames`` that many (it must lie in [min_frames, max_frames]); otherwise
    ``duration * fps`` frames (every frame when fps is None), clamped to [min_frames,
    max_frames] and then to ``total_frames``. The count may be fractional: the spacing is
    total / count and the indices are 0, spacing, 2*spacing, ... truncated (float32 steps, as
    torch.arange computes them), so e.g. 33.3 frames out of 100 gives 34 indices.
    """
    if fps is not None and num_frames is not None:
        raise MediaError(f"Expected either a sampling fps or a number of frames, found both "
                         f"(fps={fps}, num_frames={num_frames}).", hint="Pass only one of them.")
    if total_frames <= 0:
        raise MediaError(f"Expected a video with frames, found {total_frames} frames.")
    if num_frames is not None:
        if not min_frames <= num_frames <= max_frames:
            raise MediaError(f"Expected a number of frames between {min_frames} and {max_frames}, "
                             f"found {num_frames}.", hint="Choose a frame count in that range, "
                             "or change min/max frames.")
        count: float = num_frames
    else:
        if fps is not None and fps <= 0:
            raise MediaError(f"Expected a positive sampling fps, found {fps}.")
        count = total_frames / video_fps * fps if fps is not None else total_frames
        count = min(max(count, min_frames), max_frames, total_frames)
    if count > total_frames:
        raise MediaError(f"Cannot sample {count} frames from a video that has {total_frames}.",
                         hint="Ask for fewer frames, or a lower fps.")
    steps = torch.arange(0, total_frames, total_frames / count)  # float32, like the reference
    return steps.int().tolist()


def format_timestamp(seconds: float) -> str:
    """'time: HH:MM:SS.ss' (seconds zero-padded to 5 characters, 2 decimals)."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{secs:05.2f}"


# ----------------------------------------------------------------------------------------------
# Decoding


def load_video(source: Source, cfg: VideoProcessorConfig, fps: float | None = None,
               num_frames: int | None = None, max_frames: int | None = None) -> DecodedVideo:
    """Decode the frames of ``source`` that sampling selects (explicit arguments beat cfg's)."""
    name = describe(source)
    data = read_source(source)
    if sniff_kind(read_head(data)) == "image":
        raise MediaError(f"Expected a video, found an image: {name}.", hint="Pass it as an image.")
    if fps is None and num_frames is None:
        fps, num_frames = cfg.fps, cfg.num_frames
    max_frames = cfg.max_frames if max_frames is None else max_frames
    pick = dict(fps=fps, num_frames=num_frames, min_frames=min(cfg.min_frames, max_frames),
                max_frames=max_frames)
    try:
        import av  # noqa: F401
    except ImportError:
        return _decode_opencv(data, name, cfg, pick)
    return _decode_pyav(data, name, cfg, pick)


def _decode_pyav(data: bytes | Path, name: str, cfg: VideoProcessorConfig, pick: dict) -> DecodedVideo:
    import av

    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data))
    except av.error.FFmpegError as err:
        message, hint = unsupported_message(name, read_head(data), "video")
        raise MediaError(message, hint=hint) from err
    with container:
        if not container.streams.video:
            raise MediaError(f"Expected a video stream in {name}, found none "
                             f"({len(container.streams.audio)} audio streams).",
                             hint="Pass a file that contains video.")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        video_fps = _stream_fps(stream)
        total = stream.frames or _count_packets(container, stream, name)
        _check_geometry(width, height, name, cfg)
        indices = _select(total, video_fps, name, pick)
        _check_budget(len(indices), width, height, name, cfg)
        if width * height < THREADED_DECODE_FROM:
            stream.codec_context.thread_count = 1
        try:
            container.seek(0)
            frames = _collect(container.decode(stream), indices, width, height, name)
        except av.error.FFmpegError as err:
            raise MediaError(f"Cannot decode {name}: the video is corrupt or truncated ({err}).",
                             hint="Re-export or re-download the file.") from err
    return _finish(frames, indices, total, video_fps, name)


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    warnings.warn("The video does not state its frame rate; assuming 24 fps.", stacklevel=3)
    return 24.0


def _count_packets(container, stream, name: str) -> int:
    """Frame count for containers that do not state it (WebM, MKV): demux without decoding."""
    try:
        count = sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as err:  # any demuxer failure means the file is unusable
        raise MediaError(f"Cannot read the frames of {name}: the video is corrupt ({err}).") from err
    if count == 0:
        raise MediaError(f"Expected a video with frames, found a video stream with 0 frames in {name}.",
                         hint="The file may be empty or truncated; re-export it.")
    return count


def _check_geometry(width: int, height: int, name: str, cfg: VideoProcessorConfig) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"Expected a video with positive frame size, found {width}x{height} in {name}.")
    if width * height > cfg.max_frame_pixels:
        raise MediaError(f"Refusing to decode {name}: frames may have at most "
                         f"{cfg.max_frame_pixels:,} pixels, found {width}x{height}.",
                         hint="Downscale the video first (e.g. to 1080p).")
    check_aspect_ratio(width, height, name)


def _select(total: int, video_fps: float, name: str, pick: dict) -> list[int]:
    if total <= 0:
        raise MediaError(f"Expected a video with frames, found 0 frames in {name}.",
                         hint="The file may be empty or truncated; re-export it.")
    return sample_indices(total, video_fps, **pick)


def _check_budget(count: int, width: int, height: int, name: str, cfg: VideoProcessorConfig) -> None:
    needed = count * width * height * 3
    if needed > cfg.max_decoded_bytes:
        raise MediaError(f"Refusing to decode {name}: {count} frames of {width}x{height} need "
                         f"{needed / 1024 ** 3:.1f} GiB, over the {cfg.max_decoded_bytes / 1024 ** 3:.1f}"
                         " GiB limit.", hint="Sample fewer frames (lower fps or max frames) or "
                         "downscale the video.")


def _collect(frames, indices: list[int], width: int, height: int, name: str) -> np.ndarray:
    """Keep the frames at ``indices`` (decode order) from a stream of decoded frames."""
    wanted = {i: slot for slot, i in enumerate(indices)}
    out = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    kept = 0
    to_rgb = None
    for i, frame in enumerate(frames):
        if i > indices[-1]:
            break
        if i in wanted:
            if hasattr(frame, "reformat"):  # a PyAV frame
                if to_rgb is None:  # one converter for the video: each frame's own would set one up per frame
                    from av.video.reformatter import VideoReformatter

                    to_rgb = VideoReformatter()
                rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            else:
                rgb = frame
            if rgb.shape != out.shape[1:]:
                raise MediaError(f"Expected every frame of {name} to be {width}x{height}, found "
                                 f"{rgb.shape[1]}x{rgb.shape[0]} at frame {i}.",
                                 hint="Re-encode the video at a fixed size.")
            out[wanted[i]] = rgb
            kept += 1
    return out[:kept]


def _finish(frames: np.ndarray, indices: list[int], total: int, video_fps: float,
            name: str) -> DecodedVideo:
    if len(frames) == 0:
        raise MediaError(f"Expected decodable frames in {name}, found none: the video is corrupt "
                         "or truncated.", hint="Re-export or re-download the file.")
    if len(frames) < len(indices):
        # Headers that overstate the count by a frame or two are common; more is truncation.
        if indices[len(frames)] < total - 2:
            raise MediaError(f"{name} is truncated: its header declares {total} frames but "
                             f"decoding stopped before frame {indices[len(frames)]}.",
                             hint="Re-export or re-download the file.")
        indices = indices[:len(frames)]
    return DecodedVideo(frames=frames, indices=indices,
                        timestamps=[i / video_fps for i in indices], fps=video_fps,
                        duration=total / video_fps, total_frames=total)


def _decode_opencv(data: bytes | Path, name: str, cfg: VideoProcessorConfig, pick: dict) -> DecodedVideo:
    """The same selection through OpenCV, used when PyAV is not installed."""
    import cv2

    tmp = None
    if isinstance(data, bytes):
        tmp = tempfile.NamedTemporaryFile(suffix=".video", delete=False)
        tmp.write(data)
        tmp.close()
    try:
        capture = cv2.VideoCapture(tmp.name if tmp else str(data))
        if not capture.isOpened():
            message, hint = unsupported_message(name, read_head(data), "video")
            raise MediaError(message, hint=hint)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        video_fps = float(capture.get(cv2.CAP_PROP_FPS)) or 24.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        _check_geometry(width, height, name, cfg)
        indices = _select(total, video_fps, name, pick)
        _check_budget(len(indices), width, height, name, cfg)
        frames = _collect(_opencv_frames(capture, cv2), indices, width, height, name)
        capture.release()
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return _finish(frames, indices, total, video_fps, name)


def _opencv_frames(capture, cv2):
    while True:
        ok, bgr = capture.read()
        if not ok:
            return
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Stamping, resizing, patches


def stamp_frame(frame: np.ndarray, text: str, font_path: str | None) -> np.ndarray:
    """The frame with ``text`` drawn at (0, 0): black fill, white outline, sized to the frame."""
    out = frame.copy()
    stamp_in_place(out, text, font_path)
    return out


def stamp_in_place(frame: np.ndarray, text: str, font_path: str | None) -> None:
    """Draw ``text`` over ``frame`` (H, W, 3) uint8, changed in place. Only the top-left corner
    that the text covers goes through Pillow: converting a whole 1080p frame to an image and back
    costs 14 ms, drawing the text 1 ms. Each pixel's result depends only on that pixel and the
    text's masks, so the corner gives the same bytes as the whole frame would."""
    height, width = frame.shape[:2]
    font_size = int(min(height, width) * STAMP_SIZE_FACTOR)
    if font_size < 1:  # frames under 10 pixels: nothing legible fits
        return
    font = _font(font_path, font_size)
    stroke = int(font_size * STAMP_SIZE_FACTOR)
    _, _, right, bottom = _MEASURE.textbbox((0, 0), text, font=font, stroke_width=stroke)
    w, h = min(width, int(right) + STAMP_MARGIN), min(height, int(bottom) + STAMP_MARGIN)
    corner = Image.fromarray(np.ascontiguousarray(frame[:h, :w]))
    ImageDraw.Draw(corner).text((0, 0), text, font=font, fill=(0, 0, 0), stroke_width=stroke,
                                stroke_fill=(255, 255, 255))
    frame[:h, :w] = np.asarray(corner)


STAMP_MARGIN = 2  # pixels kept around the text's box (antialiasing at its edge)
_MEASURE = ImageDraw.Draw(Image.new("L", (1, 1)))  # text boxes only; draws nothing
_THREAD_FONTS = threading.local()  # a FreeType face is not for two threads at once
FONTS_PER_THREAD = 8


def _font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The timestamp font at ``size``, loaded once per thread (a load costs as much as drawing)."""
    if font_path is None:
        warnings.warn("No font file in the checkpoint's video processor config; drawing video "
                      "timestamps with Pillow's bundled font, which differs from the model's training "
                      "font.", stacklevel=4)
    fonts = getattr(_THREAD_FONTS, "fonts", None)
    if fonts is None:
        fonts = _THREAD_FONTS.fonts = {}
    font = fonts.pop((font_path, size), None)  # re-inserted below: the dict keeps use order
    if font is None:
        font = _load_font(font_path, size)
        if len(fonts) >= FONTS_PER_THREAD:
            del fonts[next(iter(fonts))]
    fonts[(font_path, size)] = font
    return font


def _load_font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if font_path is None:
        return ImageFont.load_default(size=size)
    try:
        return _MaskKeepingFont(font_path, size)
    except OSError as err:
        raise MediaError(f"Cannot load the timestamp font {font_path}: {err}.",
                         hint="Restore the checkpoint's font file.") from err


class _MaskKeepingFont(ImageFont.FreeTypeFont):
    """A TrueType font that keeps the text masks it renders (and the boxes it measures), shared by
    all threads. The sampled frames' times repeat from video to video (``time: 00:00:01.00`` for
    every clip sampled at 1 fps), and rendering the outlined text is most of the cost of stamping
    a small frame."""

    def getmask2(self, text, *args, **kwargs):
        mode = args[0] if args else kwargs.get("mode", "")
        if mode == "RGBA":  # a colour mask, which Pillow changes after rendering: not kept
            return super().getmask2(text, *args, **kwargs)
        return self._kept("mask", super().getmask2, lambda found: found[0].size[0] * found[0].size[1],
                          text, args, kwargs)

    def getbbox(self, text, *args, **kwargs):
        return self._kept("box", super().getbbox, lambda found: 64, text, args, kwargs)

    def _kept(self, kind: str, make, size_of, text, args, kwargs):
        """``make(text, *args, **kwargs)``, kept in _STAMP_MASKS under this font and the arguments."""
        key = (kind, self.path, self.size, self.index, text, _frozen(args), _frozen(sorted(kwargs.items())))
        found = _STAMP_MASKS.get(key)
        if found is None:
            found = make(text, *args, **kwargs)
            _STAMP_MASKS.put(key, found, size_of(found))
        return found


def _frozen(value: Any) -> Any:
    """Lists (features, start) as tuples, so that the arguments can key a dict."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


_STAMP_MASKS = ByteLRU(16 * 1024 ** 2)  # text masks and boxes, LRU


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, C, H, W) uint8 -> (T, C, height, width) uint8, antialiased bicubic (as torchvision)."""
    if frames.shape[-2:] == (height, width):
        return frames
    try:
        return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False,
                             antialias=True)
    except RuntimeError:  # no native uint8 kernel on this platform: float, then round back
        out = F.interpolate(frames.float(), size=(height, width), mode="bicubic",
                            align_corners=False, antialias=True)
        return out.clamp_(0, 255).round_().to(torch.uint8)


def video_patches(frames: torch.Tensor, cfg: VideoProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) uint8 at the resized size -> ((T*gh*gw, C*p*p) float32, (T, gh, gw))."""
    T, C, H, W = frames.shape
    p, m = cfg.patch_size, cfg.merge_size
    gh, gw = H // p, W // p
    mean = torch.tensor(cfg.image_mean).view(1, C, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, C, 1, 1)
    x = (frames.float() * cfg.rescale_factor - mean) / std
    x = x.view(T, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (T, gh/m, gw/m, m, m, C, p, p)
    return x.reshape(T * gh * gw, C * p * p), (T, gh, gw)


def prepare_frames(video: DecodedVideo, cfg: VideoProcessorConfig) -> torch.Tensor:
    """Stamped (when enabled), padded to an even count, resized: (T, C, h, w) uint8."""
    frames = video.frames
    if cfg.draw_timestamps:
        frames = frames.copy()  # the decoded frames stay as they were
        for frame, t in zip(frames, video.timestamps):
            stamp_in_place(frame, format_timestamp(t), cfg.font_path)
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])
    h, w = smart_resize(frames.shape[1], frames.shape[2], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, C, H, W)
    return resize_frames(tensor.contiguous(), h, w)


def preprocess_videos(videos: list[DecodedVideo], cfg: VideoProcessorConfig) -> VideoBatch:
    """Patches of every video (frames stamped, padded, resized, normalised) and their grids."""
    rows, grids = [], []
    for video in videos:
        patches, grid = video_patches(prepare_frames(video, cfg), cfg)
        rows.append(patches)
        grids.append(grid)
    width = 3 * cfg.patch_size ** 2
    return VideoBatch(
        pixel_values_videos=torch.cat(rows) if rows else torch.zeros(0, width),
        video_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        timestamps=[list(v.timestamps) for v in videos],
    )
