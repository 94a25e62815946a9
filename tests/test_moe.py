"""Tier 1/3: the router, the expert banks, modality isolation and the load-balancing loss.

Every check compares against a deliberately naive per-token implementation or hand numbers,
not against the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.backends import base
from model.config import tiny
from model.ernie_vl import load_balancing_loss
from model.moe import Experts, ModalityMoE, Router

CFG = tiny().text  # H 64, 4 experts top-2, widths (32, 16), one shared expert


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, b in module.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return module


def _naive_expert(bank: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    I = bank.down_proj.shape[-1]
    gate, up = bank.gate_up_proj[e][:I] @ x, bank.gate_up_proj[e][I:] @ x  # gate rows come first
    return bank.down_proj[e] @ (F.silu(gate) * up)


def _naive_route(router: Router, x: torch.Tensor) -> tuple[list[int], list[float]]:
    probs = (router.weight.double() @ x.double()).softmax(-1)
    biased = probs + router.e_score_correction_bias.double()
    chosen = sorted(range(len(probs)), key=lambda e: -biased[e].item())[:router.top_k]
    total = max(sum(probs[e].item() for e in chosen), router.norm_min)
    return chosen, [probs[e].item() / total for e in chosen]


def test_router_chooses_on_biased_but_weights_by_unbiased_probs():
    r = Router(CFG)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, 64) * 3.0)
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.zeros(1, 64)
    x[0, :3] = torch.tensor([1.0, 2.0, 0.5])  # probs favour expert 1, then 0; expert 3 is least likely
    logits, weights, experts = r(x)
    probs = logits.softmax(-1)[0]
    assert experts[0].tolist() == [3, 1]  # the bias forces expert 3 in first
    expected = probs[[3, 1]] / probs[[3, 1]].sum()
    torch.testing.assert_close(weights[0], expected)
    assert logits.dtype == torch.float32


def test_router_runs_in_fp32_for_bf16_inputs():
    r = _randomized(Router(CFG))
    x = torch.randn(5, 64)
    logits16, w16, _ = r(x.bfloat16())
    assert logits16.dtype == torch.float32 and w16.dtype == torch.bfloat16
    torch.testing.assert_close(logits16, F.linear(x.bfloat16().float(), r.weight))
    torch.testing.assert_close(w16.float().sum(-1), torch.ones(5), atol=1e-2, rtol=0)


@pytest.mark.parametrize("tokens", [1, 3, 40])  # 1, 3: gathered path; 40: sorted segments
def test_experts_match_naive_loop(tokens):
    bank = _randomized(Experts(4, 64, 32))
    x = torch.randn(tokens, 64)
    experts = torch.randint(0, 4, (tokens, 2))
    weights = torch.rand(tokens, 2)
    out = bank(x, experts, weights)
    for n in range(tokens):
        want = sum(weights[n, k] * _naive_expert(bank, int(experts[n, k]), x[n]) for k in range(2))
        torch.testing.assert_close(out[n], want, atol=1e-5, rtol=1e-4)


def test_gathered_and_segmented_paths_agree(monkeypatch):
    bank = _randomized(Experts(4, 64, 16), seed=3)
    x, experts, weights = torch.randn(6, 64), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    monkeypatch.setattr(base, "GATHER_MAX_SLOTS", 0)
    segmented = bank(x, experts, weights)
    monkeypatch.setattr(base, "GATHER_MAX_SLOTS", 10 ** 6)
    torch.testing.assert_close(bank(x, experts, weights), segmented, atol=1e-6, rtol=1e-5)


def test_modality_moe_matches_naive_per_token_routing():
    block = _randomized(ModalityMoE(CFG), seed=1)
    x = torch.randn(2, 7, 64)
    vision = torch.zeros(2, 7, dtype=torch.bool)
    vision[0, 2:5] = True  # start marker, two image tokens (markers count as vision)
    vision[1, 1:6] = True
    with torch.no_grad():
        out, logits = block(x, vision)
        for b in range(2):
            for t in range(7):
                router, bank = ((block.vision_router, block.vision_experts) if vision[b, t]
                                else (block.text_router, block.text_experts))
                chosen, w = _naive_route(router, x[b, t])
                want = sum(wk * _naive_expert(bank, e, x[b, t]) for e, wk in zip(chosen, w))
                want = want + block.shared_experts(x[b, t])
                torch.testing.assert_close(out[b, t], want.float(), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(logits[b * 7 + t], F.linear(x[b, t], router.weight))


def test_vision_tokens_never_reach_text_experts():
    block = _randomized(ModalityMoE(CFG), seed=2)
    seen = {}
    for name in ("text_experts", "vision_experts"):
        getattr(block, name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
    x = torch.randn(1, 9, 64)
    vision = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    block(x, vision)
    torch.testing.assert_close(seen["text_experts"], x[0][~vision[0]])
    torch.testing.assert_close(seen["vision_experts"], x[0][vision[0]])
    seen.clear()
    block(x, None)  # no modality information: everything is text
    assert "vision_experts" not in seen and seen["text_experts"].shape[0] == 9


def test_load_balancing_loss_by_hand():
    # 2 experts, top-1; layer rows: token a -> probs (0.73, 0.27), token b -> (0.27, 0.73)
    logits = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    p = torch.tensor([1.0, 0.0]).softmax(-1)[0].item()
    # pooled rows: picks (0, 1, 0, 0) -> f = (3/4, 1/4); mean probs P = ((3p + 1 - p)/4, (3(1-p) + p)/4)
    f = torch.tensor([0.75, 0.25])
    P = torch.tensor([(3 * p + (1 - p)) / 4, (3 * (1 - p) + p) / 4])
    assert load_balancing_loss(logits, 2, 1).item() == pytest.approx(2 * (f * P).sum().item(), rel=1e-6)
    # padding rows are excluded: mask out token b in both layers
    mask = torch.tensor([[1, 0]])
    P_masked = torch.tensor([p, 1 - p])
    assert load_balancing_loss(logits, 2, 1, mask).item() == pytest.approx(
        2 * (torch.tensor([1.0, 0.0]) * P_masked).sum().item(), rel=1e-6)
