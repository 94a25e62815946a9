"""Tier 3: the whole model on tiny random configurations (no reference needed).

State-dict names and meta construction, determinism, batch of 2 == two singles (left padding),
cached decode == full forward after an image, modality isolation inside the full model,
logits_to_keep, the loss semantics and the user-facing errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import ErnieVL
from model.checkpoint.weights import expected_shapes
from model.config import tiny
from model.errors import ErnieError
from model.generation.kv_cache import StaticKVCache
from tests.helpers.reference import make_inputs, our_config, randomize_


def _model(name: str = "A", seed: int = 0) -> ErnieVL:
    torch.manual_seed(seed)
    model = ErnieVL(our_config(name)).eval()
    randomize_(model, seed)
    return model


@pytest.fixture(scope="module", params=["A", "B"])
def model(request):
    return _model(request.param)


def _only(inputs: dict, *keys: str) -> dict:
    return {k: v for k, v in inputs.items() if k in keys}


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_names_and_shapes_follow_the_architecture_table(tied):
    config = tiny(tie_word_embeddings=tied)
    model = ErnieVL.from_config(config, device="meta")
    assert all(p.is_meta for p in model.parameters())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: tuple(s) for k, s in expected_shapes(config).items()}
    assert ("lm_head.weight" in got) is not tied
    assert model.model.layers[1].mlp.text_router.weight.dtype == torch.float32


def test_bf16_construction_keeps_routers_fp32():
    model = ErnieVL.from_config(tiny(), dtype=torch.bfloat16)
    router = model.model.layers[1].mlp.vision_router
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.vision_experts.down_proj.dtype == torch.bfloat16


def test_seeded_construction_and_forward_are_deterministic(model):
    name = "A" if model.config.tie_word_embeddings else "B"
    twin = _model(name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    inputs = make_inputs("image_video")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, twin(**inputs).logits)


def test_batch_of_two_equals_two_singles(model):
    batch = make_inputs("padded_batch", labels=False)
    mask = batch["attention_mask"]
    with torch.no_grad():
        both = model(**batch).logits
        rows = [(0, 0), (1, 1)]  # (row, image index)
        for row, img in rows:
            keep = mask[row].bool()
            grid = batch["image_grid_thw"][img:img + 1]
            start = int(batch["image_grid_thw"][:img].prod(-1).sum())
            single = {k: batch[k][row:row + 1, keep] for k in ("input_ids", "mm_token_type_ids",
                                                               "moe_mm_token_type_ids")}
            single.update(image_grid_thw=grid, pixel_values=batch["pixel_values"][start:start + int(grid.prod())])
            alone = model(**single).logits[0]
            torch.testing.assert_close(both[row, keep], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["image", "padded_batch"])
def test_cached_decode_equals_full_forward(model, case):
    inputs = make_inputs(case, labels=False)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    B, P = ids.shape
    new = torch.randint(9, 1024, (B, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full_inputs = dict(inputs, input_ids=torch.cat([ids, new], 1),
                           attention_mask=torch.cat([mask, torch.ones_like(new)], 1))
        for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):
            full_inputs[key] = torch.cat([inputs[key], torch.zeros_like(new)], 1)
        full = model(**full_inputs).logits  # (B, P + 3, V)
        cache = StaticKVCache(model.config.text, B, P + 8)
        out = model(**dict(inputs, attention_mask=mask), past_key_values=cache, logits_to_keep=1)
        torch.testing.assert_close(out.logits[:, -1], full[:, P - 1], atol=1e-5, rtol=1e-5)
        for i in range(3):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            step = model(input_ids=new[:, i:i + 1], attention_mask=mask, past_key_values=cache,
                         rope_deltas=out.rope_deltas)
            torch.testing.assert_close(step.logits[:, -1], full[:, P + i], atol=1e-5, rtol=1e-5)
    assert cache.seq_len == P + 3


@pytest.mark.parametrize("case", ["image_video", "padded_batch"])
def test_prefill_runs_the_last_layer_on_the_kept_positions_only(model, case):
    """logits_to_keep=1: the last layer's feed-forward sees B rows, every layer still caches all
    T tokens, and the cache and the kept logits equal those of a forward that keeps everything."""
    inputs = make_inputs(case, labels=False)
    B, P = inputs["input_ids"].shape
    last = model.model.layers[-1]
    rows = []
    hook = last.mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:2]))
    try:
        with torch.no_grad():
            caches = [StaticKVCache(model.config.text, B, P + 2) for _ in range(2)]
            pruned = model(**inputs, past_key_values=caches[0], logits_to_keep=1)
            full = model(**inputs, past_key_values=caches[1], logits_to_keep=0)
    finally:
        hook.remove()
    assert rows == [(B, 1), (B, P)]
    torch.testing.assert_close(pruned.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
    for k_pruned, k_full in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(k_pruned, k_full, atol=0, rtol=0)


def test_vision_tokens_and_markers_reach_only_vision_experts(model):
    inputs = make_inputs("image_video", labels=False)
    vision = inputs["moe_mm_token_type_ids"][0] != 0
    counts = {}
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            for bank in ("text_experts", "vision_experts"):
                getattr(layer.mlp, bank).register_forward_hook(
                    lambda m, args, out, key=(i, bank): counts.__setitem__(key, args[0].shape[0]))
    with torch.no_grad():
        model(**inputs)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    assert counts == {**{(i, "text_experts"): int((~vision).sum()) for i in moe_layers},
                      **{(i, "vision_experts"): int(vision.sum()) for i in moe_layers}}
    for layer in model.model.layers:
        if layer.is_moe:
            for bank in (layer.mlp.text_experts, layer.mlp.vision_experts):
                bank._forward_hooks.clear()


def test_logits_to_keep_and_loss_semantics(model):
    inputs = make_inputs("image")
    with torch.no_grad():
        out = model(**inputs)
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
        last = model(**unlabelled, logits_to_keep=2)
        picked = model(**unlabelled, logits_to_keep=torch.tensor([0, 3]))
        with pytest.raises(ErnieError, match="logits_to_keep=0"):
            model(**inputs, logits_to_keep=1)
    torch.testing.assert_close(last.logits, out.logits[:, -2:])
    torch.testing.assert_close(picked.logits, out.logits[:, [0, 3]])
    labels = inputs["labels"]
    want = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    assert out.aux_loss is None and out.router_logits is None
    with torch.no_grad():
        with_aux = model(**inputs, output_router_logits=True)
    coef = model.config.text.router_aux_loss_coef
    torch.testing.assert_close(with_aux.loss, want + coef * with_aux.aux_loss)
    n_moe = sum(layer.is_moe for layer in model.model.layers)
    assert len(with_aux.router_logits) == n_moe
    assert with_aux.router_logits[0].shape == (inputs["input_ids"].numel(), model.config.text.moe_num_experts)


def test_mismatched_image_tokens_raise_a_clear_error(model):
    inputs = make_inputs("image", labels=False)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(3)] = 20  # one image token too few
    with pytest.raises(ErnieError, match=r"5 image tokens but the images produce 6 embeddings"):
        model(**dict(inputs, input_ids=ids))
    with pytest.raises(ErnieError, match=r"describes 24 patches but 23 pixel rows"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:-1]))
    with pytest.raises(ErnieError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_vision_mlp_in_place_activation_equals_the_formula_and_keeps_autograd():
    """quick_gelu runs in place on fc1's output at inference; training still differentiates."""
    from model.vision import VisionMLP

    cfg = our_config("A").vision
    mlp = VisionMLP(cfg)
    assert mlp.quick
    x = torch.randn(5, cfg.hidden_size)
    h = mlp.fc1(x).detach()
    want = mlp.fc2(h * torch.sigmoid(1.702 * h)).detach()
    with torch.no_grad():
        assert torch.equal(mlp(x), want)
    out = mlp(x)  # weights need gradients: the out-of-place path
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    out.sum().backward()
    assert mlp.fc1.weight.grad is not None and mlp.fc1.weight.grad.abs().sum() > 0


def test_resampler_pairs_an_image_with_itself_through_fc1s_summed_halves():
    """Images only: temporal fc1 takes each row once with its two input halves summed (fp32); the
    same embeddings as the concatenated pair; bf16 keeps the concatenation."""
    from model.resampler import Resampler, temporal_pair_index

    torch.manual_seed(0)
    resampler = Resampler(our_config("A")).eval()
    randomize_(resampler, 0)
    grids = [(1, 4, 4), (1, 2, 6)]
    features = torch.randn(sum(t * h * w for t, h, w in grids), resampler.spatial_linear.fc1.in_features // 4)
    with torch.no_grad():
        x = resampler.spatial_linear(features.reshape(-1, features.shape[-1] * 4))
        first, second = temporal_pair_index(grids, resampler.merge, x.device)
        want = resampler.after_norm(resampler.mlp(resampler.temporal_linear(torch.cat([x[first], x[second]], -1))))
        assert resampler.temporal_linear.can_self_pair()
        torch.testing.assert_close(resampler(features, grids), want, atol=1e-5, rtol=1e-5)
    assert not resampler.to(torch.bfloat16).temporal_linear.can_self_pair()


def test_pictures_encoded_in_parallel_parts_give_the_logits_of_one_pass(model, monkeypatch):
    """The CPU backend may encode a prefill's pictures in parts on idle cores: the same logits."""
    from model.backends.cpu import threads
    from model.ernie_vl import split_items

    inputs = make_inputs("two_images", labels=False)
    assert len(split_items([tuple(g) for g in inputs["image_grid_thw"].tolist()], 2)) == 2
    with torch.no_grad():
        whole = model(**inputs).logits
        monkeypatch.setattr(type(model.backend), "parallel_parts", lambda self: 2)
        monkeypatch.setattr(threads, "part_workers", lambda: 2)  # the CPU backend's pool, whatever the CPU
        split = model(**inputs).logits
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
