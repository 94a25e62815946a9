"""The embedded ERNIE 4.5 VL MoE model: tensors in, logits out, plus the decode loop."""

from model.config import ErnieVLConfig

__all__ = ["ErnieVL", "ErnieVLConfig", "ErnieVLOutput", "load_pretrained"]


def __getattr__(name: str):
    # Lazy, so `model.errors` / `model.config` stay torch-free for the CLI (`ernie --help`, `ernie info`).
    if name in ("ErnieVL", "ErnieVLOutput", "load_pretrained"):
        from model import ernie_vl

        return getattr(ernie_vl, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
