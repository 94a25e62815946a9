"""Quantized checkpoints: ``save_quantized`` writes one, ``load_quantized`` maps one back in.

A quantized checkpoint is a directory like any other (config.json, safetensors shards with an
index, the tokenizer and processor files), with two differences:
- config.json has a ``quantization`` block (``QuantSpec.to_config``: format, version, bits,
  group_size, zero_point, lm_head, vision);
- the tensors are our own state dict after ``quantize_model``: ``<layer>.qweight`` / ``.scales`` /
  ``.zeros`` for each quantized linear layer, ``<bank>.bank.{gate_up,down}_{qweight,scales,zeros}``
  stacked over experts, ``quantized_head.*`` for the vocabulary projection, and every other tensor
  (embeddings, norms, routers, the vision tower) under its usual name and dtype.
Loading builds the model on the meta device, puts empty quantized modules where the spec says
(``quantize_structure``), checks every tensor's name, dtype and shape against them (a wrong group
size, a missing scale, codes of the wrong width are each named in a one-line CheckpointError),
and assigns views of the memory-mapped files: nothing is copied, the load takes about as long as
mapping the files in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.config import ErnieVLConfig
from model.errors import CheckpointError, ErnieError
from model.quantize import QuantSpec, quantize_structure

SHARD_BYTES = 2 << 30  # largest shard written (the Hub's usual 2-5 GB)
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pdparams")  # not copied beside ours
_SUFFIXES = ("qweight", "scales", "zeros")


def load_quantized(build, root: Path, config: ErnieVLConfig, checkpoint, spec: QuantSpec,
                   float_dtype: torch.dtype | None, device: torch.device):
    """The model of a quantized checkpoint (``checkpoint``: the loader's mapping of its shards),
    assigned from the mapped files (see the module docstring); float tensors in ``float_dtype``
    (None: as stored). The caller finishes the load (maps the pages in)."""
    model = build(config, device="meta")
    quantize_structure(model, spec, has_head=spec.lm_head)
    expected = model.state_dict()
    _check(root, checkpoint, expected, spec)
    state = {}
    for name, want in expected.items():
        t = checkpoint[name]
        if float_dtype is not None and t.is_floating_point() and not _is_quant(name) and t.dtype != torch.float32:
            t = t.to(float_dtype)
        state[name] = t if device.type == "cpu" else t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return model.eval().requires_grad_(False)


def _is_quant(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith(_SUFFIXES)


def _check(root: Path, checkpoint, expected: dict, spec: QuantSpec) -> None:
    where = f"quantized checkpoint {root}"
    hint = "re-run `ernie quantize` on the original checkpoint"
    missing = [n for n in expected if n not in checkpoint]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensors its config.json ({spec.name}, group "
                              f"{spec.group_size}) needs: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                              hint=hint)
    unexpected = [n for n in checkpoint if n not in expected]
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} tensors its config.json ({spec.name}, group "
                              f"{spec.group_size}) does not describe: {', '.join(sorted(unexpected)[:4])}", hint=hint)
    for name, want in expected.items():
        shape, dtype = checkpoint.shape_of(name), checkpoint.dtype_of(name)
        if shape == tuple(want.shape) and (dtype == want.dtype or (not _is_quant(name) and dtype.is_floating_point
                                                                  and want.dtype.is_floating_point)):
            continue
        raise CheckpointError(f"{where}: {name} is {_describe(dtype, shape)} but {_why(name, spec)} wants "
                              f"{_describe(want.dtype, tuple(want.shape))}{_diagnosis(name, shape, dtype, expected, spec)}",
                              hint=hint)


def _describe(dtype: torch.dtype, shape: tuple) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _why(name: str, spec: QuantSpec) -> str:
    return f"config.json ({spec.name}, group size {spec.group_size})" if _is_quant(name) else "the model's config"


def _diagnosis(name: str, shape: tuple, dtype: torch.dtype, expected: dict, spec: QuantSpec) -> str:
    """What the mismatch most likely means, for the two common cases."""
    want = expected[name]
    kind = name.rsplit(".", 1)[-1]
    if kind.endswith(("scales", "zeros")) and len(shape) == want.dim() and shape[:-1] == tuple(want.shape[:-1]) \
            and shape[-1] and want.shape[-1]:
        codes = expected[name[: -len("scales" if kind.endswith("scales") else "zeros")] + "qweight"]
        K = codes.shape[-1] * (2 if spec.bits == 4 else 1)
        return f" (scales for group size {K // shape[-1]}, not {K // want.shape[-1]})"
    if kind.endswith("qweight") and dtype in (torch.int8, torch.uint8) and dtype != want.dtype:
        return f" (codes of {'8' if dtype == torch.int8 else '4'} bits, not {spec.bits})"
    return ""


# --- writing --------------------------------------------------------------------------------------

def save_quantized(model, source: Path, out: Path, force: bool = False) -> Path:
    """Write ``model`` (quantized by ``quantize_model``) as a checkpoint in ``out``, with
    ``source``'s config (plus the quantization block) and its other files (tokenizer, processor,
    generation config, README...). Written into a temporary sibling directory, then renamed, so an
    interrupted run leaves no half checkpoint behind. Returns ``out``."""
    spec = getattr(model, "quantization", None)
    if spec is None:
        raise ErnieError("save_quantized needs a model quantized by quantize_model")
    out = check_outdir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_shards(model.state_dict(), tmp)
        _write_config(source, tmp, spec, model)
        _copy_side_files(source, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_outdir(out: Path, force: bool) -> Path:
    """``out`` when a checkpoint may be written there: absent, empty, or ``force``; else an ErnieError."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ErnieError(f"{out} already exists and is not empty", hint="choose a new directory, or pass --force")
    return out


def _write_shards(state: dict, out: Path) -> None:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.detach().cpu().contiguous()
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_config(source: Path, out: Path, spec: QuantSpec, model) -> None:
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw["quantization"] = spec.to_config()
    float_dtype = str(model.model.norm.weight.dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in raw:
            raw[key] = float_dtype
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(source: Path, out: Path) -> None:
    skip = {"config.json", INDEX}
    for path in sorted(source.iterdir()):
        if path.name in skip or path.name.startswith(".") or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        if path.is_dir():
            shutil.copytree(path, out / path.name)
        else:
            shutil.copy2(path, out / path.name)
