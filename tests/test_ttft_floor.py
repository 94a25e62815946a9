"""benchmarks/ttft_floor.py lists the products the model really runs for an image prompt.

The floor it reports is only a floor if no product is missing or counted twice: torch's FLOP
counter, on a tiny fp32 model's first-token forward, must see exactly the listed FLOPs (routers
aside, which the floor leaves out).
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ErnieVL
from tests.helpers.reference import make_inputs, our_config, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ttft_floor  # noqa: E402


@pytest.mark.parametrize("name", ["A", "B"])
def test_the_listed_products_are_the_ones_a_first_token_runs(name):
    config = our_config(name)
    model = ErnieVL(config).eval()
    randomize_(model, seed=0)
    inputs = make_inputs("image", labels=False)
    patches = int(inputs["pixel_values"].shape[0])
    image_tokens = int((inputs["mm_token_type_ids"] == 1).sum())
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    seen = sum(counts["Global"].get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    routers = sum(flops for module, ops in counts.items() if module.endswith("_router")
                  for op, flops in ops.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    listed = sum(2 * r["M"] * r["K"] * r["N"] * r["count"]
                 for r in ttft_floor.products(config, patches, text_tokens, self_paired=True))  # fp32
    assert listed == seen - routers


def test_the_bench_prompt_splits_as_the_processor_does():
    config = ttft_floor.bench_config(4, 4)
    rows = {(r["name"], r["M"]): r for r in ttft_floor.products(config, patches=1024, text_tokens=31)}
    assert rows[("qkv", 1024)]["count"] == 4 and rows[("o", 287)]["count"] == 3
    # 258 vision-routed tokens (256 + start/end) x top-6 over 64 experts; 29 text tokens x 6 slots
    vision = [r for r in rows.values() if r["name"] == "vision expert gate/up"]
    text = [r for r in rows.values() if r["name"] == "text expert gate/up"]
    assert sum(r["M"] * r["count"] for r in vision) == 2 * 258 * 6
    assert sum(r["M"] * r["count"] for r in text) == 2 * 29 * 6


def test_a_tiny_measure_reports_every_stage_and_peak_below_timed():
    config = our_config("A")
    result = ttft_floor.measure(config, patches=24, text_tokens=12, rounds=1)
    assert set(result["stages"]) == {"vision", "resampler", "decoder"}
    assert 0 < result["at_peak_s"] <= result["timed_s"]
    assert ttft_floor.report(result).splitlines()[-1].startswith("total")
