"""Tier 1-3: the bf16 linear routing of model/backends/cpu/linear.py.

On a CPU without native bf16 arithmetic, products with many rows run in fp32 on an upcast weight
and products with a few rows go to the bf16 GEMV kernel; everything else is ``F.linear``. Each
route must give what the plain computation gives (up to the final bf16 rounding), and a bf16
model must generate the same tokens whichever route its products take.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import ErnieVL, moe
from model.backends import Linear
from model.backends.cpu import kernels
from model.backends.cpu import linear as lin
from model.generation.generate import GenerationConfig, generate
from tests.helpers.reference import make_inputs, our_config, randomize_


def _close_to_fp32(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # one bf16 rounding of an fp32 sum: within half an ulp (2^-8 relative) plus summation order
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-3 * float(ref.abs().max()))


@pytest.fixture
def slow_cpu(monkeypatch):
    """Pretend this CPU has no native bf16 (the routing under test)."""
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: False)


@pytest.mark.parametrize("rows", [16, 17, 300])
def test_many_rows_run_in_fp32_and_round_once(slow_cpu, rows):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 96).bfloat16(), torch.randn(40, 96).bfloat16(), torch.randn(40).bfloat16()
    out = lin.linear(x, w, b)
    expected = F.linear(x.float(), w.float(), b.float()).bfloat16()
    assert torch.equal(out, expected)
    out3 = lin.linear(x.view(rows, 1, 96), w)  # leading dims count as rows
    assert out3.shape == (rows, 1, 40)


@pytest.mark.parametrize("rows", [1, 3, 8, 15])
def test_few_rows_match_the_fp32_product(slow_cpu, rows):
    torch.manual_seed(rows)
    x, w = torch.randn(1, rows, 200).bfloat16(), torch.randn(70, 200).bfloat16()
    out = lin.linear(x, w)
    assert out.shape == (1, rows, 70)
    _close_to_fp32(out, x, w)


def test_native_or_other_dtypes_call_torch(monkeypatch):
    calls = []
    real = F.linear
    monkeypatch.setattr(lin.F, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(kernels, "amx_available", lambda: False)  # its route: the test below
    x, w = torch.randn(32, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert torch.equal(lin.linear(x, w), real(x, w))
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: False)
    lin.linear(torch.randn(32, 8), torch.randn(4, 8))  # fp32 weights: untouched
    assert calls == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("native,dp,rows,to_kernel", [(True, False, 1, True), (True, False, 2, True),
                                                      (True, False, 3, False), (True, True, 4, True),
                                                      (True, True, 5, False), (False, False, 8, True),
                                                      (False, False, 9, False)])
def test_few_rows_go_to_the_kernel_with_or_without_native_bf16(monkeypatch, native, dp, rows, to_kernel):
    """torch's bf16 products of a few rows read weights at half the kernel's speed even on AMX CPUs;
    the AVX2 build is compute-bound from 3 rows on, the AVX512-BF16 one is worth it up to 4."""
    calls = []
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(kernels, "gemv_available", lambda: True)
    monkeypatch.setattr(kernels, "dp_in_use", lambda: dp)
    monkeypatch.setattr(kernels, "max_rows", lambda: kernels.DP_MAX_ROWS if dp else kernels.MAX_ROWS)
    monkeypatch.setattr(kernels, "bf16_gemv", lambda x, w, b=None: calls.append(x.shape) or F.linear(x, w, b))
    x, w = torch.randn(rows, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    out = lin.linear(x, w)
    assert out.shape == (rows, 8) and bool(calls) == to_kernel


@pytest.mark.parametrize("native,amx,rows,route", [(True, True, 5, "amx"), (True, True, 192, "amx"),
                                                    (True, True, 193, "torch"), (True, False, 64, "torch"),
                                                    (True, True, 2, "gemv"), (False, True, 64, "fp32")])
def test_tens_of_rows_go_to_the_amx_product_on_amx_cpus(monkeypatch, native, amx, rows, route):
    calls = []
    real = F.linear
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(kernels, "gemv_available", lambda: True)
    monkeypatch.setattr(kernels, "dp_in_use", lambda: True)
    monkeypatch.setattr(kernels, "amx_available", lambda: amx)
    monkeypatch.setattr(kernels, "bf16_gemv", lambda x, w, b=None: calls.append("gemv") or real(x, w, b))
    monkeypatch.setattr(kernels, "amx_linear", lambda x, w, b=None: calls.append("amx") or real(x, w, b))
    monkeypatch.setattr(lin.F, "linear", lambda x, w, b=None: calls.append("fp32" if x.dtype == torch.float32
                                                                            else "torch") or real(x, w, b))
    x, w = torch.randn(rows, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    assert lin.linear(x, w).shape == (rows, 8)
    assert calls == [route]


@pytest.mark.parametrize("rows,padded", [(193, 208), (287, 288), (288, None), (1000, 1008)])
def test_big_products_pad_their_rows_to_a_multiple_of_16(monkeypatch, rows, padded):
    """oneDNN blocks some row counts badly (287 rows ran at 2/3 of 288's speed): rows are padded
    with zeros, and the result is the unpadded product (bit-identical: rows are independent)."""
    seen = []
    real = F.linear
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(kernels, "amx_available", lambda: False)
    torch.manual_seed(rows)
    x, w, b = torch.randn(1, rows, 64).bfloat16(), torch.randn(24, 64).bfloat16(), torch.randn(24).bfloat16()
    monkeypatch.setattr(lin.F, "linear", lambda a, v, c=None: (v is w and seen.append(a.numel() // 64))
                        or real(a, v, c))  # rows of the products of w (kernel self-checks aside)
    out = lin.linear(x, w, b)
    assert out.shape == (1, rows, 24) and out.is_contiguous()
    assert seen == [padded or rows]
    assert torch.equal(out[0], real(x[0], w, b))


def test_training_keeps_autograd(slow_cpu):
    """An input that needs a gradient takes torch's own bf16 path (differentiable)."""
    layer = Linear(8, 4).bfloat16()
    x = torch.randn(32, 8).bfloat16().requires_grad_()
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("rows", [2, 32])
def test_trainable_weights_keep_autograd_for_inputs_without_gradients(slow_cpu, rows):
    """Pixels (no gradient) into a trainable patch embedding: the weight still gets its gradient."""
    layer = Linear(8, 4).bfloat16()
    layer(torch.randn(rows, 8).bfloat16()).float().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(8, 4)
    plain = nn.Linear(8, 4)
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()


def test_kernel_flag_is_honoured_by_the_routing(slow_cpu, monkeypatch):
    """With the GEMV kernel unavailable, few rows fall back to torch (same numbers as F.linear)."""
    monkeypatch.setattr(kernels, "gemv_available", lambda: False)
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert torch.equal(lin.linear(x, w), F.linear(x, w))


def _bf16_model(name: str) -> ErnieVL:
    torch.manual_seed(0)
    model = ErnieVL(our_config(name)).eval()
    randomize_(model, 0)
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, moe.Router):
            m.float()
    return model


@pytest.mark.parametrize("name", ["A", "B"])
def test_bf16_generation_is_route_independent(name, monkeypatch):
    """Greedy tokens of a bf16 model with an image: torch's bf16 everywhere vs the slow-CPU routes.

    Both are held to the same model in fp32. bf16 rounding can flip a near-tie expert choice at a
    position or two (on either route: which one depends on the CPU's bf16 kernels), so the logits
    are compared position by position: the routed ones must be as close to fp32 as torch's bf16
    ones almost everywhere, and the greedy tokens must agree.
    """
    model = _bf16_model(name)
    inputs = make_inputs("image_video", labels=False)
    truth_inputs = {k: (v.float() if k.startswith("pixel_values") else v) for k, v in inputs.items()}
    inputs = {k: (v.bfloat16() if k.startswith("pixel_values") else v) for k, v in inputs.items()}
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(lin, "native_bf16_cpu", lambda: True)
    with torch.no_grad():
        truth = _bf16_model(name).float()(**truth_inputs).logits
        plain_logits = model(**inputs).logits.float()
        plain = generate(model, **inputs, config=config).tolist()
        monkeypatch.setattr(lin, "native_bf16_cpu", lambda: False)
        routed_logits = model(**inputs).logits.float()
        routed = generate(model, **inputs, config=config).tolist()
    plain_err = (plain_logits - truth).abs().amax(-1).flatten()  # (B*T,) worst logit per position
    routed_err = (routed_logits - truth).abs().amax(-1).flatten()
    scale = float(truth.abs().max())
    assert float((routed_err > 0.05 * scale).float().mean()) <= 0.1, routed_err
    assert float(routed_err.median()) <= 1.5 * float(plain_err.median()) + 1e-3, (routed_err, plain_err)
    assert routed == plain
