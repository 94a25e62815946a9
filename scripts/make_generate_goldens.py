"""Write tests/goldens/generate/config_{A,B}.json: greedy tokens of the reference on tiny checkpoints.

The reference is transformers 5.23 (``Ernie4_5_VLMoeForConditionalGeneration``). Its weights are
drawn from a seeded generator in the order of a manifest (parameter name, shape, scale, offset)
that the golden stores, so tests rebuild the very same weights without transformers and map them
through ``model.checkpoint.weights.to_ours``. Weights are larger than a usual init (std 0.3, random norms and
routing biases) so that greedy decoding produces varied tokens with clear top-2 margins.

Command (from the repository root):
    .venv/bin/python scripts/make_generate_goldens.py
Tests: tests/test_generate_parity.py (goldens always, live comparison when transformers is there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tiny_configs import CONFIGS  # noqa: E402

OUT = ROOT / "tests" / "goldens" / "generate"
SEED = 0
MAX_NEW_TOKENS = 16
IMG, IMG_S, IMG_E, VID, VID_S, VID_E = 3, 4, 5, 8, 6, 7  # tests/tiny_configs.py ids


def image(t: int, h: int, w: int) -> list[int]:
    return [IMG_S] + [IMG] * (t * h * w // 4) + [IMG_E]


def video(t: int, h: int, w: int) -> list[int]:
    return [VID_S] + [VID] * (t * h * w // 8) + [VID_E]


# name -> (prompts, image grids, video grids); grids are (t, h, w) in patches, in prompt order
CASES = {
    "text": ([[1, 40, 41, 42, 43, 44]], [], []),
    "image": ([[1, 40] + image(1, 4, 4) + [41, 42]], [(1, 4, 4)], []),
    "two_images": ([[1] + image(1, 4, 6) + [40] + image(1, 6, 4) + [41]], [(1, 4, 6), (1, 6, 4)], []),
    "video": ([[1, 40] + video(2, 4, 4) + [41]], [], [(2, 4, 4)]),
    "image_video": ([[1] + image(1, 4, 4) + [40] + video(4, 4, 4) + [41]], [(1, 4, 4)], [(4, 4, 4)]),
    "batch": ([[1, 50, 51, 52, 53, 54, 55, 56, 57], [1, 60, 61]], [], []),
    "batch_image": ([[1, 40] + image(1, 4, 4) + [41], [1, 70, 71, 72]], [(1, 4, 4)], []),
}
CASES_PER_CONFIG = {"A": list(CASES), "B": ["text", "image", "video", "batch"]}


def case_inputs(name: str) -> dict[str, torch.Tensor]:
    """Left-padded tensors for a case, pixels drawn from a generator seeded by the case name."""
    prompts, images, videos = CASES[name]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    mm = torch.zeros_like(ids)
    mm[ids == IMG], mm[ids == VID] = 1, 2
    moe = mm.clone()
    moe[(ids == IMG_S) | (ids == IMG_E)], moe[(ids == VID_S) | (ids == VID_E)] = 1, 2
    out = dict(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    media = ((images, "pixel_values", "image_grid_thw"), (videos, "pixel_values_videos", "video_grid_thw"))
    for grids, px, key in media:
        if grids:
            grid = torch.tensor(grids)
            out[key] = grid
            out[px] = torch.randn(int(grid.prod(-1).sum()), 3 * 14 * 14, generator=g)
    return out


def weight_rule(name: str) -> tuple[float, float]:
    """(scale, offset) of a parameter: value = offset + scale * N(0, 1)."""
    if "correction_bias" in name:
        return 0.1, 0.0
    if "norm" in name or ".ln." in name:
        return 0.1, (0.0 if name.endswith("bias") else 1.0)
    return 0.3, 0.0


def manifest_of(model) -> list[list]:
    return [[n, list(p.shape), *weight_rule(n)] for n, p in model.named_parameters()]


def seeded_state(manifest: list[list], seed: int = SEED) -> dict[str, torch.Tensor]:
    """The weights named by ``manifest`` (reference names), drawn in order from one generator."""
    g = torch.Generator().manual_seed(seed)
    return {n: offset + scale * torch.randn(shape, generator=g) for n, shape, scale, offset in manifest}


def checksum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum() for t in state.values()))


def ours_from_state(state: dict[str, torch.Tensor], config_name: str):
    from model.config import ErnieVLConfig
    from model.ernie_vl import ErnieVL
    from model.checkpoint.weights import to_ours
    model = ErnieVL.from_config(ErnieVLConfig.from_dict(CONFIGS[config_name]), device="meta")
    model.load_state_dict(to_ours(state, model.config), assign=True, strict=True)
    return model.eval()


def reference_model(config_name: str):
    """The reference with seeded weights, and the manifest that rebuilds them."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration
    torch.manual_seed(SEED)
    ref = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(**CONFIGS[config_name])).eval()
    manifest = manifest_of(ref)
    state = seeded_state(manifest)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(state[n])
    return ref, manifest, state


def reference_generate(ref, inputs: dict[str, torch.Tensor]) -> tuple[list[list[int]], float]:
    """Greedy sequences (prompt + new) and the smallest top-2 logit gap among live rows."""
    with torch.no_grad():
        out = ref.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(out.logits, 1).topk(2, -1).values  # (B, N, 2)
    return out.sequences.tolist(), float((top2[..., 0] - top2[..., 1]).min())


def main() -> None:
    import transformers
    OUT.mkdir(parents=True, exist_ok=True)
    for config_name, case_names in CASES_PER_CONFIG.items():
        ref, manifest, state = reference_model(config_name)
        cases = {}
        for name in case_names:
            sequences, gap = reference_generate(ref, case_inputs(name))
            cases[name] = dict(sequences=sequences, min_top2_gap=gap)
            print(f"config {config_name} {name}: min top-2 gap {gap:.4f}")
        golden = dict(
            source=f"transformers {transformers.__version__} Ernie4_5_VLMoeForConditionalGeneration.generate("
                   f"do_sample=False, max_new_tokens={MAX_NEW_TOKENS}), torch {torch.__version__}",
            command="python scripts/make_generate_goldens.py", config=config_name, seed=SEED,
            weight_checksum=checksum(state), manifest=manifest, cases=cases)
        path = OUT / f"config_{config_name}.json"
        path.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
