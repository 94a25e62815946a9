"""``CudaBackend``: the operations a CUDA device runs (see model/backends/cuda/__init__.py)."""

from __future__ import annotations

from model.backends.base import Backend


class CudaBackend(Backend):
    """Plain torch on CUDA for now: every operation is ``Backend``'s."""

    name = "cuda"
