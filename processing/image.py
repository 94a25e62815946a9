"""Images -> vision patches: load (any mode, EXIF-rotated), smart resize, normalise, patchify.

Behaviour follows transformers 5.23's Pillow-backend ERNIE 4.5 VL image processor:
RGB conversion composites transparency on white; the image is resized (bicubic) so both sides
are multiples of ``patch_size * merge_size`` and the area lies in [min_pixels, max_pixels];
values are rescaled by 1/255 and normalised with CLIP's mean/std; 14x14 patches are emitted
merge window by merge window (the 2x2 patches the resampler fuses are consecutive rows).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from model.errors import MediaError
from processing.media import Source, describe, read_head, read_source, unsupported_message

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Pixels a source image may declare before we refuse to decode it (Pillow's own default bomb
# threshold, ~9459x9459); an RGB copy of it is ~270 MB.
MAX_SOURCE_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (28 by default)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """From preprocessor_config.json, or processor_config.json (its 'image_processor' part).

        Pixel bounds come from ``size: {shortest_edge, longest_edge}`` (transformers' form) or
        ``min_pixels`` / ``max_pixels`` (Baidu's form); unknown keys are ignored.
        """
        d = d.get("image_processor", d)
        return cls(**config_fields(d, cls()))


def config_fields(d: dict[str, Any], default: Any) -> dict[str, Any]:
    """Fields shared by the image and video configs, read from either on-disk form."""
    size = d.get("size") or {}
    out = dict(
        patch_size=int(d.get("patch_size", default.patch_size)),
        merge_size=int(d.get("merge_size", d.get("spatial_conv_size", default.merge_size))),
        temporal_patch_size=int(d.get("temporal_patch_size") or default.temporal_patch_size),
        min_pixels=int(size.get("shortest_edge") or d.get("min_pixels") or default.min_pixels),
        max_pixels=int(size.get("longest_edge") or d.get("max_pixels") or default.max_pixels),
        image_mean=tuple(float(x) for x in d.get("image_mean", default.image_mean)),
        image_std=tuple(float(x) for x in d.get("image_std", default.image_std)),
        rescale_factor=float(d.get("rescale_factor", default.rescale_factor)),
        resample=int(d.get("resample", default.resample)),
        do_convert_rgb=bool(d.get("do_convert_rgb", default.do_convert_rgb)),
    )
    if len(out["image_mean"]) != 3 or len(out["image_std"]) != 3:
        raise MediaError(f"Expected 3 values for image_mean and image_std in the processor "
                         f"config, found {out['image_mean']} and {out['image_std']}.")
    return out


@dataclass(frozen=True)
class ImageBatch:
    pixel_values: torch.Tensor  # (sum of t*h*w over images, 3*patch*patch) float32
    image_grid_thw: torch.Tensor  # (n_images, 3) int64, in patches


# ----------------------------------------------------------------------------------------------
# Loading


def load_image(source: Source | Image.Image, *, max_pixels: int = MAX_SOURCE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, URL, bytes or PIL image, EXIF orientation applied.

    Animated images give their first frame. Refuses images declaring more than ``max_pixels``
    pixels (before decoding them) and aspect ratios over 200:1.
    """
    if isinstance(source, Image.Image):
        image, name = source, "the image"
    else:
        name = describe(source)
        image = _open(read_source(source), name, max_pixels)
    check_aspect_ratio(image.width, image.height, name)
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _open(data: bytes | Path, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode an image file, turning every decoder failure into a MediaError."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
            _check_pixels(image, name, max_pixels)
            image.load()
        except MediaError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            declared = re.search(r"\((\d+) pixels\)", str(err))  # Pillow states the size
            raise _bomb(name, int(declared.group(1)) if declared else None, max_pixels) from err
        except Image.UnidentifiedImageError as err:
            message, hint = unsupported_message(name, read_head(data), "image")
            raise MediaError(message, hint=hint) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise MediaError(f"Cannot decode {name}: the image is corrupt or truncated ({err}).",
                             hint="Re-export or re-download the file.") from err
    return image


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    if image.width * image.height > max_pixels:
        raise _bomb(name, image.size, max_pixels)


def _bomb(name: str, size: tuple[int, int] | int | None, max_pixels: int) -> MediaError:
    if isinstance(size, tuple):
        found = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:
        found = f"{size:,} pixels" if size else "more"
    return MediaError(f"Refusing to decode {name}: images may have at most {max_pixels:,} pixels, "
                      f"found {found} (a possible decompression bomb).",
                      hint="Downscale the image first (e.g. to 4096 pixels on the long side).")


def check_aspect_ratio(width: int, height: int, name: str = "the image") -> None:
    if min(width, height) <= 0:
        raise MediaError(f"Expected an image with positive width and height, found {width}x{height} "
                         f"in {name}.")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(f"Expected an aspect ratio of at most {MAX_ASPECT_RATIO}:1, found "
                         f"{ratio:.0f}:1 ({width}x{height}) in {name}.",
                         hint="Crop the image into less elongated pieces.")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (alpha band or a transparent palette/colour) composited on white.

    Every other mode (L, P, CMYK, I;16, YCbCr, ...) goes through Pillow's own convert('RGB').
    """
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Resizing and patches


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 6177) -> tuple[int, int]:
    """(h, w): multiples of ``factor``, area within [min_pixels, max_pixels], aspect ~kept.

    Sides are rounded to the nearest multiple first (Python's round: halves go to even); when
    that area is too large both sides shrink by the same ratio and floor, when too small they
    grow and ceil.
    """
    check_aspect_ratio(width, height)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def normalize(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 (..., H, W, C) -> float32 (..., H, W, C): rescale, then subtract mean, divide std."""
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (pixels.astype(np.float32) * np.float32(cfg.rescale_factor) - mean) / std


def normalize_rows(rows: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """``normalize`` on patch rows: uint8 (n, C*k) channel-major (``patchify``'s rows) -> float32,
    the same numbers per value. Runs of k values share a channel here, where channels-last
    arrays give numpy an inner loop of 3 (four times slower at 224x224)."""
    n, C = rows.shape[0], len(cfg.image_mean)
    x = rows.reshape(n, C, -1).astype(np.float32)  # (n, C, k)
    x *= np.float32(cfg.rescale_factor)
    x -= np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    x /= np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return x.reshape(n, -1)


def patchify(pixels: np.ndarray, patch: int, merge: int, temporal: int = 1) -> np.ndarray:
    """(H, W, C) -> (gh*gw, C*temporal*patch*patch), rows ordered merge window by window.

    Rows run over merge windows (row-major), then over the merge x merge patches inside a window;
    each row is channel-major, then (repeated) time, then patch row, patch column.
    """
    H, W, C = pixels.shape
    gh, gw = H // patch, W // patch
    x = pixels.reshape(gh // merge, merge, patch, gw // merge, merge, patch, C)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal, patch, patch))
    return x.reshape(gh * gw, C * temporal * patch * patch)


def preprocess_images(images: list[Image.Image], cfg: ImageProcessorConfig) -> ImageBatch:
    """Resized, normalised patches of every image, concatenated, and each image's (1, h, w) grid."""
    rows, grids = [], []
    for image in images:
        if cfg.do_convert_rgb:
            image = to_rgb(image)
        h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        resized = np.asarray(image.resize((w, h), resample=cfg.resample))
        if resized.ndim == 2:  # a single-band image when do_convert_rgb is off
            resized = np.repeat(resized[:, :, None], 3, axis=2)
        # patches of the uint8 pixels first (a quarter of the bytes to move), then normalised
        rows.append(normalize_rows(patchify(resized, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size), cfg))
        grids.append((1, h // cfg.patch_size, w // cfg.patch_size))
    width = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixel_values = np.concatenate(rows) if rows else np.zeros((0, width), np.float32)
    return ImageBatch(pixel_values=torch.from_numpy(np.ascontiguousarray(pixel_values)),
                      image_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3))
