"""Rotary position embeddings: 3D (t, h, w) RoPE for the text decoder, 2D (h, w) for the vision tower.

Text (ERNIE 4.5 VL "mrope"): a head of D dims rotates D/2 (even, odd) pairs; pair j turns at the
ordinary frequency ``theta ** (-2j / D)``. What is special is *which position* drives each pair:
with ``mrope_section = (s_h, s_w, s_t)`` the first ``s_h + s_w`` pairs alternate between the
height position (even j) and the width position (odd j), and the last ``s_t`` pairs follow the
time position. When t == h == w (every text token) this is exactly ordinary interleaved RoPE.

Vision: a head of D dims is rotated "half-wise" (dim i paired with dim i + D/2). The first D/4
frequencies follow the patch row, the next D/4 the patch column, each with frequencies
``theta ** (-4i / D)``.

Tables are computed in fp32 (positions up to ~1e5 times small frequencies lose whole radians
in bf16) and are not buffers, so a model built on the meta device needs no re-initialisation.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from model.backends.base import rotate_half, rotate_vision_torch  # noqa: F401 (rotate_half re-exported)
from model.config import ConfigError, TextConfig, VisionConfig

AXIS_T, AXIS_H, AXIS_W = 0, 1, 2


@lru_cache(maxsize=16)
def _text_tables(theta: float, head_dim: int, section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq [D/2] fp32, axis [D/2] long): frequency and driving axis of every (even, odd) pair."""
    s_h, s_w, s_t = section
    if s_h != s_w or s_h + s_w + s_t != head_dim // 2:
        raise ConfigError(f"mrope_section {list(section)} must be (n, n, m) with 2n + m = head_dim/2 "
                          f"= {head_dim // 2}", hint="check rope_parameters.mrope_section in config.json")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    pair = torch.arange(head_dim // 2)
    axis = torch.where(pair % 2 == 0, AXIS_H, AXIS_W)
    axis[s_h + s_w:] = AXIS_T
    return inv_freq, axis


def text_rope_tables(config: TextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq [D/2] fp32, axis [D/2] long) of ``config``: what ``text_rope`` computes angles from."""
    return _text_tables(float(config.rope_theta), config.head_dim, tuple(config.mrope_section))


def text_rope(config: TextConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, D) fp32 for 3D positions (3, B, T) ordered (t, h, w).

    Each value is repeated twice so that it lines up with the (even, odd) pair it rotates.
    """
    inv_freq, axis = _text_tables(float(config.rope_theta), config.head_dim, tuple(config.mrope_section))
    inv_freq, axis = inv_freq.to(position_ids.device), axis.to(position_ids.device)
    # pick, for every pair j, the position of its axis: (B, T, D/2)
    pos = position_ids.permute(1, 2, 0).float()  # (B, T, 3)
    pos = pos[..., axis]  # (B, T, D/2)
    angles = pos * inv_freq  # (B, T, D/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (B, T, D)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of every (even, odd) pair."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_text_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) with cos/sin (B, T, D); math in fp32."""
    return rotate_text(q, cos, sin), rotate_text(k, cos, sin)


def rotate_text(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) with cos/sin (B, T, D) of its own T positions; math in fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return (x.float() * cos + rotate_pairs(x).float() * sin).to(x.dtype)


@lru_cache(maxsize=8)
def _vision_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    quarter = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))  # (D/4,)


def vision_rope(config: VisionConfig, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, D) fp32 for patch positions (N, 2) = (row, column)."""
    inv_freq = _vision_inv_freq(float(config.rope_theta), config.head_dim).to(hw_positions.device)
    angles = hw_positions.float()[..., None] * inv_freq  # (N, 2, D/4)
    angles = angles.flatten(1)  # (N, D/2): rows' angles then columns'
    angles = torch.cat([angles, angles], dim=-1)  # (N, D)
    return angles.cos(), angles.sin()


def apply_vision_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (N, H, D) with cos/sin (N, D); math in fp32."""
    return rotate_vision(q, cos, sin), rotate_vision(k, cos, sin)


def rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, ..., D) with cos/sin (N, D), e.g. q and k together as (N, 2, H, D): one pass
    over both instead of one each. Math in fp32, the result in x's dtype (``rotate_half`` and
    ``rotate_vision_torch`` live in model/backends/base.py). The vision tower calls its backend's
    ``rotate_vision`` instead: the same numbers, through a compiled pass for bf16 on CPU."""
    return rotate_vision_torch(x, cos, sin)
