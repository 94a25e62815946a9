"""Tier 2: the weight map on synthetic state dicts (no real weights, no model).

Proves: every layout lands on the same state dict with the right semantics (gate rows first,
vision bank = experts E..2E-1, routers transposed, bias rows text/vision), strictness lists
every problem in one error, idempotence, the inverse round trip, and the flat config writer.
"""

from dataclasses import replace

import pytest
import torch

from model.checkpoint.weights import config_to_baidu_dict, expected_shapes, to_baidu, to_ours
from model.config import ErnieVLConfig, tiny
from model.errors import CheckpointError
from tests.helpers.checkpoints import random_state
from tests.tiny_configs import CONFIG_A, CONFIG_B

CFG_A = ErnieVLConfig.from_dict(CONFIG_A)
CFG_B = ErnieVLConfig.from_dict(CONFIG_B)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _resave_layout(baidu: dict) -> dict:
    return {("model." + k if k.startswith("vision_model.") else k): v for k, v in baidu.items()}


def test_expected_shapes_follow_the_config():
    s = expected_shapes(CFG_A)
    assert s["model.layers.1.mlp.text_experts.gate_up_proj"] == (4, 64, 64)  # (E, 2*I_t, H)
    assert s["model.layers.2.mlp.vision_experts.down_proj"] == (4, 64, 16)  # (E, H, I_v)
    assert s["model.layers.1.mlp.text_router.weight"] == (4, 64)
    assert s["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (32, 64)
    assert s["model.layers.0.mlp.down_proj.weight"] == (64, 96)
    assert s["model.resampler_model.temporal_linear.fc1.weight"] == (128, 256)
    assert s["vision_model.patch_embed.proj.weight"] == (32, 588)
    assert "lm_head.weight" not in s and "model.layers.0.mlp.text_router.weight" not in s
    b = expected_shapes(CFG_B)
    assert b["lm_head.weight"] == (1024, 48)
    assert "model.layers.0.mlp.vision_experts.gate_up_proj" in b  # B starts sparse
    assert "model.layers.1.mlp.gate_proj.weight" in b and "model.layers.1.mlp.text_router.weight" not in b
    assert s["model.layers.1.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads of 16


def test_baidu_layout_semantics():
    ours = random_state(CFG_A, seed=1)
    baidu = to_baidu(ours, CFG_A)
    p, I_t, I_v, E = "model.layers.1.mlp", 32, 16, 4
    for e in range(E):
        assert torch.equal(baidu[f"{p}.experts.{e}.gate_proj.weight"], ours[f"{p}.text_experts.gate_up_proj"][e, :I_t])
        assert torch.equal(baidu[f"{p}.experts.{e}.up_proj.weight"], ours[f"{p}.text_experts.gate_up_proj"][e, I_t:])
        assert torch.equal(baidu[f"{p}.experts.{E + e}.gate_proj.weight"],
                           ours[f"{p}.vision_experts.gate_up_proj"][e, :I_v])
        assert torch.equal(baidu[f"{p}.experts.{E + e}.down_proj.weight"], ours[f"{p}.vision_experts.down_proj"][e])
    assert torch.equal(baidu[f"{p}.gate.weight"], ours[f"{p}.text_router.weight"].T)
    assert torch.equal(baidu[f"{p}.gate.weight_1"], ours[f"{p}.vision_router.weight"].T)
    statics = baidu[f"{p}.moe_statics.e_score_correction_bias"]
    assert torch.equal(statics[0], ours[f"{p}.text_router.e_score_correction_bias"])
    assert torch.equal(statics[1], ours[f"{p}.vision_router.e_score_correction_bias"])
    assert torch.equal(baidu["model.resampler_model.spatial_linear.3.bias"],
                       ours["model.resampler_model.spatial_linear.ln.bias"])
    assert "vision_model.ln.weight" in baidu and f"{p}.experts.8.up_proj.weight" not in baidu
    assert all(x.is_contiguous() for x in baidu.values())
    assert len({x.untyped_storage().data_ptr() for x in baidu.values()}) == len(baidu)  # safetensors-safe


@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["A-tied", "B-untied"])
def test_all_layouts_map_to_the_same_state(cfg):
    ours = random_state(cfg, seed=2)
    baidu = to_baidu(ours, cfg)
    assert _equal(to_ours(baidu, cfg), ours)
    assert _equal(to_ours(_resave_layout(baidu), cfg), ours)


def test_transformers_in_memory_names():
    ours = random_state(CFG_A, seed=3)
    native = {}
    for k, x in ours.items():
        k2 = k.replace("model.layers.", "model.language_model.layers.").replace("vision_model.", "model.vision_tower.")
        k2 = k2.replace("model.embed_tokens", "model.language_model.embed_tokens").replace(
            "model.norm.", "model.language_model.norm.")
        for bank in ("text", "vision"):
            k2 = k2.replace(f"{bank}_router.weight", f"{bank}_moe.gate.weight")
        for bank in ("text", "vision"):
            k2 = k2.replace(f"{bank}_experts.", f"{bank}_moe.experts.")
            if k2.endswith(f"{bank}_router.e_score_correction_bias"):
                k2, x = k2.replace(f"{bank}_router.", f"{bank}_moe.gate.moe_statics."), x[None]  # [1, E]
        native[k2] = x
    assert _equal(to_ours(native, CFG_A), ours)


def test_release_is_told_each_source_once_it_was_copied():
    """The loader drops a source's mapped pages once they were copied: expert banks as they are
    stacked, other tensors when a dtype change copied them; tensors kept as views are never told."""
    baidu = to_baidu(random_state(CFG_A, seed=5), CFG_A)
    per_expert = {k for k in baidu if ".experts." in k}
    told: list[list[str]] = []
    to_ours(baidu, CFG_A, release=told.append)
    assert {k for batch in told for k in batch} == per_expert
    assert len(told) == 2 * 2  # two MoE layers, two banks each (CFG_A)
    told.clear()
    to_ours(baidu, CFG_A, dtype=torch.bfloat16, release=told.append)
    released = {k for batch in told for k in batch}
    assert per_expert < released and "model.embed_tokens.weight" in released
    assert not any(".gate.weight" in k or "moe_statics" in k for k in released)  # routers: small, kept


def test_idempotent_and_no_copy():
    ours = random_state(CFG_B, seed=4)
    once = to_ours(to_baidu(ours, CFG_B), CFG_B)
    twice = to_ours(once, CFG_B)
    assert _equal(once, twice)
    assert all(twice[k] is once[k] for k in once)  # already in place: the very same tensors


def test_mtp_and_tied_head_are_dropped_untied_head_kept():
    baidu = to_baidu(random_state(CFG_A), CFG_A)
    baidu["lm_head.weight"] = torch.zeros(1024, 64)
    baidu["mtp_block.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    baidu["model.mtp_linear_proj.0.weight"] = torch.zeros(3, 3)
    out = to_ours(baidu, CFG_A)
    assert "lm_head.weight" not in out and not any("mtp" in k for k in out)
    untied = random_state(CFG_B, seed=5)
    assert torch.equal(to_ours(to_baidu(untied, CFG_B), CFG_B)["lm_head.weight"], untied["lm_head.weight"])


def test_strict_lists_every_problem_in_one_error():
    baidu = to_baidu(random_state(CFG_A), CFG_A)
    del baidu["model.norm.weight"]
    del baidu["model.layers.2.mlp.experts.5.up_proj.weight"]  # a vision expert
    baidu["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    baidu["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(64, 63)
    baidu["model.layers.1.mlp.gate.weight"] = torch.zeros(4, 64)  # not transposed
    with pytest.raises(CheckpointError) as e:
        to_ours(baidu, CFG_A)
    msg = str(e.value)
    for needle in ("model.norm.weight", "model.layers.2.mlp.experts.5.up_proj.weight",
                   "model.layers.0.mlp.surprise.weight", "model.layers.1.self_attn.q_proj.weight",
                   "expected [64, 64], found [64, 63]", "model.layers.1.mlp.gate.weight (expected [64, 4]",
                   "2 missing", "1 unexpected", "2 mis-shaped"):
        assert needle in msg, (needle, msg)
    assert "vision_experts" not in msg  # reported once, under the name on disk
    assert e.value.hint and "config.json" in e.value.hint


def test_strict_flags_wrong_config_and_layers():
    baidu = to_baidu(random_state(CFG_A), CFG_A)
    with pytest.raises(CheckpointError, match="unexpected") as e:
        to_ours(baidu, CFG_B)
    assert "missing" in str(e.value) and "mis-shaped" in str(e.value)
    extra = dict(baidu)
    extra["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)  # layer 0 is dense
    with pytest.raises(CheckpointError, match=r"1 unexpected \(model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        to_ours(extra, CFG_A)
    too_many = dict(baidu)
    too_many["model.layers.1.mlp.experts.8.gate_proj.weight"] = torch.zeros(16, 64)  # only 2E = 8 experts
    with pytest.raises(CheckpointError, match=r"experts\.8\.gate_proj"):
        to_ours(too_many, CFG_A)


def test_both_stacked_and_per_expert_is_an_error():
    ours = random_state(CFG_A)
    mixed = {**ours, **{k: v for k, v in to_baidu(ours, CFG_A).items() if ".experts." in k}}
    with pytest.raises(CheckpointError, match="given both stacked and per expert"):
        to_ours(mixed, CFG_A)


def test_destination_dtype_and_fp32_routers():
    ours = random_state(CFG_A, dtype=torch.bfloat16)
    out = to_ours(to_baidu(ours, CFG_A), CFG_A)
    assert out["model.layers.1.mlp.text_experts.gate_up_proj"].dtype == torch.bfloat16
    assert out["model.layers.1.mlp.text_router.weight"].dtype == torch.float32
    fp32 = random_state(CFG_A, dtype=torch.float32)
    half = to_ours(to_baidu(fp32, CFG_A), CFG_A, dtype=torch.float16)
    for k, x in half.items():
        assert x.dtype == (torch.float32 if "_router." in k else torch.float16), k
    k = "model.layers.2.mlp.vision_experts.down_proj"
    assert torch.equal(half[k], fp32[k].half())


@pytest.mark.parametrize("cfg", [CFG_A, CFG_B, tiny(), ErnieVLConfig()], ids=["A", "B", "tiny", "28B"])
def test_flat_config_round_trip(cfg):
    raw = config_to_baidu_dict(cfg, dtype=torch.bfloat16)
    assert ErnieVLConfig.from_dict(raw) == cfg
    assert raw["torch_dtype"] == "bfloat16" and raw["model_type"] == "ernie4_5_moe_vl"


def test_flat_config_matches_baidu_conventions():
    raw = config_to_baidu_dict(ErnieVLConfig())
    assert raw["moe_num_experts"] == [64, 64] and raw["moe_intermediate_size"] == [1536, 512]
    assert raw["moe_layer_start_index"] == 1 and raw["moe_layer_end_index"] == 27
    assert raw["freq_allocation"] == 20 and raw["im_patch_id"] == 100295
    assert raw["vision_config"]["embed_dim"] == 1280 and raw["vision_config"]["mlp_ratio"] == 4
    # Baidu's own readers ignore mlp_layer_types: the indices alone must give the same pattern.
    del raw["mlp_layer_types"]
    assert ErnieVLConfig.from_dict(raw) == ErnieVLConfig()


def test_foreign_config_is_refused():
    with pytest.raises(CheckpointError, match="'llama' model, expected ERNIE 4.5 VL"):
        ErnieVLConfig.from_dict({"model_type": "llama", "hidden_size": 64})


@pytest.mark.parametrize("hidden,width", [(32, 80), (56, 61), (88, 98), (1280, 5120)])
def test_flat_vision_mlp_width_is_the_product_with_a_float_ratio(hidden, width):
    """Baidu's vision config gives the MLP width as ``int(embed_dim * mlp_ratio)``: 32 * 2.5 is 80
    (not 32 * int(2.5) = 64, a checkpoint then refused as mis-shaped). Our writer's float ratio gives
    its width back through that same product, also where width / hidden * hidden lands just below
    the width (61 / 56 * 56 = 60.99...), for readers that know only the ratio."""
    cfg = replace(CFG_A, vision=replace(CFG_A.vision, hidden_size=hidden, intermediate_size=width))
    raw = config_to_baidu_dict(cfg)
    assert int(hidden * raw["vision_config"]["mlp_ratio"]) == width
    del raw["vision_config"]["intermediate_size"]  # Baidu's original configs carry the ratio alone
    assert ErnieVLConfig.from_dict(raw).vision.intermediate_size == width
    assert ErnieVLConfig.from_dict(raw) == cfg
