"""Train ernie-tiny: a few-MB ERNIE 4.5 VL MoE that describes synthetic shapes scenes and clips.

The model is our own architecture at toy scale (dense first layer, MoE layers with text and
vision expert banks, 3D RoPE, the variable-resolution resampler), trained from scratch on
scripts/shapes.py data through the same processor that serves it, and saved in Baidu's layout
next to its tokenizer, processor configs and font, so ``ernie describe x.png --model ernie-tiny``
loads it like any other checkpoint.

    python scripts/train_tiny.py --out ernie_cli/assets/ernie-tiny --minutes 25 --seed 0

Curriculum (fractions of the time budget): single shapes first, then 1-3 shapes with clips mixed
in. The loss covers the answer tokens only (labels -100 elsewhere). One update sees ``--batch``
samples (one left-padded batch, as batched inference builds it) times ``--accum``: with one
sample per update the model never starts looking at the image.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import shapes  # noqa: E402

# ERNIE's special tokens, in the order that fixes their ids (0..10) in the tiny vocabulary.
SPECIAL_TOKENS = [
    "<unk>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>",
    "<|IMAGE_END|>", "<|VIDEO_START|>", "<|VIDEO_END|>", "<|VIDEO_PLACEHOLDER|>", "<think>", "</think>",
]
VOCAB_SIZE = 512
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
FONT_LICENSE = Path("/usr/share/doc/fonts-dejavu-core/copyright")

# Processor settings written into the checkpoint (inference uses exactly these).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 224 * 224  # <= 64 merged tokens per image
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 56 * 56, 112 * 112  # <= 16 merged tokens per frame pair
VIDEO_FPS, VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 1.0, 4, 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --- tokenizer --------------------------------------------------------------------------------

def _corpus() -> list[str]:
    """Every answer word and prompt piece, repeated so BPE merges them into whole tokens."""
    scenes = [shapes.describe([shapes.Shape(k, c, (0, 0, 0), 0.0, 0.0, 1.0)]) for c in shapes.COLOURS for k in shapes.KINDS]
    things = [t.rstrip(".").lower() for t in scenes]  # "a red circle", "an orange square", ...
    lines = [shapes.IMAGE_PROMPT, shapes.VIDEO_PROMPT, "User: ", "\nAssistant: ", "Picture 1:", "Video 1:",
             "Picture 2:", "Video 2:", "<think>\n\n</think>\n\n"]
    lines += scenes + [f"{t.capitalize()} and {u}." for t in things for u in things[:6]]
    lines += [f"{t.capitalize()}, {t} and {t}." for t in things]
    lines += [f"{t.capitalize()} moves from {d}." for t in things for d in shapes.DIRECTIONS]
    return lines * 4


def build_tokenizer():
    """ERNIE-style BPE for the shapes domain: special tokens at ids 0..10, then the 256
    byte-fallback tokens <0x00>..<0xFF> (so any UTF-8 text still encodes), then learned pieces,
    with spaces written as "▁" as in ERNIE's SentencePiece vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    draft.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 256, special_tokens=SPECIAL_TOKENS, show_progress=False))
    learned = json.loads(draft.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


NAMED_TOKENS = {
    "image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
    "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>",
}


def tokenizer_config() -> dict:
    """tokenizer_config.json naming the special tokens as transformers' conversion script does."""
    return {
        "tokenizer_class": "TokenizersBackend", "model_max_length": 4096,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": "<|begin_of_sentence|>", "eos_token": "<|end_of_sentence|>", "unk_token": "<unk>",
        "pad_token": "<unk>", "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
        "extra_special_tokens": SPECIAL_TOKENS[3:], **NAMED_TOKENS,
    }


# --- model and checkpoint files ---------------------------------------------------------------

def tiny_config(tok, vision_depth: int = 2, vision_width: int = 96):
    """hidden 128, 3 text layers (dense, MoE, MoE: 4+4 experts top-2, 1 shared), vision 2x96 by default."""
    from model.config import ErnieVLConfig, TextConfig, VisionConfig

    ids = {name: tok.token_to_id(t) for name, t in NAMED_TOKENS.items()}
    text = TextConfig(
        vocab_size=64 * math.ceil(tok.get_vocab_size() / 64), hidden_size=128, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim_override=32,
        max_position_embeddings=4096, rope_theta=500000.0, mrope_section=(6, 6, 4), moe_k=2, moe_num_experts=4,
        moe_intermediate_size=(64, 64), moe_num_shared_experts=1, mlp_layer_types=("dense", "sparse", "sparse"),
        pad_token_id=tok.token_to_id("<unk>"), bos_token_id=tok.token_to_id("<|begin_of_sentence|>"),
        eos_token_id=(tok.token_to_id("<|end_of_sentence|>"),),
    )
    vision = VisionConfig(depth=vision_depth, hidden_size=vision_width, intermediate_size=4 * vision_width,
                          num_heads=vision_width // 32)
    return ErnieVLConfig(text=text, vision=vision, image_token_id=ids["image_token"],
                         image_start_token_id=ids["image_start_token"], image_end_token_id=ids["image_end_token"],
                         video_token_id=ids["video_token"], video_start_token_id=ids["video_start_token"],
                         video_end_token_id=ids["video_end_token"])


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def image_processor_config() -> dict:
    return {
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "patch_size": 14, "temporal_patch_size": 1, "merge_size": 2,
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Ernie4_5_VLMoeImageProcessor",
    }


def video_processor_config() -> dict:
    return {
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, "font": FONT.name,
        "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_sample_frames": True, "fps": VIDEO_FPS, "return_metadata": False,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_frames": VIDEO_MIN_FRAMES,
        "max_frames": VIDEO_MAX_FRAMES, "draw_on_frames": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "video_processor_type": "Ernie4_5_VLMoeVideoProcessor",
    }


def write_text_files(out: Path, tok, config) -> None:
    """Everything but the weights: tokenizer, processor configs, font (+ license), configs."""
    from model.checkpoint.weights import config_to_baidu_dict

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    image_cfg, video_cfg = image_processor_config(), video_processor_config()
    _write_json(out / "processor_config.json", {"image_processor": image_cfg, "video_processor": video_cfg,
                                                "processor_class": "Ernie4_5_VLMoeProcessor"})
    _write_json(out / "preprocessor_config.json", {**image_cfg, "processor_class": "Ernie4_5_VLMoeProcessor"})
    _write_json(out / "video_preprocessor_config.json", {**video_cfg, "processor_class": "Ernie4_5_VLMoeProcessor"})
    shutil.copyfile(FONT, out / FONT.name)
    shutil.copyfile(FONT_LICENSE, out / "DejaVuSans-LICENSE.txt")
    _write_json(out / "config.json", config_to_baidu_dict(config, dtype=torch.float32))
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.text.bos_token_id, "eos_token_id": list(config.text.eos_token_id),
        "pad_token_id": config.text.pad_token_id, "do_sample": False, "max_new_tokens": 32,
    })


def save_weights(out: Path, model, config) -> None:
    """model.safetensors in Baidu's layout (fp32: 8 MB, and no rounding of a tiny model)."""
    from safetensors.torch import save_file

    from model.checkpoint.weights import to_baidu

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(to_baidu(state, config), str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(out / "model.safetensors")


# --- examples ---------------------------------------------------------------------------------

def conversation(media: dict, prompt: str, media_first: bool = True) -> list[dict]:
    content = [media, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": content if media_first else content[::-1]}]


def clip_video(clip: shapes.Clip, vcfg):
    """The frames inference would decode from the clip's MP4 (same sampling, same timestamps)."""
    from processing.video import DecodedVideo, sample_indices

    idx = sample_indices(clip.n_frames, clip.fps, fps=vcfg.fps, num_frames=vcfg.num_frames,
                         min_frames=min(vcfg.min_frames, vcfg.max_frames), max_frames=vcfg.max_frames)
    frames = np.stack([np.asarray(shapes.render_frame(clip, i)) for i in idx])
    return DecodedVideo(frames=frames, indices=idx, timestamps=[i / clip.fps for i in idx], fps=float(clip.fps),
                        duration=clip.n_frames / clip.fps, total_frames=clip.n_frames)


def random_item(rng: random.Random, processor, progress: float, video_share: float = 0.25):
    """(kind, media, prompt, answer, source) for the curriculum at ``progress`` (0..1 of the budget):
    single shapes first, then 1-3 shapes with clips mixed in. ``source`` is the scene, or the clip
    and the indices of its sampled frames (for the dense targets)."""
    if progress < 0.25:
        kind, n = "image", 1
    else:
        kind = "video" if rng.random() < video_share else "image"
        n = rng.choice((1, 2, 2, 3, 3, 3)) if progress > 0.45 else rng.choice((1, 2))
    if kind == "video":
        clip = shapes.random_clip(rng)
        video = clip_video(clip, processor.video_config)
        return kind, video, shapes.VIDEO_PROMPT, clip.answer, (clip, list(video.indices))
    scene = shapes.random_scene(rng, n)
    img = shapes.render(scene)
    if rng.random() < 0.4:
        img = shapes.as_jpeg(img, quality=rng.randint(70, 95))
    return kind, img, shapes.IMAGE_PROMPT, scene.answer, scene


def random_batch(rng: random.Random, processor, progress: float, size: int,
                 media_first: float = 0.85, video_share: float = 0.25, multi_turn: float = 0.0):
    """``size`` examples in one left-padded batch from the real processor; labels cover the last
    answer only. A fraction ``multi_turn`` of the samples are follow-ups, as in ``ernie chat``: an
    earlier exchange (its media, prompt and right answer) comes first. Also returns the kind and
    source (scene, or clip and frame indices) of every picture and clip, in prompt order."""
    from processing.chat_format import EOS, render_chat

    texts, images, videos, answers, kinds, sources = [], [], [], [], [], []
    eos = processor.tokenizer.eos_token_id
    for _ in range(size):
        turns = 2 if multi_turn > 0 and rng.random() < multi_turn else 1
        messages: list[dict] = []
        for turn in range(turns):
            kind, media, prompt, answer, source = random_item(rng, processor, progress, video_share)
            sources.append(source)
            kinds.append(kind)
            (videos if kind == "video" else images).append(media)
            messages += conversation({"type": kind}, prompt, media_first=rng.random() < media_first)
            if turn < turns - 1:
                messages.append({"role": "assistant", "content": answer})
        texts.append(render_chat(messages, add_generation_prompt=True, enable_thinking=False) + answer + EOS)
        answers.append(processor.tokenizer.encode(answer) + [eos])
    inputs = processor(text=texts, images=images or None, videos=videos or None, padding_side="left")
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for row, answer in enumerate(answers):
        n = len(answer)
        if ids[row, -n:].tolist() != answer:
            raise RuntimeError(f"the answer does not tokenize the same after its prompt: {texts[row]!r}")
        labels[row, -n:] = ids[row, -n:]
    return dict(inputs), labels, kinds, sources


# --- dense targets on the vision tokens -------------------------------------------------------
# The answer names each shape's kind once, which is a weak signal for a vision tower learning
# from scratch (colours come in a few hundred updates, kinds stay at chance for thousands).
# During training only, a linear probe on the resampler's output predicts, for every merged
# token, the kind of shape under it (and, for clips, where it is heading). The probe is thrown
# away; the model and the checkpoint stay ERNIE's.

MERGE = 2  # merged tokens are 2x2 patches
CELL = 4  # label samples per merged token and side


def _mask(width: int, height: int, shapes_: list) -> np.ndarray:
    """(height, width) uint8: 0 background, i+1 where shapes_[i] is drawn (later ones on top)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(shapes_):
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=i + 1)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=i + 1)
        else:
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=i + 1)
    return np.asarray(img)


def _cells(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) int: the shape index covering most of each token's cell (0 when under a quarter)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(mask).resize((cols * CELL, rows * CELL), Image.NEAREST))
    small = small.reshape(rows, CELL, cols, CELL).transpose(0, 2, 1, 3).reshape(rows, cols, CELL * CELL)
    n = int(mask.max()) + 1
    counts = np.stack([(small == k).sum(-1) for k in range(n)], -1)  # (rows, cols, n)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= CELL * CELL // 4, best, 0)


def dense_targets(kinds: list[str], sources: list, image_grids, video_grids) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merged token, in the order the resampler emits them (images, then videos): the kind
    under it (0 background, 1+KINDS index) and, for clips, its direction (0 none or still image,
    1+DIRECTIONS index)."""
    kind_t, dir_t = [], []
    images = [s for k, s in zip(kinds, sources) if k == "image"]
    videos = [s for k, s in zip(kinds, sources) if k == "video"]
    for scene, (_, gh, gw) in zip(images, image_grids.tolist() if images else []):
        cells = _cells(_mask(scene.width, scene.height, list(scene.shapes)), gh // MERGE, gw // MERGE)
        lut = np.array([0] + [1 + shapes.KINDS.index(s.kind) for s in scene.shapes])
        kind_t.append(lut[cells].reshape(-1))
        dir_t.append(np.zeros(cells.size, dtype=np.int64))
    for (clip, idx), (gt, gh, gw) in zip(videos, video_grids.tolist() if videos else []):
        idx = idx + [idx[-1]] * (gt - len(idx))  # odd counts repeat the last frame
        for k in range(gt // 2):
            pair = [_cells(_mask(clip.width, clip.height, [clip.shape.moved(*clip.centre(i))]),
                           gh // MERGE, gw // MERGE) for i in idx[2 * k:2 * k + 2]]
            covered = np.maximum(pair[0], pair[1]).reshape(-1)
            kind_t.append(covered * (1 + shapes.KINDS.index(clip.shape.kind)))
            dir_t.append(covered * (1 + shapes.DIRECTIONS.index(clip.direction)))
    return (torch.from_numpy(np.concatenate(kind_t)).long(), torch.from_numpy(np.concatenate(dir_t)).long())


class DenseProbe(torch.nn.Module):
    """Captures the resampler's output on every forward and scores it against dense targets."""

    def __init__(self, model, hidden: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden, 1 + len(shapes.KINDS))
        self.direction = torch.nn.Linear(hidden, 1 + len(shapes.DIRECTIONS))
        self.captured: list[torch.Tensor] = []
        self.active = False  # capture only around training forwards (not the held-out checks)
        model.model.resampler_model.register_forward_hook(
            lambda _m, _i, out: self.captured.append(out) if self.active else None)

    def loss(self, kinds, sources, inputs) -> torch.Tensor:
        if not self.captured:
            return torch.zeros(())
        feats = torch.cat(self.captured)
        self.captured = []
        kind_t, dir_t = dense_targets(kinds, sources, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
        if kind_t.numel() != feats.shape[0]:
            raise RuntimeError(f"dense targets for {kind_t.numel()} tokens, resampler gave {feats.shape[0]}")
        loss = torch.nn.functional.cross_entropy(self.kind(feats), kind_t)
        is_video = torch.zeros_like(dir_t, dtype=torch.bool)
        n_image = sum(1 for k in kinds if k == "image")
        if n_image < len(kinds):
            first_video = feats.shape[0] - sum(int(t) // 2 * int(h) * int(w) // MERGE ** 2
                                               for t, h, w in inputs["video_grid_thw"].tolist())
            is_video[first_video:] = True
            loss = loss + torch.nn.functional.cross_entropy(self.direction(feats[is_video]), dir_t[is_video])
        return loss


# --- training ---------------------------------------------------------------------------------

def learning_rate(step: int, progress: float, peak: float, warmup: int = 40) -> float:
    """Linear warmup, flat, then cosine down to 5% over the last 40% of the budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if progress < 0.6:
        return peak
    t = min(1.0, (progress - 0.6) / 0.4)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(args) -> dict:
    from model.ernie_vl import ErnieVL
    from processing.processor import ErnieVLProcessor

    global IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    # the processor's bounds are written into the checkpoint's own configs, so inference matches training
    IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = args.image_min_side ** 2, args.image_max_side ** 2
    VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = args.video_min_side ** 2, args.video_max_side ** 2
    tok = build_tokenizer()
    config = tiny_config(tok, args.vision_depth, args.vision_width)
    write_text_files(args.out, tok, config)
    processor = ErnieVLProcessor.from_pretrained(args.out)
    model = ErnieVL(config).train()
    if args.init is not None:  # continue from a checkpoint of the same shape (e.g. a longer budget in stages)
        from model import load_pretrained

        model.load_state_dict(load_pretrained(str(args.init), dtype="float32", device="cpu").state_dict())
        log(f"initialised from {args.init}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"ernie-tiny: {n_params / 1e6:.2f}M parameters, budget {args.minutes} min, "
        f"{args.batch}x{args.accum} samples per update, "
        f"lr {args.lr}, seed {args.seed}")
    # four groups: (vision tower + resampler | text) x (decayed | not); the vision side runs at
    # lr * --vision-lr-mult
    groups = []
    for is_vision in (True, False):
        for decayed in (True, False):
            params = [p for n, p in model.named_parameters()
                      if n.startswith(("vision_model.", "model.resampler_model.")) == is_vision
                      and (p.ndim >= 2 and "router" not in n) == decayed]
            groups.append({"params": params, "weight_decay": 0.01 if decayed else 0.0,
                           "lr_mult": args.vision_lr_mult if is_vision else 1.0})
    probe = None
    if args.dense > 0:
        probe = DenseProbe(model, config.text.hidden_size)
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0, "lr_mult": args.vision_lr_mult})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    budget, start, last_save = args.minutes * 60.0, time.time(), time.time()
    step, samples, smooth, dense_smooth, best = 0, 0, None, None, -1.0
    while (progress := (time.time() - start) / budget) < 1.0 and step < args.max_updates:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, progress, args.lr) * group["lr_mult"]
        total, dense_total, kinds = 0.0, 0.0, []
        for _ in range(args.accum):
            inputs, labels, batch_kinds, sources = random_batch(
                rng, processor, max(progress, args.curriculum_from), args.batch, args.media_first, args.video_share,
                args.multi_turn)
            if probe is not None:
                probe.captured, probe.active = [], True
            out = model(**inputs, labels=labels, output_router_logits=True)
            loss = out.loss
            if probe is not None:
                probe.active = False
                dense = probe.loss(batch_kinds, sources, inputs)
                loss = loss + args.dense * dense
                dense_total += dense.item() / args.accum
            (loss / args.accum).backward()
            total += out.loss.item() / args.accum
            kinds += batch_kinds
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, samples = step + 1, samples + args.accum * args.batch
        smooth = total if smooth is None else 0.95 * smooth + 0.05 * total
        dense_smooth = dense_total if dense_smooth is None else 0.95 * dense_smooth + 0.05 * dense_total
        if step % 10 == 0:
            elapsed = time.time() - start
            log(f"step {step:5d}  loss {smooth:.4f}  dense {dense_smooth:.4f}  lr {opt.param_groups[2]['lr']:.2e}  "
                f"{elapsed / samples * 1000:.0f} ms/sample  {elapsed / 60:.1f} min  videos {kinds.count('video')}/{len(kinds)}")
        if time.time() - last_save > args.save_every * 60:
            best = checkpoint(model, config, args, step, best)
            last_save = time.time()
    best = checkpoint(model, config, args, step, best)
    record = {"updates": step, "samples": samples, "batch": args.batch, "accum": args.accum, "seed": args.seed,
              "lr": args.lr,
              "minutes": round((time.time() - start) / 60, 1), "final_loss": round(smooth or float("nan"), 4),
              "best_quick_score": round(best, 3),
              "parameters": n_params, "threads": args.threads, "curriculum_from": args.curriculum_from,
              "init": str(args.init) if args.init else None, "vision_lr_mult": args.vision_lr_mult,
              "media_first": args.media_first, "image_sides": [args.image_min_side, args.image_max_side],
              "video_sides": [args.video_min_side, args.video_max_side],
              "vision": [args.vision_depth, args.vision_width], "dense": args.dense,
              "video_share": args.video_share, "multi_turn": args.multi_turn}
    _write_json(args.out / "training_record.json", record)
    return record


def checkpoint(model, config, args, step: int, best: float) -> float:
    """Score the model on fresh held-out data; write it only when it is the best so far."""
    model.eval()
    score = 0.0
    if args.quick_eval:
        from eval_tiny import evaluate_loaded
        from processing.processor import ErnieVLProcessor

        result = evaluate_loaded(model, ErnieVLProcessor.from_pretrained(args.out), args.quick_eval,
                                 max(2, args.quick_eval // 3), seed=10_000 + step)
        score = (3 * result["image_accuracy"] + result["video_accuracy"]) / 4
        line = f"checkpoint at step {step}: images {result['image_accuracy']:.2f}  videos {result['video_accuracy']:.2f}"
        if args.multi_turn > 0:  # follow-ups count as much as first turns
            from eval_tiny import evaluate_followups

            followups = evaluate_followups(model, ErnieVLProcessor.from_pretrained(args.out),
                                           max(4, args.quick_eval // 2), seed=20_000 + step)["followup_accuracy"]
            score = (score + followups) / 2
            line += f"  follow-ups {followups:.2f}"
        log(line)
    if score >= best:
        save_weights(args.out, model, config)
        log(f"saved step {step} (score {score:.3f})")
    model.train()
    return max(score, best)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "ernie_cli" / "assets" / "ernie-tiny")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the training loop")
    parser.add_argument("--max-updates", type=int, default=10 ** 9)
    parser.add_argument("--batch", type=int, default=16, help="samples per forward (one padded batch)")
    parser.add_argument("--accum", type=int, default=1, help="forwards per update")
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights")
    parser.add_argument("--curriculum-from", type=float, default=0.0,
                        help="skip the curriculum up to this fraction (with --init: 0.45 = the full task)")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 is fastest for a model this small, and on a shared machine")
    parser.add_argument("--save-every", type=float, default=3.0, help="minutes between checkpoints")
    parser.add_argument("--quick-eval", type=int, default=30, help="held-out images per checkpoint (0: none)")
    parser.add_argument("--vision-lr-mult", type=float, default=1.0,
                        help="learning-rate factor for the vision tower and the resampler")
    parser.add_argument("--media-first", type=float, default=0.85,
                        help="fraction of samples with the picture or video before the prompt")
    parser.add_argument("--image-min-side", type=int, default=56, help="images: min_pixels = side^2")
    parser.add_argument("--image-max-side", type=int, default=224, help="images: max_pixels = side^2")
    parser.add_argument("--video-min-side", type=int, default=56, help="video frames: min_pixels = side^2")
    parser.add_argument("--video-max-side", type=int, default=112, help="video frames: max_pixels = side^2")
    parser.add_argument("--dense", type=float, default=0.0,
                        help="weight of the dense kind/direction targets on the vision tokens (0: off)")
    parser.add_argument("--video-share", type=float, default=0.25, help="fraction of clips after the first phase")
    parser.add_argument("--multi-turn", type=float, default=0.0,
                        help="fraction of samples that follow an earlier exchange (a second chat turn)")
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--vision-width", type=int, default=96, help="a multiple of 32 (heads of 32)")
    args = parser.parse_args()
    record = train(args)
    log(f"done: {json.dumps(record)}")


if __name__ == "__main__":
    main()
