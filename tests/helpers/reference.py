"""Tiny reference models (transformers 5.23) and hand-made multimodal inputs for parity tests.

Importing this module does not import transformers; ``build_reference`` does.

Inputs follow the token layout the reference processor produces: ``<|IMAGE_START|>`` + t*h*w/4
image tokens + ``<|IMAGE_END|>``, and ``<|VIDEO_START|>`` + t*h*w/8 video tokens +
``<|VIDEO_END|>``; ``mm_token_type_ids`` marks image tokens 1 and video tokens 2,
``moe_mm_token_type_ids`` additionally marks the start/end tokens. Pixel rows: t*h*w patches of
3*14*14 values (images and videos alike).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from model import ErnieVL, ErnieVLConfig
from model.checkpoint.weights import to_ours
from tests.tiny_configs import CONFIGS, TOKEN_IDS

IMG, IMG_START, IMG_END = TOKEN_IDS["image_token_id"], TOKEN_IDS["image_start_token_id"], TOKEN_IDS["image_end_token_id"]
VID, VID_START, VID_END = TOKEN_IDS["video_token_id"], TOKEN_IDS["video_start_token_id"], TOKEN_IDS["video_end_token_id"]
FIRST_TEXT_ID = 9
PATCH_DIM = 3 * 14 * 14

# name -> list of segments: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)); one row each
CASES: dict[str, list[list[tuple]]] = {
    "text": [[("text", 12)]],
    "image": [[("text", 5), ("image", (1, 4, 6)), ("text", 4)]],
    "two_images": [[("text", 3), ("image", (1, 4, 4)), ("text", 2), ("image", (1, 6, 4)), ("text", 3)]],
    "video": [[("text", 4), ("video", (4, 4, 4)), ("text", 3)]],
    "image_video": [[("text", 2), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 6, 4)), ("text", 3)]],
    # two rows of different lengths: the shorter one is left-padded (attention_mask 0, id 0)
    "padded_batch": [[("text", 3), ("image", (1, 4, 4)), ("text", 6)],
                     [("text", 2), ("image", (1, 4, 6)), ("text", 2)]],
}
PAD_ID = 0


def make_pixels(rows: int, seed: int = 0) -> torch.Tensor:
    """(rows, 588) normalised pixel values from an integer hash: identical on every platform and
    torch version (pure int64 arithmetic, then exact fp32 scaling), so goldens need not store them."""
    x = torch.arange(rows * PATCH_DIM, dtype=torch.int64) + seed * 7_919_113
    for a, c in ((1_103_515_245, 12_345), (69_069, 1), (1_664_525, 1_013_904_223)):
        x = (x * a + c) % 2_147_483_648
        x = x ^ (x >> 13)
    u8 = (x % 256).to(torch.float32)
    return ((u8 / 255.0 - 0.48) / 0.27).view(rows, PATCH_DIM)


def our_config(name: str) -> ErnieVLConfig:
    return ErnieVLConfig.from_dict(CONFIGS[name])


def _segment_ids(kind: str, spec, gen: torch.Generator, vocab: int) -> tuple[list[int], list[int], list[int]]:
    """(ids, mm types, moe types) of one segment."""
    if kind == "text":
        ids = torch.randint(FIRST_TEXT_ID, vocab, (spec,), generator=gen).tolist()
        return ids, [0] * spec, [0] * spec
    t, h, w = spec
    if kind == "image":
        n, tok, start, end, typ = t * h * w // 4, IMG, IMG_START, IMG_END, 1
    else:
        n, tok, start, end, typ = t * h * w // 8, VID, VID_START, VID_END, 2
    return [start] + [tok] * n + [end], [0] + [typ] * n + [0], [typ] * (n + 2)


def make_inputs(case: str, vocab: int = 1024, seed: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for one of CASES (B = number of rows, shorter rows left-padded) with hashed pixels."""
    gen = torch.Generator().manual_seed(seed)
    rows, images, videos = [], [], []
    for segments in CASES[case]:
        ids, mm, moe = [1], [0], [0]  # <|begin_of_sentence|>
        for kind, spec in segments:
            i, m, e = _segment_ids(kind, spec, gen, vocab)
            ids, mm, moe = ids + i, mm + m, moe + e
            (images if kind == "image" else videos if kind == "video" else []).append(spec)
        rows.append((ids, mm, moe))
    T = max(len(r[0]) for r in rows)
    pad = [T - len(r[0]) for r in rows]
    inputs = {
        "input_ids": torch.tensor([[PAD_ID] * p + r[0] for p, r in zip(pad, rows)]),
        "mm_token_type_ids": torch.tensor([[0] * p + r[1] for p, r in zip(pad, rows)]),
        "moe_mm_token_type_ids": torch.tensor([[0] * p + r[2] for p, r in zip(pad, rows)]),
    }
    if any(pad):
        inputs["attention_mask"] = torch.tensor([[0] * p + [1] * (T - p) for p in pad])
    for key, grid_key, grids in (("pixel_values", "image_grid_thw", images),
                                 ("pixel_values_videos", "video_grid_thw", videos)):
        if grids:
            inputs[grid_key] = torch.tensor(grids)
            inputs[key] = make_pixels(sum(t * h * w for t, h, w in grids), seed)
    if labels:
        lab = inputs["input_ids"].clone()
        lab[(inputs["mm_token_type_ids"] != 0) | (inputs["input_ids"] == 1)] = -100  # vision, BOS
        if "attention_mask" in inputs:
            lab[inputs["attention_mask"] == 0] = -100
        inputs["labels"] = lab
    return inputs


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise large enough to make errors visible.

    Norm weights become 1 + noise, biases and MoE correction biases small noise (so that the
    bias actually changes which experts are chosen).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "e_score_correction_bias" in name:
            p.copy_(0.1 * noise)
        elif p.ndim == 1 and name.endswith("weight"):  # every 1-D weight is a norm's scale
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(0.05 * noise)
        else:
            p.copy_(noise * min(0.15, 1.0 / p.shape[-1] ** 0.5))


def build_reference(name: str, seed: int = 0):
    """A transformers Ernie4_5_VLMoeForConditionalGeneration for CONFIGS[name], seeded, fp32, eval."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    ref = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(**CONFIGS[name])).eval()
    randomize_(ref, seed)
    return ref


def reference_forward(ref, inputs: dict[str, torch.Tensor]):
    """Run the reference on our input dict (fresh rope state, router logits on)."""
    ref.model.rope_deltas = None
    with torch.no_grad():
        return ref(**inputs, output_router_logits=True, use_cache=False)


def load_ours(checkpoint_dir: str | Path, name: str) -> ErnieVL:
    """Our fp32 model with the weights of a reference save_pretrained directory (Baidu names)."""
    state = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    config = our_config(name)
    model = ErnieVL.from_config(config, device="meta")
    model.load_state_dict(to_ours(state, config, dtype=torch.float32), strict=True, assign=True)
    return model.eval()
