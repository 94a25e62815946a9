"""Tier 3: every fast path equals the plain path it replaces, on tiny random bf16 models.

Fast paths: oneDNN-packed weights for CPU bf16 inference (model/backends/cpu/packing.py), the grouped
few-slot expert dispatch (decode) vs sorted segments (prefill), the loader choosing packing, and
experts read in place from the mapped checkpoint where it does not pack.

Where oneDNN cannot pack bf16 (AVX2-only CPUs) a stand-in "packing" (plain copies, the same
products) takes its place, so the bookkeeping of packed models is tested on every CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model import ErnieVL, load_pretrained, moe
from model.backends import base
from model.backends.cpu import kernels, packing
from model.backends.cpu.backend import CpuBackend
from model.backends.cpu.linear import linear
from model.backends.cpu.packing import PackedLinear, can_pack, pack_for_cpu, packing_available
from model.checkpoint import loading
from model.errors import ErnieError
from model.generation.generate import GenerationConfig, generate
from model.moe import Experts
from tests.helpers.checkpoints import make_checkpoint_from_ours
from tests.helpers.reference import make_inputs, our_config, randomize_



@pytest.fixture(scope="module", autouse=True)
def packing_everywhere():
    """The loader packs bf16 here (where the GEMV kernel runs it would not: see ``packing_pays``)."""
    if packing_available():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CpuBackend, "packs", lambda self, dtype: dtype == torch.bfloat16)
            yield
        return

    def stand_in_linear(x, weight, bias=None):
        if x.requires_grad and torch.is_grad_enabled():
            raise ErnieError("a model packed by pack_for_cpu is for inference only and has no backward")
        return linear(x, weight, bias)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "packing_available", lambda: True)
        mp.setattr(CpuBackend, "packs", lambda self, dtype: dtype == torch.bfloat16)
        mp.setattr(packing, "pack_weight", lambda w: w.detach().clone())
        mp.setattr(packing, "packed_linear", stand_in_linear)
        yield


def _bf16_model(name: str, seed: int = 0) -> ErnieVL:
    torch.manual_seed(seed)
    model = ErnieVL(our_config(name)).eval()
    randomize_(model, seed)
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, moe.Router):
            m.float()
    return model


@pytest.fixture(scope="module", params=["A", "B"])
def pair(request):
    """(plain, packed) copies of one tiny bf16 model; B has an untied lm_head."""
    plain = _bf16_model(request.param)
    return plain, pack_for_cpu(copy.deepcopy(plain))


def test_packing_really_replaces_the_decoder_weights(pair):
    _, packed = pair
    layers = packed.model.layers
    assert isinstance(layers[0].self_attn.q_proj, PackedLinear)
    banks = [m for m in packed.modules() if isinstance(m, Experts)]
    assert banks and all(b.bank is not None and b.bank.packed and b.gate_up_proj is None for b in banks)
    assert packed.packed_head is not None
    assert not any(isinstance(m, PackedLinear) for m in packed.vision_model.modules())


def test_packed_forward_equals_plain_forward_with_image_and_video(pair):
    plain, packed = pair
    inputs = make_inputs("image_video", labels=False)
    with torch.no_grad():
        want, got = plain(**inputs).logits, packed(**inputs).logits
    assert want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_packed_greedy_generation_equals_plain(pair):
    plain, packed = pair
    inputs = make_inputs("padded_batch", labels=False)
    config = GenerationConfig(max_new_tokens=6, eos_token_id=())
    want = generate(plain, config=config, **inputs)
    assert torch.equal(generate(packed, config=config, **inputs), want)


def test_packed_state_dict_gives_back_the_plain_weights(pair):
    plain, packed = pair
    want, got = plain.state_dict(), packed.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_packed_model_loads_a_new_state_dict():
    packed = pack_for_cpu(_bf16_model("A", seed=0))
    other = _bf16_model("A", seed=1)
    packed.load_state_dict(other.state_dict(), strict=True)
    inputs = make_inputs("text", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs).logits, other(**inputs).logits, atol=0, rtol=0)


def test_packed_model_runs_without_no_grad_but_refuses_backward_with_a_clear_error():
    packed = pack_for_cpu(_bf16_model("A"))
    inputs = make_inputs("text")
    assert not any(p.requires_grad for p in packed.parameters())
    assert packed(**inputs).loss is not None  # plain inference call, grad mode on: fine
    x = packed.model.embed_tokens(inputs["input_ids"]).detach().requires_grad_()
    with pytest.raises(ErnieError, match="inference only"):
        packed(inputs_embeds=x, labels=inputs["labels"])


def test_fp32_models_are_left_unpacked():
    model = ErnieVL(our_config("A")).eval()
    assert not can_pack(model)
    assert pack_for_cpu(model) is model and model.packed_head is None
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize("bf16", [False, True])
def test_grouped_decode_dispatch_equals_segments_with_repeated_experts(monkeypatch, bf16):
    """Three tokens x top-2 over 3 experts: experts repeat across tokens, and each token's pair differs."""
    bank = Experts(3, 64, 32)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.2)
        bank.down_proj.normal_(0, 0.2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    experts = torch.tensor([[0, 2], [2, 1], [0, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    if bf16:
        bank, x = bank.to(torch.bfloat16), x.bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(base, "GATHER_MAX_SLOTS", 0)
        segmented = bank(x, experts, weights)
        monkeypatch.setattr(base, "GATHER_MAX_SLOTS", 16)
        grouped = bank(x, experts, weights)
        torch.testing.assert_close(grouped, segmented, atol=0, rtol=0)
        if bf16 and packing.packing_available():
            bank.pack()
            torch.testing.assert_close(bank(x, experts, weights), segmented, atol=0, rtol=0)


def test_grouped_dispatch_keeps_autograd_for_training():
    bank = Experts(3, 16, 8)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.2)
        bank.down_proj.normal_(0, 0.2)
    x = torch.randn(2, 16)
    bank(x, torch.tensor([[0, 1], [1, 2]]), torch.full((2, 2), 0.5)).sum().backward()
    assert bank.gate_up_proj.grad is not None and bank.gate_up_proj.grad[0].abs().sum() > 0
    assert bank.down_proj.grad[2].abs().sum() > 0


def test_loader_packs_cpu_bf16_unless_told_not_to(tmp_path):
    plain = _bf16_model("A")
    config = plain.config
    make_checkpoint_from_ours(tmp_path, plain.state_dict(), config, layout="baidu", n_shards=2)
    fast = load_pretrained(str(tmp_path), dtype="bfloat16", device="cpu")
    slow = load_pretrained(str(tmp_path), dtype="bfloat16", device="cpu", pack=False)
    assert fast.packed_head is not None and slow.packed_head is None
    inputs = make_inputs("image", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, slow(**inputs).logits, atol=0, rtol=0)
        torch.testing.assert_close(slow(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("onednn,kernel,pays", [(True, True, False), (True, False, True), (False, False, False)])
def test_loader_packs_only_where_the_gemv_kernel_cannot_run(monkeypatch, onednn, kernel, pays):
    monkeypatch.setattr(packing, "packing_available", lambda: onednn)
    monkeypatch.setattr(packing.kernels, "gemv_available", lambda: kernel)
    assert packing.packing_pays() is pays


def test_segmented_dispatch_equals_a_per_token_loop_with_unused_experts():
    """Many slots (the prefill path) over 8 experts of which only 3 are chosen: each token's
    output is the weighted sum of its own experts, whatever order the segments run in."""
    torch.manual_seed(0)
    bank = Experts(8, 32, 16)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.2)
        bank.down_proj.normal_(0, 0.2)
    x = torch.randn(12, 32)
    experts = torch.tensor([[5, 1], [1, 7], [7, 5]]).repeat(4, 1)  # (12, 2): experts 0, 2, 3, 4, 6 unused
    weights = torch.rand(12, 2)
    assert experts.numel() > base.GATHER_MAX_SLOTS
    with torch.no_grad():
        got = bank(x, experts, weights)
        for n in range(12):
            want = sum(weights[n, k] * base._swiglu(bank, x[n:n + 1], int(experts[n, k]))[0] for k in range(2))
            torch.testing.assert_close(got[n], want, atol=1e-6, rtol=1e-5)


def test_segmented_dispatch_keeps_autograd_for_training():
    """The prefill path writes expert outputs into slots in place; gradients still reach exactly
    the chosen experts and the input."""
    torch.manual_seed(0)
    bank = Experts(4, 16, 8)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.2)
        bank.down_proj.normal_(0, 0.2)
    x = torch.randn(10, 16, requires_grad=True)
    experts = torch.tensor([[0, 2]]).repeat(10, 1)  # 20 slots > GATHER_MAX_SLOTS; 1 and 3 unused
    bank(x, experts, torch.full((10, 2), 0.5)).sum().backward()
    used = bank.gate_up_proj.grad.abs().sum(dim=(1, 2))  # (E,)
    assert used[0] > 0 and used[2] > 0 and used[1] == 0 and used[3] == 0
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_without_packing_the_loader_reads_experts_in_place(tmp_path, monkeypatch, dtype, n_shards):
    """No packing: each expert's (gate_up, down) are views of the mapped shards where gate and up
    lie back to back (one shard), copies where they do not (the test helper deals tensors to 2
    shards in turn), and the model computes exactly what the plain model computes."""
    monkeypatch.setattr(packing, "packing_available", lambda: False)
    monkeypatch.setattr(CpuBackend, "packs", lambda self, dtype: False)
    plain = _bf16_model("A") if dtype == "bfloat16" else ErnieVL(our_config("A")).eval()
    if dtype == "float32":
        randomize_(plain, 0)
    make_checkpoint_from_ours(tmp_path, plain.state_dict(), plain.config, layout="baidu", n_shards=n_shards)
    mapped = load_pretrained(str(tmp_path), dtype=dtype, device="cpu")
    banks = [m for m in mapped.modules() if isinstance(m, Experts)]
    assert banks and all(b.bank is not None and not b.bank.packed and b.gate_up_proj is None for b in banks)
    checkpoint = loading.SafetensorsCheckpoint.open(tmp_path)
    gate_up, down = banks[0].bank[1]
    gate_name = "model.layers.1.mlp.experts.1.gate_proj.weight"
    shard = checkpoint._where[gate_name]
    with open(shard.path, "rb") as f:
        f.seek(shard.start + shard.entries[gate_name]["data_offsets"][0])
        raw = f.read(gate_up.numel() * gate_up.element_size())
    in_place = gate_up.untyped_storage().nbytes() == len(raw) and bytes(gate_up.view(torch.uint8).flatten().numpy()) == raw
    assert in_place == (n_shards == 1)  # a view is the file's bytes at the gate's offset, whole
    for k, v in plain.state_dict().items():
        assert torch.equal(mapped.state_dict()[k], v), k
    inputs = make_inputs("image_video", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(mapped(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)
    other = _bf16_model("A", seed=1).to(getattr(torch, dtype))
    for m in other.modules():
        if isinstance(m, moe.Router):
            m.float()
    mapped.load_state_dict(other.state_dict(), strict=True)  # a later load replaces the views
    with torch.no_grad():
        torch.testing.assert_close(mapped(**inputs).logits, other(**inputs).logits, atol=0, rtol=0)


def test_experts_are_stacked_when_their_dtype_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "packing_available", lambda: False)
    monkeypatch.setattr(CpuBackend, "packs", lambda self, dtype: False)
    plain = _bf16_model("A")
    make_checkpoint_from_ours(tmp_path, plain.state_dict(), plain.config, layout="baidu")
    stacked = load_pretrained(str(tmp_path), dtype="float32", device="cpu")
    banks = [m for m in stacked.modules() if isinstance(m, Experts)]
    assert banks and all(b.bank is None and b.gate_up_proj.dtype == torch.float32 for b in banks)
    inputs = make_inputs("text", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(stacked(**inputs).logits.float(), plain.float()(**inputs).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not kernels.ops_available(), reason=f"no fused ops: {kernels.ops_unavailable_reason}")
def test_decode_attention_kernel_generates_what_sdpa_generates(monkeypatch):
    """Model A (head_dim 16) decodes through kernels.attn_decode; with it declined, through SDPA.
    A padded batch, so its masks carry padding; the greedy tokens are the same."""
    model = _bf16_model("A")
    inputs = make_inputs("padded_batch", labels=False)
    config = GenerationConfig(max_new_tokens=8, eos_token_id=())
    calls = []
    real = kernels.attn_decode
    monkeypatch.setattr(kernels, "attn_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_kernel = generate(model, config=config, **inputs)
    assert calls, "the decode steps did not reach the kernel"
    monkeypatch.setattr(kernels, "attn_decode_applies", lambda *a: False)
    assert torch.equal(generate(model, config=config, **inputs), with_kernel)


@pytest.mark.skipif(not kernels.flash_attn_applies(*(torch.zeros(1, 1, 1, 16).bfloat16(),) * 3),
                    reason=f"no flash kernel: {kernels.flash_unavailable_reason}")
def test_flash_prefill_and_vision_attention_stay_as_close_to_fp32_as_sdpa(monkeypatch):
    """Model A (head_dim 16, vision heads of 16) prefills an image+video prompt through
    kernels.flash_attn, and with it declined through SDPA; both bf16 runs are held against the
    fp32 model: the kernel's logits must be no further from it than torch's."""
    model = _bf16_model("A")
    exact = copy.deepcopy(model).float()
    inputs = make_inputs("image_video", labels=False)
    inputs32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    calls = []
    real = kernels.flash_attn
    monkeypatch.setattr(kernels, "flash_attn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = exact(**inputs32).logits
        fast = model(**inputs).logits.float()
        assert len(calls) >= 2, "neither the vision tower nor the prefill reached the kernel"
        monkeypatch.setattr(kernels, "flash_attn_applies", lambda *a: False)
        plain = model(**inputs).logits.float()
    err_fast, err_plain = (fast - ref).abs(), (plain - ref).abs()
    assert float(err_fast.mean()) <= 1.25 * float(err_plain.mean())
    assert float(err_fast.max()) <= 1.25 * float(err_plain.max()) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_follow_up_prefill_into_the_cache_equals_one_prefill(monkeypatch, dtype):
    """A second turn: 24 tokens prefilled into a cache that holds 40 already. Its logits equal
    those of one 64-token prefill (fp32: SDPA with the end-aligned causal mask built per layer;
    bf16: the flash kernel's causal offset where it runs, else the same mask), and in bf16 the
    kernel route agrees with SDPA to bf16 noise."""
    from model.generation.kv_cache import StaticKVCache

    model = _bf16_model("A") if dtype == torch.bfloat16 else ErnieVL(our_config("A")).eval()
    if dtype == torch.float32:
        randomize_(model, 0)
    ids = torch.randint(11, 1000, (1, 64), generator=torch.Generator().manual_seed(3))

    def two_turns():
        cache = StaticKVCache(model.config.text, 1, 80, dtype, torch.device("cpu"))
        with torch.no_grad():
            model(input_ids=ids[:, :40], past_key_values=cache, logits_to_keep=1)
            return model(input_ids=ids[:, 40:], past_key_values=cache,
                         attention_mask=torch.ones(1, 64, dtype=torch.long)).logits.float()

    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, 40:].float()
    split = two_turns()
    if dtype == torch.float32:
        torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-4)
        return
    monkeypatch.setattr(kernels, "flash_attn_applies", lambda *a: False)
    monkeypatch.setattr(kernels, "attn_decode_applies", lambda *a: False)
    plain = two_turns()
    scale = float(whole.abs().max())
    torch.testing.assert_close(split, plain, atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(split, whole, atol=0.05 * scale, rtol=0.05)
