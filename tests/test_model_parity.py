"""Tier 4: our ErnieVL against transformers 5.23's Ernie4_5_VLMoeForConditionalGeneration.

Two tiny configurations (tests/tiny_configs.py: GQA 2:1 vs 6:1, tied vs untied head, 4 vs 6
experts, 1 vs 2 shared experts, different mrope sections and vision widths) and six inputs
(text only, one image, two images of different sizes, a video, image + video, a left-padded
batch of two) laid out exactly as the reference processor lays them out.

* Goldens (always): reference weights saved by scripts/make_model_goldens.py in Baidu's names,
  loaded through model.checkpoint.weights.to_ours; logits, loss (with the aux term), aux_loss and the 3D
  positions must match what the reference produced.
* Live (when transformers is installed): a freshly seeded reference, full logits, every MoE
  layer's router logits, loss and aux_loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import ErnieVLConfig
from tests.helpers.reference import (CASES, build_reference, load_ours, make_inputs, make_pixels,
                                     our_config, reference_forward)

GOLDENS = Path(__file__).parent / "goldens" / "model"
ATOL = 1e-4
NAMES = ["A", "B"]


def _golden(name: str):
    from safetensors.torch import load_file
    meta = json.loads((GOLDENS / name / "outputs.json").read_text())
    return meta, load_file(str(GOLDENS / name / "outputs.safetensors"))


def _golden_inputs(tensors: dict, case: str) -> dict:
    keys = ("input_ids", "mm_token_type_ids", "moe_mm_token_type_ids", "attention_mask", "labels",
            "image_grid_thw", "video_grid_thw")
    inputs = {k: tensors[f"{case}.{k}"] for k in keys if f"{case}.{k}" in tensors}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in inputs:
            inputs[pix] = make_pixels(int(inputs[grid].prod(-1).sum()))
    return inputs


def _real(inputs: dict) -> torch.Tensor:
    """(B, T) bool: positions that are not padding."""
    return inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()


@pytest.fixture(scope="module", params=NAMES)
def golden_model(request):
    return request.param, load_ours(GOLDENS / request.param, request.param)


def test_golden_config_reads_as_ours(golden_model):
    name, _ = golden_model
    assert ErnieVLConfig.from_file(GOLDENS / name / "config.json") == our_config(name)


@pytest.mark.parametrize("case", list(CASES))
def test_golden_logits_loss_positions(golden_model, case):
    name, model = golden_model
    meta, tensors = _golden(name)
    inputs = _golden_inputs(tensors, case)
    for key, total in meta["cases"][case]["pixel_sums"].items():
        assert float(inputs[key].double().sum()) == pytest.approx(total, abs=1e-6), "pixel hash changed"
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    real = _real(inputs)
    head, last = tensors[f"{case}.logits_head"], tensors[f"{case}.logits_last"]
    torch.testing.assert_close(out.logits[..., :head.shape[-1]][real], head[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[:, -1], last, atol=ATOL, rtol=0)
    assert out.loss.item() == pytest.approx(meta["cases"][case]["loss"], abs=1e-5)
    assert out.aux_loss.item() == pytest.approx(meta["cases"][case]["aux_loss"], abs=1e-5)
    positions, deltas = model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                             inputs.get("attention_mask"))
    ref_positions = tensors[f"{case}.position_ids"]
    assert torch.equal(positions[:, real], ref_positions[:, real])
    assert torch.equal(deltas, tensors[f"{case}.rope_deltas"])


@pytest.fixture(scope="module", params=NAMES)
def live_pair(request, tmp_path_factory):
    pytest.importorskip("transformers")
    ref = build_reference(request.param, seed=1)
    path = tmp_path_factory.mktemp(f"ref_{request.param}")
    ref.save_pretrained(path)
    return ref, load_ours(path, request.param)


@pytest.mark.reference
@pytest.mark.parametrize("case", list(CASES))
def test_live_parity(live_pair, case):
    ref, ours = live_pair
    inputs = make_inputs(case, seed=3)
    expected = reference_forward(ref, inputs)
    with torch.no_grad():
        out = ours(**inputs, output_router_logits=True)
    real = _real(inputs)
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, atol=1e-5, rtol=0)
    assert len(out.router_logits) == len(expected.router_logits)
    flat_real = real.reshape(-1)
    for ours_layer, ref_layer in zip(out.router_logits, expected.router_logits):
        torch.testing.assert_close(ours_layer[flat_real], ref_layer[flat_real], atol=ATOL, rtol=0)


@pytest.mark.reference
def test_live_logits_to_keep(live_pair):
    ref, ours = live_pair
    inputs = make_inputs("image", seed=4, labels=False)
    expected = reference_forward(ref, {**inputs, "logits_to_keep": 1})
    with torch.no_grad():
        out = ours(**inputs, logits_to_keep=1)
    assert out.logits.shape == expected.logits.shape == (1, 1, 1024)
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
