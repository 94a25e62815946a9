"""Greedy generation equals transformers 5.23's ``generate`` token for token on tiny checkpoints.

Cases: text, image, two images, video, image + video, a left-padded batch of two prompts, and a
batch mixing an image prompt with a text prompt (config A; a subset on config B: untied head,
GQA 6:1, other layer pattern). Goldens come from scripts/make_generate_goldens.py and need no
transformers: the weights are rebuilt from the golden's seed and manifest (reference names) and
mapped through model.checkpoint.weights.to_ours. With transformers installed the same comparison also runs
live against the reference model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from model.generation.generate import generate

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens" / "generate"


def _load_script():
    spec = importlib.util.spec_from_file_location("_ernie_scripts_make_generate_goldens",
                                                  ROOT / "scripts" / "make_generate_goldens.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gold = _load_script()
PAIRS = [(c, n) for c, names in gold.CASES_PER_CONFIG.items() for n in names]
LIVE = {"A": gold.CASES_PER_CONFIG["A"], "B": ["image", "batch"]}  # B's other cases: goldens only


def _golden(config_name: str) -> dict:
    return json.loads((GOLDENS / f"config_{config_name}.json").read_text(encoding="utf-8"))


_models: dict[str, torch.nn.Module] = {}


def _ours_from_golden(config_name: str):
    if config_name not in _models:
        golden = _golden(config_name)
        state = gold.seeded_state(golden["manifest"], golden["seed"])
        assert gold.checksum(state) == pytest.approx(golden["weight_checksum"], rel=1e-9), \
            "torch's seeded generator no longer reproduces the golden weights; rerun the script"
        _models[config_name] = gold.ours_from_state(state, config_name)
    return _models[config_name]


def _ours_generate(model, inputs):
    return generate(model, max_new_tokens=gold.MAX_NEW_TOKENS, do_sample=False, **inputs).tolist()


def _assert_meaningful(sequences, prompt_len):
    for row in sequences:
        new = row[prompt_len:]
        assert len(set(new)) >= 4, f"degenerate reference output {new}; pick other weights"


@pytest.mark.parametrize("config_name,case", PAIRS)
def test_greedy_matches_golden(config_name, case):
    expected = _golden(config_name)["cases"][case]
    assert expected["min_top2_gap"] > 1e-4  # ties would make a token-level comparison meaningless
    inputs = gold.case_inputs(case)
    _assert_meaningful(expected["sequences"], inputs["input_ids"].shape[1])
    assert _ours_generate(_ours_from_golden(config_name), inputs) == expected["sequences"]


@pytest.mark.parametrize("config_name", list(LIVE))
def test_live_against_reference(config_name):
    pytest.importorskip("transformers")
    ref, manifest, state = gold.reference_model(config_name)
    ours = gold.ours_from_state(state, config_name)
    for case in LIVE[config_name]:
        inputs = gold.case_inputs(case)
        expected, gap = gold.reference_generate(ref, inputs)
        assert gap > 1e-4, f"{case}: near-tie in the reference's logits"
        _assert_meaningful(expected, inputs["input_ids"].shape[1])
        assert _ours_generate(ours, inputs) == expected, case
