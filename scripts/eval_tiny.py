"""Held-out accuracy of ernie-tiny through the real pipeline: files on disk -> processor -> model -> greedy generate.

Fresh scenes (PNG and JPEG) and clips (MP4) come from scripts/shapes.py with a seed the training
never used. An image answer is right when it names exactly the scene's shapes and colours in
left-to-right order; a video answer when it names the shape, its colour and its direction.
Follow-ups are second chat turns: a first picture or clip and the model's own answer stay in
the conversation, and only the answer about the second one is scored.

    python scripts/eval_tiny.py                      # 200 images, 50 videos, 50 follow-ups, the shipped checkpoint
    python scripts/eval_tiny.py --images 20 --videos 6 --model-dir /tmp/ernie-tiny
    python scripts/eval_tiny.py --dtype bfloat16 --quantize int4    # weight-only int4 (as --quantize int4)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import shapes  # noqa: E402

ASSET = ROOT / "ernie_cli" / "assets" / "ernie-tiny"
HELD_OUT_SEED = 1_000_003  # training draws from random.Random(seed) with small seeds
_THING = re.compile(rf"\b({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.KINDS)})\b")
_DIRECTION = re.compile(rf"\bmoves from ({'|'.join(shapes.DIRECTIONS)})\b")


def parse_answer(text: str) -> tuple[tuple[str, str], ...] | tuple[tuple[str, str], str | None]:
    """The (colour, shape) pairs an answer names, in order."""
    return tuple(_THING.findall(text.lower()))


def image_correct(answer: str, scene: shapes.Scene) -> bool:
    return parse_answer(answer) == tuple((s.colour, s.kind) for s in scene.shapes)


def colours_correct(answer: str, expected: list[str]) -> bool:
    """The answer names the right colours, one per shape (in any order): the part that needs no layout."""
    return sorted(c for c, _ in parse_answer(answer)) == sorted(expected)


def video_correct(answer: str, clip: shapes.Clip) -> bool:
    direction = _DIRECTION.findall(answer.lower())
    return parse_answer(answer) == ((clip.shape.colour, clip.shape.kind),) and direction == [clip.direction]


def describe(model, processor, media_type: str, path: Path, max_new_tokens: int = 32,
             history: list[dict] | None = None) -> str:
    """Greedy answer to the default prompt for one image or video file, after ``history``
    (earlier chat messages) if given."""
    import torch

    from model.generation.generate import generate

    messages = list(history or []) + user_turn(media_type, path)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True)
    with torch.inference_mode():
        out = generate(model, max_new_tokens=max_new_tokens, do_sample=False, **inputs)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def user_turn(media_type: str, path: Path) -> list[dict]:
    prompt = shapes.IMAGE_PROMPT if media_type == "image" else shapes.VIDEO_PROMPT
    return [{"role": "user", "content": [{"type": media_type, media_type: str(path)}, {"type": "text", "text": prompt}]}]


def evaluate_followups(model, processor, n: int, seed: int = HELD_OUT_SEED + 1, failures: list | None = None) -> dict:
    """Second chat turns, as ``ernie chat`` builds them: a first picture or clip and the model's
    own answer to it stay in the conversation, then a new picture or clip is asked about. Only the
    second answer is scored."""
    rng = random.Random(seed)
    right = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            history: list[dict] = []
            for turn in range(2):
                if rng.random() < 0.5:
                    kind, item = "image", shapes.random_scene(rng)
                    path = shapes.save_image(item, Path(tmp) / f"followup{i}-{turn}.{'png' if rng.random() < 0.5 else 'jpg'}")
                else:
                    kind, item = "video", shapes.random_clip(rng)
                    path = shapes.save_video(item, Path(tmp) / f"followup{i}-{turn}.mp4")
                answer = describe(model, processor, kind, path, history=history)
                history += user_turn(kind, path) + [{"role": "assistant", "content": answer}]
            ok = image_correct(answer, item) if kind == "image" else video_correct(answer, item)
            right += ok
            if not ok and failures is not None:
                failures.append((f"follow-up {path.name}", item.answer, answer))
    return {"followups": n, "followup_accuracy": right / max(n, 1)}


def evaluate_loaded(model, processor, n_images: int, n_videos: int, seed: int = HELD_OUT_SEED,
                    failures: list | None = None) -> dict:
    """Accuracy on ``n_images`` fresh scenes (half PNG, half JPEG) and ``n_videos`` fresh MP4 clips."""
    rng = random.Random(seed)
    right = {"image": 0, "video": 0, "image_colours": 0, "video_colour": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_images):
            scene = shapes.random_scene(rng)
            path = shapes.save_image(scene, Path(tmp) / f"scene{i}.{'png' if i % 2 == 0 else 'jpg'}")
            answer = describe(model, processor, "image", path)
            ok = image_correct(answer, scene)
            right["image"] += ok
            right["image_colours"] += colours_correct(answer, [s.colour for s in scene.shapes])
            if not ok and failures is not None:
                failures.append((path.name, scene.answer, answer))
        for i in range(n_videos):
            clip = shapes.random_clip(rng)
            path = shapes.save_video(clip, Path(tmp) / f"clip{i}.mp4")
            answer = describe(model, processor, "video", path)
            ok = video_correct(answer, clip)
            right["video"] += ok
            right["video_colour"] += colours_correct(answer, [clip.shape.colour])
            if not ok and failures is not None:
                failures.append((path.name, clip.answer, answer))
    n_i, n_v = max(n_images, 1), max(n_videos, 1)
    return {"images": n_images, "videos": n_videos,
            "image_accuracy": right["image"] / n_i, "video_accuracy": right["video"] / n_v,
            "image_colour_accuracy": right["image_colours"] / n_i, "video_colour_accuracy": right["video_colour"] / n_v}


def evaluate(model_dir: Path, n_images: int, n_videos: int, seed: int = HELD_OUT_SEED,
             failures: list | None = None, n_followups: int = 0, dtype: str = "auto",
             quantize: str | None = None) -> dict:
    """Load the checkpoint in ``model_dir`` the way the CLI does (``dtype``, ``quantize``: its
    --dtype and --quantize), then ``evaluate_loaded``."""
    import torch

    from model import load_pretrained
    from processing.processor import ErnieVLProcessor

    torch.manual_seed(0)
    model = load_pretrained(str(model_dir), device="cpu", dtype=dtype, quantize=quantize)
    processor = ErnieVLProcessor.from_pretrained(model_dir)
    result = evaluate_loaded(model, processor, n_images, n_videos, seed=seed, failures=failures)
    if n_followups:
        result.update(evaluate_followups(model, processor, n_followups, seed=seed + 1, failures=failures))
    return result


def quant_spec(args):
    """--quantize plus the two measured choices (lm_head, vision tower) as a model.quantize.QuantSpec."""
    if not args.quantize:
        return None
    from model.quantize import QuantSpec

    return QuantSpec(int(args.quantize[3:]), lm_head=not args.keep_lm_head, vision=args.quantize_vision)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ASSET)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--followups", type=int, default=50, help="second chat turns (new media after a first exchange)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="as the CLI's --dtype (ernie-tiny is stored in float32)")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="as the CLI's --quantize")
    parser.add_argument("--keep-lm-head", action="store_true", help="with --quantize: the vocabulary projection stays float")
    parser.add_argument("--quantize-vision", action="store_true", help="with --quantize: the vision tower too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    failures: list = []
    start = time.time()
    result = evaluate(args.model_dir, args.images, args.videos, seed=args.seed, failures=failures,
                      n_followups=args.followups, dtype=args.dtype, quantize=quant_spec(args))
    result["seconds"] = round(time.time() - start, 1)
    for name, expected, got in failures[:20]:
        print(f"wrong  {name}: expected {expected!r}, got {got!r}")
    print(f"images: {result['image_accuracy']:.1%} right of {args.images} "
          f"(colours alone: {result['image_colour_accuracy']:.1%})")
    print(f"videos: {result['video_accuracy']:.1%} right of {args.videos} "
          f"(colour alone: {result['video_colour_accuracy']:.1%})")
    if args.followups:
        print(f"follow-ups: {result['followup_accuracy']:.1%} right of {args.followups} (second chat turns)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
