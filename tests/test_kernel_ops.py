"""Tier 1: the fused elementwise passes of model/backends/cpu/kernels.py (csrc/bf16_ops.c) against torch.

``rope_half`` must equal ``model.rope.rotate_vision_torch`` bit for bit: it does the same separate
fp32 products and sum. Skipped where the library cannot be built; the fallback tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.backends.cpu import kernels
from model.backends import select_backend
from model.backends.base import rotate_vision_torch

needs_ops = pytest.mark.skipif(not kernels.ops_available(), reason=f"no fused ops: {kernels.ops_unavailable_reason}")


def _tables(N: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    angles = torch.randn(N, D, generator=gen) * 3
    return angles.cos(), angles.sin()


@needs_ops
@pytest.mark.parametrize("N,H,D", [(1, 1, 2), (5, 3, 20), (64, 2, 34), (1024, 16, 80), (300, 4, 128)])
def test_qk_of_fused_qkv_bit_identical(N, H, D):
    """q and k as the vision attention hands them over: a strided view of the qkv output."""
    gen = torch.Generator().manual_seed(N + H + D)
    qkv = (torch.randn(N, 3, H, D, generator=gen) * 4).bfloat16()
    cos, sin = _tables(N, D, seed=D)
    x = qkv[:, :2]
    assert kernels.rope_half_applies(x, cos, sin)
    out = kernels.rope_half(x, cos, sin)
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == torch.bfloat16
    assert torch.equal(out, rotate_vision_torch(x, cos, sin))


@needs_ops
@pytest.mark.parametrize("shape", [(7, 24), (7, 1, 24), (9, 3, 24), (9, 2, 3, 24)])
def test_contiguous_layouts_bit_identical(shape):
    x = torch.randn(*shape).bfloat16()
    cos, sin = _tables(shape[0], shape[-1], seed=1)
    assert torch.equal(kernels.rope_half(x, cos, sin), rotate_vision_torch(x, cos, sin))


@needs_ops
def test_threads_agree_and_specials_pass_through():
    x = torch.randn(2048, 2, 16, 80).bfloat16()
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    cos, sin = _tables(2048, 80, seed=2)
    torch.set_num_threads(1)
    try:
        one = kernels.rope_half(x, cos, sin)
    finally:
        torch.set_num_threads(2)
    two = kernels.rope_half(x, cos, sin)
    assert torch.equal(one.isnan(), two.isnan()) and torch.equal(one.nan_to_num(), two.nan_to_num())
    ref = rotate_vision_torch(x, cos, sin)
    assert torch.equal(two.isnan(), ref.isnan()) and torch.equal(two.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("case", ["fp32", "odd_d", "overlapping", "grad", "fp16_tables", "wrong_table_shape"])
def test_inputs_it_does_not_take_go_through_torch(case):
    x, (cos, sin) = torch.randn(6, 2, 3, 8).bfloat16(), _tables(6, 8, seed=3)
    if case == "fp32":
        x = x.float()
    elif case == "odd_d":
        x, (cos, sin) = torch.randn(6, 3, 7).bfloat16(), _tables(6, 7, seed=3)
    elif case == "overlapping":
        x = torch.randn(6, 12).bfloat16().as_strided((6, 3, 8), (12, 2, 1))  # groups 2 elements apart
    elif case == "grad":
        x = x.float().requires_grad_().bfloat16()
    elif case == "fp16_tables":
        cos, sin = cos.half(), sin.half()
    elif case == "wrong_table_shape":
        cos, sin = cos[:, :4], sin[:, :4]
    assert not kernels.rope_half_applies(x, cos, sin)
    with pytest.raises(ValueError):
        kernels.rope_half(x, cos, sin)
    if case not in ("odd_d", "wrong_table_shape"):  # the torch path itself needs an even D and (N, D) tables
        out = select_backend("cpu").rotate_vision(x, cos, sin)
        assert torch.equal(out.detach(), rotate_vision_torch(x, cos, sin).detach())


def test_rotate_vision_autograd_stays_on_torch():
    x = torch.randn(4, 2, 2, 8, requires_grad=True)
    cos, sin = _tables(4, 8, seed=4)
    select_backend("cpu").rotate_vision(x.bfloat16(), cos, sin).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@needs_ops
def test_ops_cache_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_CACHE", str(tmp_path))
    compiler = kernels._compiler()
    first = kernels.build(compiler, source_file=kernels.OPS_SOURCE, flags=kernels.OPS_FLAGS)
    assert first.name.startswith("bf16_ops-") and first.exists()
    assert kernels.build(compiler, source_file=kernels.OPS_SOURCE, flags=kernels.OPS_FLAGS) == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]


# --- attn_decode: a few queries over the KV cache ----------------------------------------------

def _sdpa_fp32(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


@needs_ops
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D", [(1, 20, 4, 1, 1, 128), (1, 20, 4, 1, 37, 128), (1, 20, 4, 2, 300, 128),
                                            (2, 4, 4, 1, 65, 64), (2, 6, 2, 3, 129, 8), (1, 16, 1, 1, 1000, 256)])
def test_attn_decode_matches_fp32_attention(B, Hq, Hkv, T, S, D):
    """fp32 scores, softmax and sum, rounded once: within bf16 rounding of the fp32 reference, on
    cache views (slots beyond S allocated), strided queries and a per-batch padding mask."""
    gen = torch.Generator().manual_seed(S + D)
    q = torch.randn(B, T, Hq, D, generator=gen).bfloat16().transpose(1, 2)  # (B, Hq, T, D), strided
    k_buf, v_buf = (torch.randn(B, Hkv, S + 9, D, generator=gen).bfloat16() for _ in range(2))
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    mask = torch.rand(B, 1, T, S, generator=gen) > 0.25
    mask[..., -1] = True
    assert kernels.attn_decode_applies(q, k, v, mask)
    out = kernels.attn_decode(q, k, v, mask)
    assert out.shape == (B, Hq, T, D) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # laid out for the output projection
    torch.testing.assert_close(out.float(), _sdpa_fp32(q, k, v, mask), rtol=2 ** -7, atol=2e-3)


@needs_ops
def test_attn_decode_broadcast_mask_threads_and_blind_rows():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 32, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 2000, 32, generator=gen).bfloat16() for _ in range(2))
    mask = torch.rand(1, 1, 1, 2000, generator=gen) > 0.5  # shared by the batch
    ref = _sdpa_fp32(q, k, v, mask)
    torch.testing.assert_close(kernels.attn_decode(q, k, v, mask).float(), ref, rtol=2 ** -7, atol=2e-3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.attn_decode(q, k, v, mask)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, kernels.attn_decode(q, k, v, mask))  # tasks are split, never a sum
    blind = torch.zeros(1, 1, 1, 2000, dtype=torch.bool)
    assert torch.equal(kernels.attn_decode(q, k, v, blind), torch.zeros_like(q))  # sees nothing: zeros


def test_attn_decode_declines_what_it_does_not_take():
    q, k = torch.randn(1, 20, 1, 128).bfloat16(), torch.randn(1, 4, 9, 128).bfloat16()
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    assert not kernels.attn_decode_applies(torch.randn(1, 20, 2, 128).bfloat16(), k[:, :, :1], k[:, :, :1], None)
    assert not kernels.attn_decode_applies(q.float(), k.float(), k.float(), mask)
    assert not kernels.attn_decode_applies(torch.randn(1, 20, 1, 12).bfloat16(), k[..., :12], k[..., :12], mask)
    assert not kernels.attn_decode_applies(torch.randn(1, 20, 4, 128).bfloat16(), k, k, mask.expand(1, 1, 4, 9))
    with pytest.raises(ValueError, match="attn_decode does not take"):
        kernels.attn_decode(q.float(), k.float(), k.float(), None)


# --- flash_attn: many queries (prefill, vision) on AVX512-BF16 ----------------------------------

needs_flash = pytest.mark.skipif(not kernels.flash_attn_applies(*(torch.zeros(1, 1, 1, 16).bfloat16(),) * 3),
                                 reason=f"no flash kernel: {kernels.flash_unavailable_reason}")


@needs_flash
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal", [(1, 16, 16, 1024, 1024, 80, False), (1, 20, 4, 300, 300, 128, True),
                                                   (2, 6, 2, 77, 77, 16, True), (1, 4, 4, 1, 1, 32, False),
                                                   (1, 4, 2, 5, 133, 64, True), (1, 2, 1, 65, 200, 256, False)])
def test_flash_attn_matches_fp32_attention(B, Hq, Hkv, T, S, D, causal):
    """As close to fp32 attention as torch's own bf16 kernel is; strided queries, cache-like k/v
    views; causal with T < S sees the last T keys' diagonal (key j for query i when j <= i + S - T)."""
    gen = torch.Generator().manual_seed(T + S + D)
    q = torch.randn(B, T, Hq, D, generator=gen).bfloat16().transpose(1, 2)
    k_buf, v_buf = (torch.randn(B, Hkv, S + 7, D, generator=gen).bfloat16() for _ in range(2))
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    mask = None
    if causal:
        mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)  # (T, S)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    out = kernels.flash_attn(q, k, v, causal=causal)
    assert out.shape == (B, Hq, T, D) and out.transpose(1, 2).is_contiguous()
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    tolerance = 2 * float((torch_bf16.float() - ref).abs().max()) + 1e-3
    assert float((out.float() - ref).abs().max()) <= tolerance


@needs_flash
def test_flash_attn_threads_agree_and_misuse_is_refused():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8, 600, 32, generator=gen).bfloat16() for _ in range(3))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.flash_attn(q, k, v, causal=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, kernels.flash_attn(q, k, v, causal=True))  # rows are split, never a sum
    assert not kernels.flash_attn_applies(q[..., :24], k[..., :24], v[..., :24])  # D % 16
    assert not kernels.flash_attn_applies(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="flash_attn does not take"):
        kernels.flash_attn(q[:, :3], k[:, :2], v[:, :2])  # 3 query heads over 2 kv heads


@needs_ops
@pytest.mark.parametrize("T,S", [(1, 1), (1, 50), (2, 70), (3, 3)])
def test_attn_decode_without_a_mask_is_causal_aligned_to_the_end(T, S):
    """mask None: the T new tokens are the last T slots; query t sees slots 0 .. S - T + t."""
    gen = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(1, 4, T, 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, S, 32, generator=gen).bfloat16() for _ in range(2))
    explicit = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None]
    assert torch.equal(kernels.attn_decode(q, k, v, None), kernels.attn_decode(q, k, v, explicit))
    torch.testing.assert_close(kernels.attn_decode(q, k, v, None).float(), _sdpa_fp32(q, k, v, explicit),
                               rtol=2 ** -7, atol=2e-3)


def test_flash_attn_falls_back_to_torch_when_the_kernel_has_no_memory():
    """Status 2 (no memory for the repacked k/v): the same attention through SDPA, same alignment."""
    class NoMemory:
        @staticmethod
        def bf16_flash_attn(*args):
            return 2

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 5, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 9, 16, generator=gen).bfloat16() for _ in range(2))
    out = kernels._flash_call(NoMemory, q, k, v, True, 4, 0.25, 1)
    mask = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.equal(out, want)
