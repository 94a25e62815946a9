"""Synthetic shapes: the scenes and clips ernie-tiny learns to describe.

A scene is a light-grey canvas (each channel 225-255) holding 1 to 3 flat shapes that do not
overlap: circles, axis-aligned squares and upright triangles in one of six colours, each channel
jittered by up to 20. Its answer names the shapes from left to right (by centre x):
``A red circle, a blue square and an orange triangle.``

A clip is one such shape crossing most of the frame left-to-right, right-to-left, top-to-bottom
or bottom-to-top in 2-6 seconds at 10-30 fps: ``A red circle moves from left to right.``

Everything is a pure function of a ``random.Random``, so a seed reproduces a data set.

    python scripts/shapes.py examples/          # writes examples/shapes.png and a few small .mp4
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220),
    "yellow": (235, 200, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
JITTER = 20
SIDE_RANGE = (96, 320)
SIZE_RANGE = (0.15, 0.40)  # shape size as a fraction of the canvas' shorter side
MIN_X_GAP = 0.06  # centres at least this fraction of the width apart, so "left to right" is defined
IMAGE_PROMPT = "Describe this image."
VIDEO_PROMPT = "Describe this video."


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float  # circle diameter, square side, triangle base and height

    @property
    def box(self) -> tuple[float, float, float, float]:
        r = self.size / 2
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)

    def moved(self, cx: float, cy: float) -> "Shape":
        return Shape(self.kind, self.colour, self.rgb, cx, cy, self.size)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]  # sorted left to right

    @property
    def answer(self) -> str:
        return describe(self.shapes)


@dataclass(frozen=True)
class Clip:
    width: int
    height: int
    background: tuple[int, int, int]
    shape: Shape  # position of the first frame
    direction: str
    fps: int
    n_frames: int
    end: tuple[float, float]  # centre at the last frame

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def answer(self) -> str:
        return f"{_article(self.shape.colour).title()} {self.shape.colour} {self.shape.kind} moves from {self.direction}."

    def centre(self, i: int) -> tuple[float, float]:
        a = i / max(self.n_frames - 1, 1)
        return (self.shape.cx + a * (self.end[0] - self.shape.cx), self.shape.cy + a * (self.end[1] - self.shape.cy))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(shapes: tuple[Shape, ...] | list[Shape]) -> str:
    """``A red circle.`` / ``A red circle and an orange square.`` / ``A red circle, a ... and a ....``"""
    names = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in sorted(shapes, key=lambda s: s.cx)]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


# --- sampling ---------------------------------------------------------------------------------

def _jittered(rng: random.Random, colour: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLOURS[colour])


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(225, 255) for _ in range(3))


def _disjoint(a: Shape, b: Shape, margin: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0


def _place(rng: random.Random, w: int, h: int, placed: list[Shape], size_range: tuple[float, float]) -> Shape | None:
    kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
    for _ in range(60):
        size = rng.uniform(*size_range) * min(w, h)
        r = size / 2
        s = Shape(kind, colour, _jittered(rng, colour), rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1), size)
        if all(_disjoint(s, p, 2) and abs(s.cx - p.cx) >= MIN_X_GAP * w for p in placed):
            return s
    return None


def random_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    """1-3 shapes (or exactly ``n_shapes``); retries with smaller shapes when they do not fit."""
    n = n_shapes or rng.randint(1, 3)
    w, h = rng.randint(*SIDE_RANGE), rng.randint(*SIDE_RANGE)
    size_range = SIZE_RANGE
    while True:
        placed: list[Shape] = []
        for _ in range(n):
            s = _place(rng, w, h, placed, size_range)
            if s is None:
                break
            placed.append(s)
        if len(placed) == n:
            return Scene(w, h, _background(rng), tuple(sorted(placed, key=lambda s: s.cx)))
        size_range = (SIZE_RANGE[0], max(SIZE_RANGE[0], size_range[1] - 0.05))


def random_clip(rng: random.Random) -> Clip:
    """One shape crossing 70-80% of the frame along its direction; even sides for H.264."""
    w, h = rng.randint(48, 160) * 2, rng.randint(48, 160) * 2
    kind, colour, direction = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
    size = rng.uniform(0.15, 0.35) * min(w, h)
    fps, seconds = rng.randint(10, 30), rng.uniform(2.0, 6.0)
    horizontal = direction in DIRECTIONS[:2]
    along, across = (w, h) if horizontal else (h, w)
    lo, hi = max(size / 2 + 1, 0.1 * along), min(along - size / 2 - 1, 0.9 * along)
    start, end = (lo, hi) if direction in ("left to right", "top to bottom") else (hi, lo)
    cross = rng.uniform(size / 2 + 1, across - size / 2 - 1)
    (x0, y0), (x1, y1) = ((start, cross), (end, cross)) if horizontal else ((cross, start), (cross, end))
    shape = Shape(kind, colour, _jittered(rng, colour), x0, y0, size)
    return Clip(w, h, _background(rng), shape, direction, fps, max(2, round(fps * seconds)), (x1, y1))


# --- rendering --------------------------------------------------------------------------------

def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    if s.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=s.rgb)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=s.rgb)
    else:
        draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=s.rgb)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw(draw, s)
    return img


def render_frame(clip: Clip, i: int) -> Image.Image:
    img = Image.new("RGB", (clip.width, clip.height), clip.background)
    _draw(ImageDraw.Draw(img), clip.shape.moved(*clip.centre(i)))
    return img


def frames(clip: Clip) -> np.ndarray:
    """All frames as uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(render_frame(clip, i)) for i in range(clip.n_frames)])


def as_jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    """The image after a JPEG round trip (the artefacts a .jpg on disk would carry)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def save_image(scene: Scene, path: str | Path) -> Path:
    path = Path(path)
    render(scene).save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else render(scene).save(path)
    return path


def save_video(clip: Clip, path: str | Path) -> Path:
    """Write the clip as H.264 MP4 (yuv420p) with PyAV."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=clip.fps)
        stream.width, stream.height, stream.pix_fmt = clip.width, clip.height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(clip.n_frames):
            for packet in stream.encode(av.VideoFrame.from_image(render_frame(clip, i))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


# --- examples ---------------------------------------------------------------------------------

EXAMPLE_SCENE = Scene(224, 160, (240, 240, 240), (
    Shape("circle", "red", COLOURS["red"], 44.0, 70.0, 52.0),
    Shape("square", "blue", COLOURS["blue"], 112.0, 96.0, 48.0),
    Shape("triangle", "green", COLOURS["green"], 180.0, 66.0, 56.0),
))


EXAMPLE_CLIPS = (("circle", "red", "left to right"), ("square", "blue", "top to bottom"))


def write_examples(out_dir: Path) -> list[Path]:
    """examples/shapes.png (a fixed three-shape scene) and two small clips."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [save_image(EXAMPLE_SCENE, out_dir / "shapes.png")]
    for kind, colour, direction in EXAMPLE_CLIPS:
        clip = example_clip(kind, colour, direction)
        written.append(save_video(clip, out_dir / f"{colour}-{kind}-{direction.replace(' ', '-')}.mp4"))
    return written


def example_clip(kind: str, colour: str, direction: str) -> Clip:
    """A small, short clip (160x128, 3 s at 10 fps) of the given shape and direction."""
    w, h, size = 160, 128, 36.0
    horizontal = direction in DIRECTIONS[:2]
    along = w if horizontal else h
    lo, hi = 0.1 * along + size / 2, 0.9 * along - size / 2
    start, end = (lo, hi) if direction in ("left to right", "top to bottom") else (hi, lo)
    a, b = ((start, h / 2), (end, h / 2)) if horizontal else ((w / 2, start), (w / 2, end))
    shape = Shape(kind, colour, COLOURS[colour], a[0], a[1], size)
    return Clip(w, h, (238, 238, 238), shape, direction, 10, 30, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("examples"))
    args = parser.parse_args()
    for path in write_examples(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
