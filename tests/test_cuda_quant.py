"""The CUDA weight-only product (model/backends/cuda/quant_matmul.py): through Triton's interpreter
on the CPU (small shapes), and on a real GPU in the tests marked ``cuda`` (skipped without one)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.backends.qformat import QuantizedWeight

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton", reason="triton is not installed")
SHAPES = [(8, 128, (1, 40, 256)), (4, 64, (3, 70, 128)), (4, 32, (20, 33, 96)), (8, 32, (17, 65, 64))]

INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from model.backends.qformat import QuantizedWeight
    from model.backends.cuda import quant_matmul as qm
    torch.manual_seed(0)
    for bits, G, (M, N, K) in {shapes}:
        qw = QuantizedWeight.quantize(torch.randn(N, K), bits, G)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3)):
            x, b = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
            assert qm.applies(x, qw)
            y = qm.quant_linear(x, qw, b)
            assert y.dtype == dtype and y.shape == (M, N)
            ref = F.linear(x.float(), qw.dequantize(), b.float())
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            assert err < tol, (bits, G, M, N, K, dtype, err)
    print("ok")
""")


def test_the_kernel_under_the_triton_interpreter():
    """fp32 and fp16 activations (the interpreter mishandles bf16 tensors: bf16 is checked on a GPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED.format(shapes=SHAPES)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_it_does_not_apply_to_cpu_tensors_outside_the_interpreter(monkeypatch):
    from model.backends.cuda import quant_matmul as qm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qw = QuantizedWeight.quantize(torch.randn(8, 64), 4, 32)
    assert not qm.applies(torch.randn(1, 64), qw)


# --- on a GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _on_gpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.qweight.cuda(), qw.scales.cuda(), None if qw.zeros is None else qw.zeros.cuda(), qw.bits)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("bits, G, shape", SHAPES + [(4, 64, (1, 3072, 2560)), (8, 128, (1, 2560, 1536)),
                                                      (4, 64, (300, 1024, 2560))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_product_matches_the_dequantized_weight(bits, G, shape, dtype):
    from model.backends import select_backend

    quant_linear = select_backend("cuda").quant_linear

    M, N, K = shape
    qw = _on_gpu(QuantizedWeight.quantize(torch.randn(N, K) * 0.02, bits, G))
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    y = quant_linear(x, qw)
    ref = F.linear(x.float(), qw.dequantize().cuda())
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.cuda
@gpu
def test_gpu_product_replays_in_a_cuda_graph():
    from model.backends import select_backend

    quant_linear = select_backend("cuda").quant_linear

    qw = _on_gpu(QuantizedWeight.quantize(torch.randn(512, 256) * 0.02, 4, 64))
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    eager = quant_linear(x, qw)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = quant_linear(x, qw)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out.float(), quant_linear(x, qw).float())
    assert not torch.equal(out, eager)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_tiny_model_on_the_gpu_agrees_with_the_cpu(bits):
    from model import ErnieVL

    tiny = ROOT / "ernie_cli" / "assets" / "ernie-tiny"
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
    cpu = ErnieVL.from_pretrained(str(tiny), device="cpu", dtype="bfloat16", quantize=f"int{bits}")
    cuda = ErnieVL.from_pretrained(str(tiny), device="cuda", dtype="bfloat16", quantize=f"int{bits}")
    with torch.no_grad():
        a = cpu(input_ids=ids).logits.float()
        b = cuda(input_ids=ids.cuda()).logits.float().cpu()
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_the_quantized_expert_bank_product_matches_a_per_expert_loop():
    """The sync-free bank product the CUDA MoE and decode step use for int8 / int4 experts."""
    from model.backends.cuda import quant_matmul as qm
    from model.quantize import QuantExpertBank

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or Triton's interpreter")
    gen = torch.Generator().manual_seed(0)
    E, H, I = 4, 64, 32
    for bits in (8, 4):
        bank = QuantExpertBank(E, H, I, bits, (32, 32), device="cpu")
        for e in range(E):
            bank.set_expert(e, QuantizedWeight.quantize(torch.randn(2 * I, H, generator=gen), bits, 32),
                            QuantizedWeight.quantize(torch.randn(H, I, generator=gen), bits, 32))
        x = torch.randn(3, H, generator=gen)
        experts, weights = torch.tensor([[0, 2], [3, -1], [1, 1]]), torch.rand(3, 2, generator=gen)
        out = qm.quant_bank_product(bank, x, experts, weights)
        ref = torch.zeros(3, H)
        for n, k in ((n, k) for n in range(3) for k in range(2)):
            e = int(experts[n, k])
            if e >= 0:
                gate, up = F.linear(x[n], bank.weight("gate_up", e).dequantize()).chunk(2)
                ref[n] += weights[n, k] * F.linear(F.silu(gate) * up, bank.weight("down", e).dequantize())
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max())), bits


@pytest.mark.parametrize("bits", [8, 4])
def test_the_gpu_decode_loop_runs_a_quantized_model(bits):
    """model/generation/device_loop.py with int8 / int4 weights (on a CPU: interpreted, eager step)."""
    from model import ErnieVL
    from model.generation.generate import GenerationConfig
    from tests.helpers.device_path import device_generate

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ErnieVL.from_pretrained(str(ROOT / "ernie_cli" / "assets" / "ernie-tiny"), dtype="float32",
                                    device=device, quantize=f"int{bits}")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]], device=device)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=())
    eager = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=())
    assert torch.equal(device_generate(model, ids, config=config).cpu(), eager.cpu())
