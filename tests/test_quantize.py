"""Weight-only int8 / int4: the format's error bounds, the CPU kernels (every build this CPU runs)
against the torch reference, the transform on tiny models, the checkpoint round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from model import ErnieVL
from model.backends import select_backend
from model.backends.cpu import qkernels
from model.backends.qformat import (QuantizedWeight, pack_int4, quantize_activations, reference_product,
                                    unpack_int4)
from model.checkpoint.quantized import save_quantized
from model.config import ErnieVLConfig
from model.quantize import QuantExpertBank, QuantLinear, QuantSpec, group_for, quantize_model
from tests.helpers.checkpoints import make_checkpoint_from_ours
from tests.tiny_configs import CONFIG_A

ALL_BUILDS = ("avx512vnni", "avx2")


def _gaussian(N, K, seed=0, std=0.02):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * std


# --- the format ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group, bound", [(8, 128, 0.008), (8, 32, 0.007), (4, 64, 0.095), (4, 32, 0.085)])
def test_relative_error_on_gaussian_weights_is_bounded(bits, group, bound):
    w = _gaussian(256, 512)
    qw = QuantizedWeight.quantize(w, bits, group)
    rel = float((qw.dequantize() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel < bound
    assert rel > bound / 4  # not lossless: the bound would not catch a format that stored floats


@pytest.mark.parametrize("bits", [8, 4])
def test_every_element_is_within_half_a_step_of_its_group(bits):
    w = _gaussian(64, 256, seed=1) * torch.linspace(0.1, 10, 256)  # groups of very different ranges
    qw = QuantizedWeight.quantize(w, bits, 64)
    step = qw.scales.float().repeat_interleave(64, dim=1)  # (N, K)
    err = (qw.dequantize() - w).abs()
    # half a step, plus the fp16 rounding of the scale (and zero) times the largest code
    slack = step * (0.5 + (127 if bits == 8 else 15) * 2 ** -10) + (0 if bits == 8 else w.abs().amax() * 2 ** -10)
    assert bool((err <= slack).all())


def test_zero_and_constant_groups_stay_finite_and_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    w[2, :32] = -1.0
    assert torch.equal(QuantizedWeight.quantize(w, 4, 32).dequantize(), w)  # the zero point carries a constant
    int8 = QuantizedWeight.quantize(w, 8, 32).dequantize()
    assert torch.equal(int8[3], w[3]) and torch.allclose(int8, w, rtol=2 ** -10, atol=0)  # fp16 scale rounding


def test_int4_packing_round_trips_and_puts_column_16_plus_j_in_the_high_nibble():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 5]) == int(q[0, 5]) | int(q[0, 21]) << 4


def test_codes_and_shapes_of_each_format():
    qw8 = QuantizedWeight.quantize(_gaussian(8, 256), 8, 128)
    assert qw8.qweight.dtype == torch.int8 and qw8.qweight.shape == (8, 256) and qw8.zeros is None
    assert qw8.scales.dtype == torch.float16 and qw8.scales.shape == (8, 2)
    assert int(qw8.qweight.abs().max()) == 127
    qw4 = QuantizedWeight.quantize(_gaussian(8, 256), 4, 64)
    assert qw4.qweight.dtype == torch.uint8 and qw4.qweight.shape == (8, 128)
    assert qw4.scales.shape == qw4.zeros.shape == (8, 4) and qw4.group_size == 64 and qw4.shape == (8, 256)
    assert qw4.nbytes / (8 * 256 * 2) == pytest.approx(0.28125)  # 4 bits + 2 x 16 bits per 64


@pytest.mark.parametrize("K, bits, want", [(2560, 4, 64), (2560, 8, 128), (1536, 4, 64), (96, 4, 32),
                                           (96, 8, 32), (64, 8, 64), (48, 4, None), (16, 8, None), (20, 4, None)])
def test_group_size_shrinks_for_narrow_layers(K, bits, want):
    assert group_for(K, bits, QuantSpec(bits).group_size) == want


def test_quantize_spec_names():
    assert QuantSpec.parse("int4").bits == 4 and QuantSpec.parse(8).group_size == 128
    assert QuantSpec.parse(None) is None and QuantSpec.parse("none") is None
    with pytest.raises(Exception, match="int8 or int4"):
        QuantSpec.parse("int3")
    with pytest.raises(ValueError):
        QuantSpec(4, 48)


# --- the CPU kernels -------------------------------------------------------------------------------

def _build(name):
    if name not in qkernels.cpu_builds():
        pytest.skip(f"this CPU cannot run the {name} build (capability "
                    f"{torch.backends.cpu.get_cpu_capability()}, builds {qkernels.cpu_builds()})")
    try:
        return qkernels.load_build(name)
    except (OSError, RuntimeError) as e:
        pytest.skip(f"no C compiler for the {name} build: {e}")


@pytest.mark.parametrize("build", ALL_BUILDS)
def test_build_passes_its_self_check(build):
    assert qkernels.self_check(_build(build)) == ""


@pytest.mark.parametrize("build", ALL_BUILDS)
@pytest.mark.parametrize("bits, N, K, G", [(8, 37, 96, 32), (8, 64, 256, 128), (8, 19, 160, 32), (4, 21, 128, 64),
                                           (4, 33, 96, 32), (4, 16, 384, 128), (4, 7, 2560, 64), (8, 5, 2560, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_gemv_matches_the_torch_reference(build, bits, N, K, G, rows):
    lib = _build(build)
    gen = torch.Generator().manual_seed(N * K + rows)
    qw = QuantizedWeight.quantize(torch.randn(N, K, generator=gen), bits, G)
    x = torch.randn(rows, K, generator=gen).bfloat16()
    bias = torch.randn(N, generator=gen).bfloat16()
    out = qkernels._gemv(lib, x, qw, bias, 2).float()
    ref = reference_product(x, qw, bias)
    assert torch.allclose(out, ref, rtol=2 ** -7, atol=2e-3 * float(ref.abs().max()))
    exact = F.linear(x.float(), qw.dequantize(), bias.float())  # the int8 activations cost ~0.5% (x ~ N(0, 1))
    assert float((out - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("build", ALL_BUILDS)
@pytest.mark.parametrize("bits, H, I, groups", [(8, 256, 96, (128, 32)), (4, 256, 96, (64, 32)), (4, 160, 128, (32, 128)),
                                               (8, 2560, 1536, (128, 128)), (4, 2560, 1536, (64, 64))])
def test_one_token_through_a_quantized_bank_matches_the_torch_reference(build, bits, H, I, groups):
    """q_moe1 (decode at batch 1): the chosen experts' SwiGLU products and their weighted sum in
    one call equal the per-expert reference products within the kernels' rounding."""
    from model.quantize import QuantExpertBank

    lib = _build(build)
    gen = torch.Generator().manual_seed(H + I + bits)
    E = 5
    bank = QuantExpertBank(E, H, I, bits, groups, device="cpu")
    for e in range(E):
        bank.set_expert(e, QuantizedWeight.quantize(0.05 * torch.randn(2 * I, H, generator=gen), bits, groups[0]),
                        QuantizedWeight.quantize(0.05 * torch.randn(H, I, generator=gen), bits, groups[1]))
    x = torch.randn(1, H, generator=gen).bfloat16()
    experts, weights = torch.tensor([[3, 0, 4]]), torch.tensor([[0.5, 0.3, 0.2]]).bfloat16()
    out = qkernels._moe1(lib, bank, x, experts, weights, 2).float()
    ref, exact = torch.zeros(1, H), torch.zeros(1, H)
    for e, w in zip(experts[0].tolist(), weights[0].float().tolist()):
        gate, up = reference_product(x, bank.weight("gate_up", e)).chunk(2, dim=-1)
        ref += w * reference_product(F.silu(gate) * up, bank.weight("down", e))
        gate, up = F.linear(x.float(), bank.weight("gate_up", e).dequantize()).chunk(2, dim=-1)
        exact += w * F.linear(F.silu(gate) * up, bank.weight("down", e).dequantize())
    # the activations between the two products are rounded to int8 blocks from sums in another
    # order than the reference's, so a few land on the other side of a rounding step
    assert float((out - ref).norm() / ref.norm()) < 0.01
    assert float((out - exact).norm() / exact.norm()) < 0.03


def test_the_cpu_backend_sends_one_decode_token_through_q_moe1(monkeypatch):
    """A quantized model's decode step takes the one-call route, and its logits stay those of the
    per-expert route within the kernels' rounding."""
    if not qkernels.available():
        pytest.skip(f"no quantized CPU kernels here: {qkernels.unavailable_reason}")
    from model.backends.cpu.backend import CpuBackend
    from model.quantize import QuantExpertBank

    torch.manual_seed(0)
    bank = QuantExpertBank(4, 128, 64, 4, (64, 64), device="cpu")
    for e in range(4):
        bank.set_expert(e, QuantizedWeight.quantize(0.05 * torch.randn(128, 128), 4, 64),
                        QuantizedWeight.quantize(0.05 * torch.randn(128, 64), 4, 64))
    experts_module = type("Bank", (), {"bank": bank, "gate_up": lambda self, x, e: bank.gate_up(x, e),
                                       "down": lambda self, h, e: bank.down(h, e)})()
    x = torch.randn(1, 128).bfloat16()
    ids, w = torch.tensor([[2, 1]]), torch.tensor([[0.6, 0.4]]).bfloat16()
    calls = []
    monkeypatch.setattr(qkernels, "moe_decode", lambda *a: calls.append(1) or qkernels._moe1(qkernels._library(), *a, 2))
    fused = CpuBackend().experts(experts_module, x, ids, w)
    assert calls == [1]
    plain = CpuBackend().experts(experts_module, torch.cat([x, x]), torch.cat([ids, ids]), torch.cat([w, w]))[:1]
    assert calls == [1]  # two tokens: the per-expert route
    assert torch.allclose(fused.float(), plain.float(), rtol=0.02, atol=0.02 * float(plain.abs().max()))


@pytest.mark.parametrize("rows", [9, 20, qkernels.SLICED_MAX_ROWS])
def test_gemv_of_a_batch_step_runs_in_slices_of_max_rows(rows):
    """Decode steps of a batch (more rows than the C product takes) go through it in slices
    instead of dequantizing the weight; the result is the reference product."""
    if not qkernels.available():
        pytest.skip(f"no quantized CPU kernels here: {qkernels.unavailable_reason}")
    gen = torch.Generator().manual_seed(rows)
    qw = QuantizedWeight.quantize(torch.randn(40, 256, generator=gen), 4, 64)
    x = torch.randn(2, rows, 256, generator=gen).bfloat16()[:, :rows // 2 + 1]  # (2, r, K), not contiguous
    assert qkernels.applies(x, qw) == (x.shape[0] * x.shape[1] <= qkernels.SLICED_MAX_ROWS)
    if not qkernels.applies(x, qw):
        x = x[:1]
    out = qkernels.gemv(x, qw).float()
    ref = reference_product(x, qw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=2 ** -7, atol=2e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("build", ALL_BUILDS)
def test_gemv_takes_fp32_activations_and_returns_fp32(build):
    lib = _build(build)
    qw = QuantizedWeight.quantize(_gaussian(40, 128, seed=3), 4, 64)
    x = torch.randn(2, 128)
    out = qkernels._gemv(lib, x, qw, None, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, reference_product(x, qw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", ALL_BUILDS)
@pytest.mark.parametrize("bits, G", [(8, 32), (8, 128), (4, 32), (4, 64)])
def test_dequantize_equals_torch(build, bits, G):
    lib = _build(build)
    qw = QuantizedWeight.quantize(_gaussian(24, 256, seed=4), bits, G)
    assert torch.equal(qkernels._dequantize(lib, qw, 2), qw.dequantize())


def test_activation_quantization_is_per_block_of_32():
    x = torch.cat([torch.full((32,), 100.0), torch.linspace(-1, 1, 32)])[None]
    xq = quantize_activations(x)
    assert torch.allclose(xq[0, 32:], x[0, 32:], atol=1 / 127)  # the second block keeps its own scale
    assert torch.equal(xq[0, :32], x[0, :32])


def test_products_of_many_rows_dequantize_then_multiply(monkeypatch):
    qw = QuantizedWeight.quantize(_gaussian(48, 128, seed=5), 4, 64)
    x = torch.randn(20, 128).bfloat16()
    ref = F.linear(x.float(), qw.dequantize())

    def close(out):  # bf16 outputs (and, on CPUs with native bf16, the weight rounded to bf16 first)
        return float((out.float() - ref).norm() / ref.norm()) < 2 ** -7

    assert close(select_backend("cpu").quant_linear(x, qw))
    monkeypatch.setattr(qkernels, "available", lambda: False)  # no compiler: torch dequantizes
    assert close(select_backend("cpu").quant_linear(x, qw))
    ref = ref[:1]
    assert close(select_backend("cpu").quant_linear(x[:1], qw))


# --- the transform on tiny models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bf16():
    torch.manual_seed(0)
    config = ErnieVLConfig.from_dict(CONFIG_A)
    return ErnieVL.from_config(config, dtype=torch.bfloat16).eval()


def _ids():
    return torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]])


@pytest.mark.parametrize("bits, min_cos", [(8, 0.999), (4, 0.98)])
def test_quantized_forward_stays_close_to_bf16(tiny_bf16, bits, min_cos):
    model = quantize_model(copy.deepcopy(tiny_bf16), QuantSpec(bits))
    with torch.no_grad():
        ref, out = tiny_bf16(input_ids=_ids()).logits.float(), model(input_ids=_ids()).logits.float()
    cos = F.cosine_similarity(ref.flatten(1), out.flatten(1)).item()
    assert min_cos < cos < 1.0  # close, and not the untouched model


def test_what_is_quantized_and_what_keeps_its_precision(tiny_bf16):
    model = quantize_model(copy.deepcopy(tiny_bf16), QuantSpec(4))
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.shared_experts.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(layer.mlp.text_experts.bank, QuantExpertBank)
    assert not isinstance(layer.mlp.vision_experts.bank, QuantExpertBank)  # its down projection is 16 wide
    assert layer.mlp.text_router.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(model.quantized_head, QuantLinear)
    assert isinstance(model.vision_model.blocks[0].attn.qkv, QuantLinear)  # the measured choice: vision too
    assert isinstance(model.model.resampler_model.mlp, QuantLinear)
    kept = quantize_model(copy.deepcopy(tiny_bf16), QuantSpec(4, lm_head=False, vision=False))
    assert kept.quantized_head is None and not any(isinstance(m, QuantLinear) for m in kept.vision_model.modules())


def test_cached_decode_matches_the_full_forward_when_quantized(tiny_bf16):
    model = quantize_model(copy.deepcopy(tiny_bf16), QuantSpec(4))
    out = model.generate(_ids(), max_new_tokens=6, do_sample=False, eos_token_id=())
    seq = out[:, :-1]
    with torch.no_grad():
        full = model(input_ids=seq).logits[0, _ids().shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[0, _ids().shape[1]:])


# --- checkpoints -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_bf16):
    directory = tmp_path_factory.mktemp("tiny-bf16")
    make_checkpoint_from_ours(directory, tiny_bf16, ErnieVLConfig.from_dict(CONFIG_A))
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.mark.parametrize("bits", [8, 4])
def test_save_and_load_round_trip_is_exact(tiny_dir, tmp_path, bits):
    model = ErnieVL.from_pretrained(str(tiny_dir), device="cpu", quantize=f"int{bits}")
    out = save_quantized(model, tiny_dir, tmp_path / "q")
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization"]["bits"] == bits and raw["quantization"]["format"] == "ernie-weight-only"
    assert (out / "tokenizer.json").is_file()
    loaded = ErnieVL.from_pretrained(str(out), device="cpu")  # no quantize argument
    assert loaded.quantization.bits == bits
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)


def test_loading_while_quantizing_equals_quantizing_after_loading(tiny_dir, tiny_bf16):
    loaded = ErnieVL.from_pretrained(str(tiny_dir), device="cpu", dtype="bfloat16", quantize="int4")
    after = quantize_model(ErnieVL.from_pretrained(str(tiny_dir), device="cpu", dtype="bfloat16", pack=False),
                           QuantSpec(4))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, after(input_ids=_ids()).logits)


def test_a_quantized_dir_refuses_other_bits(tiny_dir, tmp_path):
    out = save_quantized(ErnieVL.from_pretrained(str(tiny_dir), device="cpu", quantize="int8"), tiny_dir, tmp_path / "q")
    with pytest.raises(Exception, match="already quantized to int8"):
        ErnieVL.from_pretrained(str(out), device="cpu", quantize="int4")
    with pytest.raises(Exception, match="already exists"):
        save_quantized(ErnieVL.from_pretrained(str(out), device="cpu"), tiny_dir, out)
