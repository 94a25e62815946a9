"""Write the image/video processing goldens under tests/goldens/processing/ from transformers 5.23.

Run from the repository root with the reference installed (pip install -e '.[reference]'):

    .venv/bin/python scripts/make_processing_goldens.py

What it writes (small on purpose; the tests compare our processing against these when the
reference is not installed):

* ``font.ttf`` + ``FONT_LICENSE.txt``: DejaVu Sans Mono (free to redistribute, see the license),
  the font both sides draw video timestamps with;
* ``manifest.json``: versions, the command, and the processor settings used;
* ``sampling.json``: smart_resize results, frame indices from the reference video processor's
  ``sample_frames`` for many (frame count, fps, bounds) cases, and timestamp strings;
* ``images/<case>.<ext>`` inputs and ``images.npz``: per case the reference grid and its
  pixel_values mapped back to 0..255 (uint8, exact: the reference normalises uint8 pixels);
* ``videos/<case>.mp4`` inputs and ``videos.npz``: per case the reference frame indices, grid
  and pixel_values_videos mapped back to 0..255 the same way.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import media  # noqa: E402

OUT = ROOT / "tests" / "goldens" / "processing"
FONT_SOURCE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
FONT_LICENSE = Path("/usr/share/doc/fonts-dejavu-core/copyright")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float64)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float64)

# Small pixel bounds keep the stored tensors small; the defaults are covered by sampling.json.
IMAGE_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 20}
VIDEO_SIZE = {"shortest_edge": 4 * 28 * 28, "longest_edge": 24 * 28 * 28}
VIDEO_FRAMES = {"min_frames": 4, "max_frames": 12}

# name -> (mode, width, height, file format); "exif" is an EXIF-rotated JPEG
IMAGE_CASES = {
    "rgb_tiny": ("RGB", 20, 10, "PNG"),
    "rgb_huge": ("RGB", 600, 450, "PNG"),  # clamps to longest_edge
    "rgb_odd_aspect": ("RGB", 300, 31, "PNG"),
    "rgba": ("RGBA", 45, 61, "PNG"),
    "la": ("LA", 33, 47, "PNG"),
    "grey": ("L", 70, 50, "PNG"),
    "palette": ("P", 50, 40, "PNG"),
    "palette_transparent": ("PT", 40, 50, "PNG"),
    "cmyk": ("CMYK", 60, 40, "JPEG"),
    "grey16": ("I;16", 56, 44, "PNG"),
    "exif": ("exif", 60, 40, "JPEG"),
}

# name -> (fps, frames, width, height, sample fps, sample num_frames)
VIDEO_CASES = {
    "v10fps_2": (10, 25, 64, 48, 2.0, None),  # clamped up to min_frames... then 5 by fps
    "v2997_3": (29.97, 40, 90, 50, 3.0, None),
    "v24_all_odd": (24, 9, 40, 40, None, None),  # every frame, odd count
    "v5_max": (5, 200, 56, 84, 1.0, None),  # 40 s at 1 fps -> clamped to max_frames
    "v25_num6": (25, 30, 48, 64, None, 6),
}


def reference():
    import transformers
    from transformers import Ernie4_5_VLMoeImageProcessorPil, Ernie4_5_VLMoeVideoProcessor

    assert transformers.__version__.startswith("5.23"), transformers.__version__
    image = Ernie4_5_VLMoeImageProcessorPil(size=IMAGE_SIZE)
    video = Ernie4_5_VLMoeVideoProcessor(font=str(OUT / "font.ttf"), size=VIDEO_SIZE, **VIDEO_FRAMES)
    return image, video


def to_uint8(pixel_values: np.ndarray) -> np.ndarray:
    """Undo normalisation on (N, 3*p*p) rows (channel-major) and check it is lossless."""
    n, width = pixel_values.shape
    x = pixel_values.astype(np.float64).reshape(n, 3, width // 3)
    x = (x * CLIP_STD[None, :, None] + CLIP_MEAN[None, :, None]) * 255
    out = np.rint(x)
    assert np.abs(out - x).max() < 1e-3, "reference pixels are not normalised uint8 values"
    return out.clip(0, 255).astype(np.uint8).reshape(n, width)


def image_input(mode: str, width: int, height: int, fmt: str) -> bytes:
    if mode == "exif":
        return media.exif_rotated_jpeg(width, height)
    noise = 0.0 if width * height > 100_000 else 20.0  # big inputs stay small as PNG
    image = media.make_image(mode, width, height, seed=width + height, noise=noise)
    return media.encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def make_images(ref_image) -> None:
    from PIL import Image, ImageOps

    (OUT / "images").mkdir(exist_ok=True)
    arrays = {}
    for name, (mode, width, height, fmt) in IMAGE_CASES.items():
        data = image_input(mode, width, height, fmt)
        path = OUT / "images" / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.write_bytes(data)
        pil = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        out = ref_image(images=[pil], return_tensors="np")
        arrays[f"{name}/grid"] = np.asarray(out["image_grid_thw"])
        arrays[f"{name}/pixels"] = to_uint8(np.asarray(out["pixel_values"]))
    np.savez_compressed(OUT / "images.npz", **arrays)


def make_videos(ref_video) -> dict:
    from transformers.video_utils import read_video_pyav

    (OUT / "videos").mkdir(exist_ok=True)
    arrays, meta = {}, {}
    for name, (fps, frames, width, height, sample_fps, num_frames) in VIDEO_CASES.items():
        path = media.make_video(OUT / "videos" / f"{name}.mp4", fps, frames, width, height)
        sampler = functools.partial(ref_video.sample_frames, fps=sample_fps, num_frames=num_frames)
        video, metadata = read_video_pyav(str(path), sampler)
        out = ref_video(videos=[video], video_metadata=[metadata], do_sample_frames=False,
                        return_tensors="np")
        arrays[f"{name}/grid"] = np.asarray(out["video_grid_thw"])
        arrays[f"{name}/pixels"] = to_uint8(np.asarray(out["pixel_values_videos"]))
        meta[name] = dict(indices=[int(i) for i in metadata.frames_indices],
                          timestamps=[ref_video._convert_timestamp(t) for t in metadata.timestamps],
                          fps=float(metadata.fps), total_frames=int(metadata.total_num_frames))
    np.savez_compressed(OUT / "videos.npz", **arrays)
    return meta


def sampling_cases() -> list[dict]:
    """(total frames, video fps, fps, num_frames, min, max) covering every clamp."""
    cases = []
    for total, video_fps in [(1, 30.0), (7, 24.0), (16, 10.0), (25, 10.0), (100, 29.97),
                             (301, 25.0), (900, 30.0), (1000, 23.976), (5000, 60.0), (37, 7.5)]:
        for fps in [None, 0.5, 1.0, 2.0, 3.0, 30.0]:
            for lo, hi in [(16, 180), (4, 12)]:
                cases.append(dict(total=total, video_fps=video_fps, fps=fps, num_frames=None,
                                  min_frames=lo, max_frames=hi))
    for total, num_frames in [(100, 16), (100, 33), (200, 180), (50, 17), (181, 180)]:
        cases.append(dict(total=total, video_fps=25.0, fps=None, num_frames=num_frames,
                          min_frames=16, max_frames=180))
    return cases


def make_sampling(ref_image, ref_video) -> dict:
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import smart_resize
    from transformers.video_utils import VideoMetadata

    resize = []
    for h, w in [(10, 20), (28, 28), (56, 56), (14, 14), (100, 200), (1080, 1920), (4000, 3000),
                 (3000, 15), (15, 2999), (42, 42), (70, 70), (127, 255), (8000, 8000), (1, 200)]:
        for lo, hi in [(56 * 56, 28 * 28 * 6177), (299 * 28 * 28, 1196 * 28 * 28), (3136, 15680)]:
            resize.append(dict(h=h, w=w, min=lo, max=hi, out=list(smart_resize(h, w, 28, lo, hi))))
    frames = []
    for case in sampling_cases():
        metadata = VideoMetadata(total_num_frames=case["total"], fps=case["video_fps"])
        indices = ref_video.sample_frames(metadata, min_frames=case["min_frames"],
                                          max_frames=case["max_frames"],
                                          num_frames=case["num_frames"], fps=case["fps"])
        frames.append(dict(case, indices=[int(i) for i in indices]))
    seconds = [0.0, 0.1, 0.5, 1 / 3, 9.999, 59.99, 59.996, 60.0, 61.25, 3599.99, 3600.0, 3725.5,
               36000.0, 86399.5, 12.345]
    stamps = [dict(seconds=s, text=ref_video._convert_timestamp(s)) for s in seconds]
    return dict(smart_resize=resize, sample_frames=frames, timestamps=stamps)


def dump_lines(d: dict) -> str:
    """JSON with one line per record, so diffs of regenerated goldens stay readable."""
    parts = []
    for key, value in d.items():
        items = value.items() if isinstance(value, dict) else enumerate(value)
        body = ",\n".join((f"  {json.dumps(k)}: " if isinstance(value, dict) else "  ")
                          + json.dumps(v) for k, v in items)
        open_, close = ("{", "}") if isinstance(value, dict) else ("[", "]")
        parts.append(f" {json.dumps(key)}: {open_}\n{body}\n {close}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main() -> None:
    import PIL
    import av
    import torch
    import torchvision
    import transformers

    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FONT_SOURCE, OUT / "font.ttf")
    shutil.copyfile(FONT_LICENSE, OUT / "FONT_LICENSE.txt")
    ref_image, ref_video = reference()
    make_images(ref_image)
    videos = make_videos(ref_video)
    sampling = make_sampling(ref_image, ref_video)
    (OUT / "sampling.json").write_text(dump_lines(dict(sampling, videos=videos)))
    manifest = dict(
        command="python scripts/make_processing_goldens.py",
        reference="transformers Ernie4_5_VLMoeImageProcessorPil / Ernie4_5_VLMoeVideoProcessor",
        versions=dict(transformers=transformers.__version__, torch=torch.__version__,
                      torchvision=torchvision.__version__, pillow=PIL.__version__,
                      av=av.__version__, numpy=np.__version__),
        font=f"{FONT_SOURCE.name} from fonts-dejavu-core, see FONT_LICENSE.txt",
        image_size=IMAGE_SIZE, video_size=VIDEO_SIZE, video_frames=VIDEO_FRAMES,
        image_cases=IMAGE_CASES, video_cases=VIDEO_CASES,
        pixels="reference pixel values mapped back to 0..255: x * std + mean, times 255, rounded",
    )
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: " + ", ".join(sorted(p.name for p in OUT.iterdir())))


if __name__ == "__main__":
    main()
