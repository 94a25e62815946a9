"""Conversation -> model inputs, and token ids -> text events."""

__all__ = ["ErnieVLProcessor", "ModelInputs"]


def __getattr__(name: str):
    # Lazy, like `model.ErnieVL`: `processing.events` & co. stay light for the CLI (`ernie --help`).
    if name in __all__:
        from processing import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'processing' has no attribute {name!r}")
