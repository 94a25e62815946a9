"""Tiny checkpoints on disk, in every layout the loader accepts.

* ``make_reference_checkpoint``: transformers' own ``save_pretrained`` (needs transformers);
* ``make_baidu_checkpoint``: rewrites a checkpoint into Baidu's original form: flat
  config.json, top-level ``vision_model.``, 2+ shards with an index, an ``mtp`` tensor and a
  tied ``lm_head`` copy, as the real repository has them;
* ``make_checkpoint_from_ours``: the same files from our own state dict, without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.checkpoint.weights import config_to_baidu_dict, expected_shapes, to_baidu, to_ours
from model.config import ErnieVLConfig


def random_state(config: ErnieVLConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random state dict in our layout (routers and correction biases fp32, like the model)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        fp32 = "_router." in name
        state[name] = torch.randn(shape, generator=g).to(torch.float32 if fp32 else dtype)
    return state


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int = 1) -> None:
    """``model.safetensors``, or ``n_shards`` files plus ``model.safetensors.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if n_shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::n_shards]}
        save_file(part, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint, eagerly."""
    files = sorted(Path(directory).glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def make_reference_checkpoint(directory: Path, config_dict: dict[str, Any], seed: int = 0,
                              dtype: torch.dtype = torch.float32):
    """Save a random transformers reference model; returns it (in eval mode)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig(**config_dict)).eval()
    _randomize_zero_inits(model, seed)
    model.to(dtype).save_pretrained(directory)
    return model


def _randomize_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """Routers and correction biases start at zero; give them values so a mix-up shows."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name or "e_score_correction_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_baidu_checkpoint(directory: Path, source: Path, n_shards: int = 2) -> None:
    """Rewrite the checkpoint at ``source`` into Baidu's original on-disk form."""
    config = ErnieVLConfig.from_file(Path(source) / "config.json")
    state = to_baidu(to_ours(read_checkpoint(source), config), config)
    _write_baidu_extras(directory, state, config, n_shards)


def make_checkpoint_from_ours(directory: Path, state: dict[str, torch.Tensor] | torch.nn.Module,
                              config: ErnieVLConfig, layout: str = "baidu", n_shards: int = 1,
                              config_json: dict[str, Any] | None = None) -> None:
    """Write our state dict as a checkpoint. ``layout``: "baidu" or "transformers" (re-save)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    baidu = to_baidu(state, config)
    if layout == "transformers":
        baidu = {("model." + k if k.startswith("vision_model.") else k): v for k, v in baidu.items()}
        write_shards(Path(directory), baidu, n_shards)
        raw = config_json or config_to_baidu_dict(config, dtype=next(iter(state.values())).dtype)
        (Path(directory) / "config.json").write_text(json.dumps(raw, indent=2))
    elif layout == "baidu":
        _write_baidu_extras(directory, baidu, config, n_shards, config_json)
    else:
        raise ValueError(f"unknown layout {layout!r}")


def _write_baidu_extras(directory: Path, state: dict[str, torch.Tensor], config: ErnieVLConfig,
                        n_shards: int, config_json: dict[str, Any] | None = None) -> None:
    state = dict(state)
    embed = state["model.embed_tokens.weight"]
    if config.tie_word_embeddings:  # the real repository stores the tied head anyway
        state["lm_head.weight"] = embed.clone()
    state["mtp_block.0.input_layernorm.weight"] = torch.ones(config.text.hidden_size, dtype=embed.dtype)
    write_shards(Path(directory), state, n_shards)
    raw = config_json or config_to_baidu_dict(config, dtype=embed.dtype)
    (Path(directory) / "config.json").write_text(json.dumps(raw, indent=2))


# --- goldens ----------------------------------------------------------------------------------

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "goldens" / "weights"


def reference_layout(config_dict: dict[str, Any]) -> dict[str, list[int]]:
    """Tensor name -> shape of what transformers' save_pretrained writes for this config."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        make_reference_checkpoint(Path(d), config_dict)
        return {k: list(v.shape) for k, v in sorted(read_checkpoint(Path(d)).items())}


def write_goldens() -> None:
    """Regenerate tests/goldens/weights/reference_layout_{A,B}.json.

    Command: ``.venv/bin/python -m tests.helpers.checkpoints`` (needs transformers 5.23).
    """
    import transformers

    from tests.tiny_configs import CONFIGS

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, config_dict in CONFIGS.items():
        source = (f"transformers {transformers.__version__} Ernie4_5_VLMoeForConditionalGeneration"
                  f"(Ernie4_5_VLMoeConfig(**tests.tiny_configs.CONFIG_{name})).save_pretrained, "
                  f"torch {torch.__version__}; made by `python -m tests.helpers.checkpoints`")
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in reference_layout(config_dict).items())
        text = f'{{\n "source": {json.dumps(source)},\n "tensors": {{\n{rows}\n }}\n}}\n'
        (GOLDEN_DIR / f"reference_layout_{name}.json").write_text(text)


if __name__ == "__main__":
    write_goldens()
