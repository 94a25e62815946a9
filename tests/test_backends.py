"""Tier 1-3: the backend interface of model/backends/: one backend per device kind, picked once and
stored on the modules; the architecture reaches every operation through it; the plain torch
Backend computes what the CPU backend computes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from model import ErnieVL
from model.attention import causal_rows
from model.backends import Backend, Linear, select_backend, use_backend
from model.backends.cpu.backend import CpuBackend
from model.backends.cuda.backend import CudaBackend
from tests.helpers.reference import make_inputs, our_config, randomize_


def test_one_backend_per_device_kind():
    assert type(select_backend("cpu")) is CpuBackend and select_backend("cpu") is select_backend(torch.device("cpu"))
    assert type(select_backend("cuda:1")) is CudaBackend and select_backend("cuda:0") is select_backend("cuda")
    assert type(select_backend("meta")) is Backend and select_backend("meta").device_type == "meta"
    with torch.device("meta"):
        assert select_backend() is select_backend("meta")
    assert select_backend() is select_backend("cpu")


def test_modules_keep_the_backend_of_the_device_they_are_built_on():
    assert Linear(4, 2).backend is select_backend("cpu")
    assert Linear(4, 2, device="meta").backend is select_backend("meta")
    model = ErnieVL.from_config(our_config("A"), device="meta")
    holders = [m for m in model.modules() if isinstance(getattr(m, "backend", None), Backend)]
    assert len(holders) > 10 and all(m.backend is select_backend("meta") for m in holders)
    model.to_empty(device="cpu")  # moved to another device kind: that kind's backend, everywhere
    assert all(m.backend is select_backend("cpu") for m in holders)
    assert copy.deepcopy(model).backend is select_backend("cpu")
    assert type(pickle.loads(pickle.dumps(Linear(4, 2))).backend) is CpuBackend


class Recording(Backend):
    """The plain torch backend, counting the operations the architecture asks for."""

    def __init__(self):
        super().__init__("cpu")
        self.calls = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def linear(self, *a):
        self._count("linear")
        return super().linear(*a)

    def experts(self, *a):
        self._count("experts")
        return super().experts(*a)

    def attention(self, *a, **k):
        self._count("attention")
        return super().attention(*a, **k)

    def rotate_vision(self, *a):
        self._count("rotate_vision")
        return super().rotate_vision(*a)

    def vocab_logits(self, *a):
        self._count("vocab_logits")
        return super().vocab_logits(*a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_architecture_asks_its_backend_and_the_torch_backend_matches_the_cpu_one(dtype):
    """An image + video prompt through the CPU backend, then through a recording plain torch one:
    every operation went through the backend, and the logits agree (fp32: both are torch there;
    bf16: the CPU kernels round differently, so both are held against the fp32 model and must be
    about as close to it: measured mean errors 0.016 and 0.019 against logits up to 4.2)."""
    model = ErnieVL(our_config("A")).eval()
    randomize_(model, 0)
    exact = copy.deepcopy(model)
    model = model.to(dtype)
    inputs = make_inputs("image_video", labels=False)
    inputs32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = exact(**inputs32).logits
        want = model(**inputs).logits.float()
        recording = Recording()
        model.use_backend(recording)
        got = model(**inputs).logits.float()
    assert set(recording.calls) == {"linear", "experts", "attention", "rotate_vision", "vocab_logits"}
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        err_cpu, err_torch = float((want - ref).abs().mean()), float((got - ref).abs().mean())
        assert err_torch <= 1.5 * err_cpu and err_cpu <= 1.5 * err_torch
        assert err_torch < 0.01 * float(ref.abs().max())


@pytest.mark.parametrize("T,S", [(1, 1), (1, 9), (3, 3), (3, 9)])
def test_torch_attention_aligns_causal_queries_with_the_last_slots(T, S):
    gen = torch.Generator().manual_seed(T * 10 + S)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, T), (2, S), (2, S)))
    got = Backend("cpu").attention(q, k, v, None, causal=True)
    mask = causal_rows(torch.arange(S - T, S), S)  # what the decoder's mask would say
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    not_causal = Backend("cpu").attention(q, k, v)
    torch.testing.assert_close(not_causal, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_use_backend_reaches_every_holder_and_only_those():
    model = ErnieVL(our_config("A"))
    other = Backend("cpu")
    assert use_backend(model, other) is model
    holders = [m for m in model.modules() if hasattr(m, "backend")]
    assert {type(m).__name__ for m in holders} >= {"ErnieVL", "Linear", "Attention", "VisionAttention", "Experts"}
    assert all(m.backend is other for m in holders)


def test_a_loaded_model_runs_on_its_devices_backend(tmp_path):
    from model import load_pretrained
    from tests.helpers.checkpoints import make_checkpoint_from_ours

    plain = ErnieVL(our_config("A"))
    make_checkpoint_from_ours(tmp_path, plain.state_dict(), plain.config, layout="baidu")
    model = load_pretrained(str(tmp_path), dtype="float32", device="cpu")
    assert all(m.backend is select_backend("cpu") for m in model.modules() if hasattr(m, "backend"))


def test_the_cpu_backend_packs_bf16_exactly_where_packing_pays():
    from model.backends.cpu import packing

    cpu = select_backend("cpu")
    assert cpu.packs(torch.bfloat16) is packing.packing_pays()
    assert not cpu.packs(torch.float32) and not select_backend("cuda").packs(torch.bfloat16)


def test_a_moe_layer_asks_its_backend_for_a_whole_layer_kernel_first(monkeypatch):
    """CUDA runs each MoE layer through its fused kernel (model/backends/cuda/moe.py): the layer asks
    ``modality_moe`` and splits by modality itself only when a backend answers None."""
    import model.backends.cuda.moe as cuda_moe
    from model.moe import ModalityMoE

    moe = ModalityMoE(our_config("A").text)
    x = torch.randn(1, 3, moe.text_router.weight.shape[1])
    seen = []
    monkeypatch.setattr(cuda_moe, "modality_moe", lambda m, a, mask: seen.append((m, a, mask)) or (a, None))
    moe.backend = select_backend("cuda")
    out, logits = moe(x)
    assert seen == [(moe, x, None)] and out is x and logits is None
    moe.backend = select_backend("cpu")
    out, logits = moe(x)
    assert len(seen) == 1 and out.shape == x.shape and logits.shape == (3, moe.num_experts)
