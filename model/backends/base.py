"""What every backend offers, and its plain torch implementation (the reference the others match).

Stage one of the backend interface: the torch forms of the operations the CPU kernels replace,
kept here so that the kernels can check themselves against them without importing the
architecture (``model/rope.py`` re-exports them).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on the two halves of the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotate_vision_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate_vision`` in torch ops: x*cos + rotate_half(x)*sin in fp32, as x's dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)  # (N, 1, ..., D)
    x32 = x.float()
    return (x32 * cos.view(shape)).add_(rotate_half(x32).mul_(sin.view(shape))).to(x.dtype)
