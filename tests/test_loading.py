"""from_pretrained on tiny checkpoints in every layout, dtype handling, mmap, and every error.

Checkpoints are written from our own random state dicts (no transformers needed); the
reference tests additionally save transformers' model, load it in both layouts and compare
logits. A golden of transformers' saved tensor names keeps the layout check without it.
"""

import json
from pathlib import Path

import pytest
import torch

from model import load_pretrained
from model.checkpoint.loading import SafetensorsCheckpoint
from model.checkpoint.weights import to_baidu
from model.config import ErnieVLConfig
from model.ernie_vl import ErnieVL
from model.errors import CheckpointError, ErnieError
from tests.helpers.checkpoints import (GOLDEN_DIR, make_baidu_checkpoint, make_checkpoint_from_ours,
                                       make_reference_checkpoint, random_state, read_checkpoint, write_shards)
from tests.tiny_configs import CONFIG_A, CONFIG_B

CFGS = {"A": ErnieVLConfig.from_dict(CONFIG_A), "B": ErnieVLConfig.from_dict(CONFIG_B)}


def _load(path, **kw) -> ErnieVL:
    return load_pretrained(str(path), device="cpu", **kw)


def _same_state(model: torch.nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, x in state.items():
        assert got[k].dtype == x.dtype and torch.equal(got[k], x), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A: tied, Baidu layout in 3 shards; B: untied, transformers layout in one file."""
    out = {}
    for name, layout, shards in (("A", "baidu", 3), ("B", "transformers", 1)):
        d = tmp_path_factory.mktemp(f"ckpt{name}")
        state = random_state(CFGS[name], seed=7)
        make_checkpoint_from_ours(d, state, CFGS[name], layout=layout, n_shards=shards)
        out[name] = (d, state)
    return out


@pytest.mark.parametrize("name", ["A", "B"])
def test_loads_exactly_the_saved_state(saved, name):
    d, state = saved[name]
    model = _load(d)
    _same_state(model, state)
    assert not model.training and not any(p.is_meta for p in model.parameters())
    assert (model.lm_head is None) == (name == "A")  # A tied, B untied
    assert ErnieVL.from_pretrained(str(d), device="cpu").config == CFGS[name]


def test_baidu_checkpoint_is_really_sharded_with_extras(saved):
    d, _ = saved["A"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert "lm_head.weight" in index["weight_map"] and "mtp_block.0.input_layernorm.weight" in index["weight_map"]
    assert "vision_model.ln.weight" in index["weight_map"]
    assert "moe_num_experts" in json.loads((d / "config.json").read_text())  # flat config


def test_cpu_load_in_checkpoint_dtype_is_a_view_of_the_mapping(saved):
    d, _ = saved["B"]
    ckpt = SafetensorsCheckpoint.open(d)
    model = _load(d)
    a, b = "model.embed_tokens.weight", "model.norm.weight"
    shard = ckpt._where[a]
    offset = lambda k: shard.entries[k]["data_offsets"][0]  # noqa: E731
    sd = model.state_dict()
    assert sd[b].data_ptr() - sd[a].data_ptr() == offset(b) - offset(a)  # same buffer, no copy


def test_bf16_checkpoint_auto_dtype_keeps_bf16_and_fp32_routers(tmp_path):
    cfg = CFGS["A"]
    state = random_state(cfg, seed=3, dtype=torch.bfloat16)
    make_checkpoint_from_ours(tmp_path, state, cfg, layout="baidu", n_shards=2)
    model = _load(tmp_path)
    for k, x in model.state_dict().items():
        assert x.dtype == (torch.float32 if "_router." in k else torch.bfloat16), k
    _same_state(model, state)


def test_auto_dtype_without_config_dtype_follows_tensors(tmp_path):
    cfg = CFGS["B"]
    make_checkpoint_from_ours(tmp_path, random_state(cfg, dtype=torch.float16), cfg, layout="transformers")
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert _load(tmp_path).model.embed_tokens.weight.dtype == torch.float16


def test_explicit_dtype_converts_without_touching_routers(saved):
    d, state = saved["A"]
    model = _load(d, dtype="bfloat16")
    sd = model.state_dict()
    k = "model.layers.1.mlp.text_experts.gate_up_proj"
    assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], state[k].bfloat16())
    assert sd["model.layers.1.mlp.vision_router.weight"].dtype == torch.float32
    assert torch.equal(sd["model.layers.1.mlp.vision_router.weight"], state["model.layers.1.mlp.vision_router.weight"])
    with pytest.raises(ErnieError, match="unknown dtype 'int4'"):
        _load(d, dtype="int4")


# --- errors ------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    cfg = CFGS["A"]
    make_checkpoint_from_ours(tmp_path, random_state(cfg), cfg, layout="baidu", n_shards=2)
    return tmp_path


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json at"):
        _load(ckpt)


def test_bad_json_config(ckpt):
    (ckpt / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        _load(ckpt)


def test_config_of_another_model(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="describes a 'qwen2_vl' model, expected ERNIE 4.5 VL"):
        _load(ckpt)


def test_missing_shard(ckpt):
    gone = _shards(ckpt)[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"1 of 2 shards listed in model.safetensors.index.json are missing: "
                                              f"{gone.name}") as e:
        _load(ckpt)
    assert "download it again" in e.value.hint


def test_truncated_shard(ckpt):
    shard = _shards(ckpt)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is not a valid safetensors file: tensor .* ends at "
                                              r"byte \d+ but the file has \d+ data bytes \(truncated\)"):
        _load(ckpt)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="header size field -1 does not fit"):
        _load(ckpt)


def test_corrupt_header(ckpt):
    shard = _shards(ckpt)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable header"):
        _load(ckpt)
    data[:8] = (10 ** 12).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"header size field {10 ** 12} does not fit the file size"):
        _load(ckpt)


def test_header_with_inconsistent_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"tensor w has offsets \[0, 12\) for shape \[4\] F32"):
        SafetensorsCheckpoint.open(tmp_path)


def test_tensor_mismatches_in_one_error(tmp_path):
    cfg = CFGS["B"]
    state = to_baidu(random_state(cfg), cfg)
    del state["lm_head.weight"]  # untied: required
    state["model.layers.3.mlp.gate.weight"] = torch.zeros(6, 48)  # transposed by mistake
    state["vision_model.extra.weight"] = torch.zeros(2)
    write_shards(tmp_path, state)
    from model.checkpoint.weights import config_to_baidu_dict
    (tmp_path / "config.json").write_text(json.dumps(config_to_baidu_dict(cfg)))
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "1 missing (lm_head.weight)" in msg and "1 unexpected (vision_model.extra.weight)" in msg
    assert "model.layers.3.mlp.gate.weight (expected [48, 6], found [6, 48])" in msg


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_A))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds only pickle weights \(pytorch_model.bin\); ernie reads "
                                              "safetensors only"):
        _load(tmp_path)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_A))
    with pytest.raises(CheckpointError, match="has no weights; expected model.safetensors or "
                                              "model.safetensors.index.json"):
        _load(tmp_path)


# --- parity with the reference ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["A", "B"])
def test_our_writer_matches_the_reference_layout_golden(tmp_path, name):
    golden = json.loads((GOLDEN_DIR / f"reference_layout_{name}.json").read_text())["tensors"]
    cfg = CFGS[name]
    make_checkpoint_from_ours(tmp_path, random_state(cfg), cfg, layout="transformers")
    written = {k: list(v.shape) for k, v in read_checkpoint(tmp_path).items()}
    assert written == golden


@pytest.mark.reference
@pytest.mark.parametrize("name", ["A", "B"])
def test_reference_checkpoint_in_both_layouts_gives_reference_logits(tmp_path, name):
    pytest.importorskip("transformers")
    config_dict = {"A": CONFIG_A, "B": CONFIG_B}[name]
    ref = make_reference_checkpoint(tmp_path / "ref", config_dict, seed=11)
    make_baidu_checkpoint(tmp_path / "baidu", tmp_path / "ref", n_shards=2)
    ours_ref, ours_baidu = _load(tmp_path / "ref"), _load(tmp_path / "baidu")
    _same_state(ours_baidu, ours_ref.state_dict())
    ids = torch.tensor([[1, 17, 300, 42, 999, 15, 2, 64]])  # no image/video token ids
    vision = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0]])  # route some tokens to the vision bank
    with torch.no_grad():
        for moe_types in (None, vision):
            expected = ref(input_ids=ids, moe_mm_token_type_ids=moe_types).logits
            for model in (ours_ref, ours_baidu):
                got = model(input_ids=ids, moe_mm_token_type_ids=moe_types).logits
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    router = ref.model.language_model.layers[1 if name == "A" else 0].mlp.vision_moe.gate.weight
    layer = 1 if name == "A" else 0
    assert torch.equal(ours_ref.state_dict()[f"model.layers.{layer}.mlp.vision_router.weight"], router)
