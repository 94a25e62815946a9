"""Where the architecture's operations run: one backend per device kind, picked once.

``select_backend(device)`` gives the backend of a device kind (one instance per kind): the CPU's
(``model/backends/cpu``: compiled kernels, oneDNN packing, bf16 routes), CUDA's
(``model/backends/cuda``), or the plain torch ``Backend`` of ``model/backends/base.py`` for any
other device (MPS, meta). A module that runs operations keeps the backend of the device its
weights were built on in ``self.backend``; the loader calls ``use_backend(model, backend)`` for
the device it loads onto, and ``ErnieVL`` picks again when it is moved to another device.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from model.backends.base import Backend

__all__ = ["Backend", "Linear", "select_backend", "use_backend"]


def select_backend(device: torch.device | str | None = None) -> Backend:
    """The backend for ``device`` (None: torch's default device, e.g. inside ``with torch.device(...)``)."""
    if device is None:
        device = torch.get_default_device()
    return _backend_for(torch.device(device).type)


@lru_cache(maxsize=None)
def _backend_for(kind: str) -> Backend:
    if kind == "cpu":
        from model.backends.cpu.backend import CpuBackend
        return CpuBackend(kind)
    if kind == "cuda":
        from model.backends.cuda.backend import CudaBackend
        return CudaBackend(kind)
    return Backend(kind)


def use_backend(module: nn.Module, backend: Backend) -> nn.Module:
    """Point every submodule that keeps a backend (a ``backend`` attribute) at ``backend``."""
    for m in module.modules():
        if isinstance(getattr(m, "backend", None), Backend):
            m.backend = backend
    return module


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose product is its backend's ``linear``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = select_backend(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias)
