"""Fail before loading when the chosen device cannot hold the weights, with the numbers and the flags that help."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ernie_cli.modelinfo import DTYPE_BYTES, human_bytes, kv_cache_bytes, quantization_of, quantized_weight_bytes, weight_bytes
from ernie_cli.settings import LoadOptions
from model.config import ErnieVLConfig
from model.env import env_flag
from model.errors import ErnieError

HEADROOM = 1.10  # activations, allocator slack, the processor
KV_TOKENS = 8192


class OutOfMemoryError(ErnieError):
    """The chosen device has less free memory than the model needs."""


def checkpoint_dtype(config_path: Path) -> str:
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    name = str(raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype") or "bfloat16")
    return name if name in DTYPE_BYTES else "bfloat16"


def chosen_device(device: str) -> str:
    """The device a load will use; an ErnieError with a hint when the one asked for is not there (no CUDA...)."""
    if device == "cpu":
        return device  # no torch import: a hopeless CPU load fails in a second
    from model.checkpoint.loading import resolve_device

    return str(resolve_device(device))


def free_bytes(device: str) -> int | None:
    """Free memory on a device, or None when it cannot be measured."""
    if os.environ.get("ERNIE_FREE_MEMORY_BYTES"):  # lets tests and odd systems state the number
        return int(os.environ["ERNIE_FREE_MEMORY_BYTES"])
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except RuntimeError:  # a driver that cannot say: let the load find out
            return None
    if device == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def needed_bytes(cfg: ErnieVLConfig, dtype: str, bits: int | None = None, group: int | None = None) -> int:
    """Weights (quantized to ``bits`` when given) + a KV cache of KV_TOKENS, with headroom."""
    weights = weight_bytes(cfg, dtype) if bits is None else quantized_weight_bytes(cfg, bits, group, dtype)
    return int((weights + kv_cache_bytes(cfg, KV_TOKENS, dtype)) * HEADROOM)


def quantize_bits(name: str | None) -> int | None:
    return None if not name or name in ("none", "bf16") else int(str(name).removeprefix("int"))


def check_memory(root: Path, options: LoadOptions) -> None:
    """Compare the need (from root/config.json) with the free memory of the chosen device."""
    config_path = root / "config.json"
    if not config_path.is_file() or env_flag("ERNIE_SKIP_MEMORY_CHECK"):
        return
    cfg = ErnieVLConfig.from_file(config_path)
    dtype = options.dtype if options.dtype != "auto" else checkpoint_dtype(config_path)
    stored = quantization_of(json.loads(config_path.read_text(encoding="utf-8")))
    bits, group = (stored["bits"], stored.get("group_size")) if stored else (quantize_bits(options.quantize), None)
    device = chosen_device(options.device)
    need, free = needed_bytes(cfg, dtype, bits, group), free_bytes(device)
    if free is None or need <= free:
        return
    smaller = [d for d in ("bfloat16", "float16") if DTYPE_BYTES[d] < DTYPE_BYTES[dtype]]
    hints = [f"--dtype {smaller[0]} needs {human_bytes(needed_bytes(cfg, smaller[0], bits, group))}"] if smaller else []
    if not stored:
        hints += [f"--quantize int{b} needs {human_bytes(needed_bytes(cfg, dtype, b))}" for b in (8, 4)
                  if bits is None or b < bits]
    hints += ["--device cpu to use system memory"] if device != "cpu" else ["--device cuda if you have a GPU"]
    raise OutOfMemoryError(
        f"not enough memory on {device}: the model needs about {human_bytes(need)} in "
        f"{f'int{bits}' if bits else dtype}, "
        f"{human_bytes(free)} is free", hint="; ".join(hints + ["or set ERNIE_SKIP_MEMORY_CHECK=1 to try anyway"]))
