"""The GPU path (model/backends/cuda) on any machine: its Triton kernels against torch references
under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), the decode
step run eagerly, the streaming loop, sampling on the device. Shapes are tiny: the interpreter
runs every program in Python. The same checks on a real GPU are in tests/test_cuda.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the GPU path's kernels are Triton kernels")

from model.backends.cuda import fused_moe  # noqa: E402
from model.backends.cuda.decode import capacity_for, graphs_enabled  # noqa: E402
from model.backends.cuda.moe import modality_moe  # noqa: E402
from model.backends.cuda.ops import add_rms_norm, rope_qkv_to_cache  # noqa: E402
from model.config import ErnieVLConfig  # noqa: E402
from model.generation.generate import GenerationConfig  # noqa: E402
from model.generation.sampling import DeviceSampler  # noqa: E402
from model.moe import ModalityMoE  # noqa: E402
from model.rope import rotate_text  # noqa: E402
from tests.helpers.device_path import device_generate  # noqa: E402
from tests.test_generate_parity import _golden, _ours_from_golden, gold  # noqa: E402
from tests.tiny_configs import CONFIGS  # noqa: E402


def _experts_reference(x, experts, weights, gate_up, down):
    """float64 sum over slots of weight * SwiGLU expert; slots with expert -1 add nothing."""
    N, K = experts.shape
    I = gate_up.shape[1] // 2
    out = torch.zeros(N, x.shape[1], dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            e = int(experts[n, k])
            if e >= 0:
                gate, up = (x[n].double() @ gate_up[e, :I].double().T, x[n].double() @ gate_up[e, I:].double().T)
                out[n] += weights[n, k].double() * ((F.silu(gate) * up) @ down[e].double().T)
    return out


@pytest.mark.parametrize("tokens,dtype,tol", [(3, torch.float32, 1e-6), (40, torch.float32, 1e-6),
                                              (3, torch.bfloat16, 2e-2), (40, torch.bfloat16, 2e-2)])
def test_fused_experts_matches_reference(tokens, dtype, tol):
    """3 tokens x 2 slots: one GEMV per slot; 40 x 2 = 80 slots: sorted by expert, blocks of 16."""
    gen = torch.Generator().manual_seed(tokens)
    E, K, H, I = 4, 2, 40, 24  # H, I not multiples of the tiles: masked edges
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    gate_up = (0.2 * torch.randn(E, 2 * I, H, generator=gen)).to(dtype)
    down = (0.2 * torch.randn(E, H, I, generator=gen)).to(dtype)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])  # (N, K)
    experts[::3, 1] = -1  # a slot of the other modality: skipped
    weights = torch.rand(tokens, K, generator=gen).to(dtype)
    out = fused_moe.fused_experts(x, experts, weights, gate_up, down)
    ref = _experts_reference(x, experts, weights, gate_up, down)
    assert out.dtype == dtype and out.shape == (tokens, H)
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol


def test_align_slots_groups_every_slot_once():
    gen = torch.Generator().manual_seed(0)
    E, bm = 5, 16
    experts = torch.randint(-1, E, (70,), generator=gen)
    sorted_slots, block_expert, total = fused_moe.align_slots(experts, E, bm)
    S = experts.numel()
    assert sorted_slots.numel() == block_expert.numel() * bm  # the grid depends on S, E and BM only
    real = sorted_slots[sorted_slots < S]
    assert sorted(real.tolist()) == [s for s in range(S) if experts[s] >= 0]  # each kept slot once
    for b in range(block_expert.numel()):
        rows = sorted_slots[b * bm:(b + 1) * bm]
        rows = rows[rows < S]
        if b * bm >= int(total):
            assert rows.numel() == 0
        elif rows.numel():
            assert set(experts[rows.long()].tolist()) == {int(block_expert[b])}  # one expert per block


@pytest.mark.parametrize("name", ["A", "B"])
def test_modality_moe_matches_the_cpu_split(name):
    """Both banks over every token with the other modality skipped == the CPU's host-side split."""
    config = ErnieVLConfig.from_dict(CONFIGS[name]).text
    torch.manual_seed(1)
    moe = ModalityMoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 5, config.hidden_size)
    vision = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        for mask in (vision, None):
            out, logits = modality_moe(moe, x, mask)
            ref_out, ref_logits = moe(x, mask)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_route_matches_the_router(dtype):
    from model.moe import Router

    config = ErnieVLConfig.from_dict(CONFIGS["B"]).text  # 6 experts, top 3
    router = Router(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.e_score_correction_bias.normal_(0.0, 0.1)
    x = torch.randn(7, config.hidden_size).to(dtype)
    with torch.no_grad():
        logits, weights, experts = router(x)
        fused_weights, fused_experts = fused_moe.route(logits, router.e_score_correction_bias, router.top_k,
                                                       router.norm_min, dtype)
    assert torch.equal(fused_experts, experts)
    torch.testing.assert_close(fused_weights, weights, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(dtype):
    from model.text import RMSNorm

    norm = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    gen = torch.Generator().manual_seed(5)
    x, res = torch.randn(3, 48, generator=gen).to(dtype), torch.randn(3, 48, generator=gen).to(dtype)
    total, out = add_rms_norm(x, norm.weight, norm.eps, res)
    # (equal on a GPU; Triton's interpreter may round fp32 -> bf16 toward zero: one bf16 step)
    torch.testing.assert_close(total, x + res, atol=0, rtol=0 if dtype == torch.float32 else 2 ** -7)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -6)  # 2 roundings
    with torch.no_grad():
        torch.testing.assert_close(out, norm(x + res), **tol)
        torch.testing.assert_close(add_rms_norm(x, norm.weight, norm.eps)[1], norm(x), **tol)


def test_rope_qkv_to_cache_matches_torch():
    B, Hq, Hkv, D, L, slot = 2, 4, 2, 16, 8, 5
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D)
    angles = torch.randn(B, D // 2).repeat_interleave(2, -1)  # (B, D): one angle per pair
    cos, sin = angles.cos(), angles.sin()
    keys, values = torch.zeros(B, Hkv, L, D), torch.zeros(B, Hkv, L, D)
    q = rope_qkv_to_cache(qkv, cos, sin, Hq, Hkv, keys, values, torch.tensor([slot]))
    q_ref, k_ref, v_ref = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    rot = lambda t, h: rotate_text(t.view(B, 1, h, D).transpose(1, 2), cos[:, None], sin[:, None])[:, :, 0]  # noqa: E731
    torch.testing.assert_close(q, rot(q_ref, Hq), atol=1e-6, rtol=0)
    torch.testing.assert_close(keys[:, :, slot], rot(k_ref, Hkv), atol=1e-6, rtol=0)
    assert torch.equal(values[:, :, slot], v_ref.view(B, Hkv, D))
    assert keys[:, :, :slot].abs().sum() == 0 and values[:, :, slot + 1:].abs().sum() == 0  # one slot written


@pytest.mark.slow
@pytest.mark.parametrize("config_name,case", [("A", "image"), ("B", "batch")])
def test_device_loop_greedy_matches_golden(config_name, case):
    """The whole GPU decode path (prefill, static-cache step with the fused kernels, the loop one
    step behind), run eagerly on the CPU: the reference's greedy tokens."""
    expected = _golden(config_name)["cases"][case]["sequences"]
    model = _ours_from_golden(config_name)
    inputs = gold.case_inputs(case)
    config = GenerationConfig(max_new_tokens=gold.MAX_NEW_TOKENS, eos_token_id=tuple(model.config.text.eos_token_id),
                              pad_token_id=model.config.text.pad_token_id)
    assert device_generate(model, config=config, **inputs).tolist() == expected


def test_device_sampler_is_seeded_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]] * 2)
    ids, mask = torch.tensor([[1, 2]] * 2), torch.ones(2, 2)
    greedy = DeviceSampler(GenerationConfig(), ids, mask, 5)
    assert greedy(logits).tolist() == [0, 0]
    draws = lambda seed, **kw: [DeviceSampler(GenerationConfig(do_sample=True, seed=seed, **kw), ids, mask, 5)(logits)  # noqa: E731
                                .tolist() for _ in range(1)][0]
    sampler = DeviceSampler(GenerationConfig(do_sample=True, seed=7), ids, mask, 5)
    first = [sampler(logits).tolist() for _ in range(20)]
    again = DeviceSampler(GenerationConfig(do_sample=True, seed=7), ids, mask, 5)
    assert [again(logits).tolist() for _ in range(20)] == first  # same seed, same draws
    assert len({t for row in first for t in row}) > 1  # it does sample
    assert draws(3, top_k=1) == [0, 0]
    assert draws(3, top_p=0.01) == [0, 0]
    penalised = DeviceSampler(GenerationConfig(repetition_penalty=100.0), torch.tensor([[0, 1]] * 2), mask, 5)
    assert penalised(logits).tolist() == [2, 2]  # 0 and 1 were seen: 2.0 -> 0.02, 1.0 -> 0.01


def test_device_sampler_draws_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    sampler = DeviceSampler(GenerationConfig(do_sample=True, seed=0), torch.zeros(1, 1, dtype=torch.long),
                            torch.ones(1, 1), 4)
    logits = probs.log()[None].expand(4000, -1)
    counts = torch.bincount(sampler(logits), minlength=4).double() / 4000
    torch.testing.assert_close(counts, probs.double(), atol=0.03, rtol=0)


def test_graphs_switch_and_capacity_buckets(monkeypatch):
    monkeypatch.delenv("ERNIE_CUDA_GRAPHS", raising=False)
    assert graphs_enabled()
    monkeypatch.setenv("ERNIE_CUDA_GRAPHS", "0")
    assert not graphs_enabled()
    assert capacity_for(10) == 256 and capacity_for(257) == 512 and capacity_for(512) == 512


def test_bench_cuda_report_has_batch8_and_gpu_targets():
    import benchmarks.bench as bench

    config = bench.bench_config(2, 1)
    ours = {"decode_tok_s": 320.0, "decode_b8_tok_s": 1700.0, "prefill_tok_s": 30000.0, "ttft_s": 0.07}
    ref = {"decode_tok_s": 11.0, "decode_b8_tok_s": 80.0, "prefill_tok_s": 19000.0, "ttft_s": 0.12}
    rows = {r["metric"]: r for r in bench.build_rows(config, ours, ref, 4.2e12, 10**9, "cuda")}
    assert rows["decode_b8_over_b1"]["ernie"] == pytest.approx(1700 / 320)
    assert rows["decode_b8_over_b1"]["pass"] is True
    assert rows["decode_tok_s"]["pass"] is True and rows["decode_tok_s"]["target"] == "ernie >= 300"
    assert rows["prefill_tok_s"]["pass"] is True and rows["ttft_s"]["pass"] is True
    assert bench.report_names("cuda") == ("results-cuda.json", "RESULTS-cuda.md")
    assert bench.report_names("cpu") == ("results.json", "RESULTS.md")
    assert "decode_b8_over_b1" not in {r["metric"] for r in bench.build_rows(config, ours, ref, 1e11, 10**9)}
    json.dumps(rows)
