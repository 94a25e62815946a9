"""The variable-resolution resampler: vision patch features -> text-width embeddings.

Legend: N = patches, C = vision hidden, m = spatial merge (2), H = text hidden.

1. Spatial merge: every 2x2 window of patches (4 consecutive rows, see model/vision.py) becomes
   one row of 4C, mixed by ``spatial_linear`` (fc1, GELU, fc2, LayerNorm).
2. Temporal merge: frames are paired (0, 1), (2, 3), ... and each pair of rows is concatenated
   to 8C and mixed by ``temporal_linear`` back to 4C. An image has one frame, which is paired
   with itself; a video with an odd frame count drops its last frame here (the processor pads
   videos to an even count, so that does not happen in practice). When every item is an image
   (fp32 weights), fc1 takes the row once with its weight's two input halves summed: the same
   product up to fp32 rounding, at half the cost (``MergeMLP.forward_self_paired``).
3. ``mlp`` projects 4C -> H and ``after_norm`` (RMSNorm) normalises.

An image of t x h x w patches ends as h*w/4 embeddings; a video as (t/2)*h*w/4.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backends import Linear
from model.config import ErnieVLConfig
from model.text import RMSNorm


class MergeMLP(nn.Module):
    """fc1 -> GELU (exact) -> fc2 -> LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(out_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(self.act(self.fc1(x))))

    def can_self_pair(self) -> bool:
        """Whether ``forward_self_paired`` applies: a plain fp32 fc1 (bf16 would round the summed
        halves; a quantized fc1 has no plain weight)."""
        weight = getattr(self.fc1, "weight", None)
        return isinstance(self.fc1, Linear) and weight is not None and weight.dtype == torch.float32

    def forward_self_paired(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(cat([x, x], -1))`` with fc1 on x once: x (n, D) -> (n, D), fc1 (D, 2D).

        x @ [A | B]^T = x @ (A + B)^T, so the (n, 2D) copy and half of fc1's product are saved."""
        D = x.shape[-1]
        weight = self.fc1.weight[:, :D] + self.fc1.weight[:, D:]  # (D, D), summed in fp32
        h = self.fc1.backend.linear(x, weight, self.fc1.bias)
        return self.ln(self.fc2(self.act(h)))


def temporal_pair_index(grids: list[tuple[int, int, int]], merge: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (into spatially merged rows) of the first and second frame of every pair.

    Images (t == 1) pair frame 0 with itself; videos pair (0, 1), (2, 3), ...
    """
    first, second, offset = [], [], 0
    for t, h, w in grids:
        per_frame = h * w // (merge * merge)
        base = torch.arange(per_frame)
        evens = range(0, t, 2)
        odds = range(1, t, 2) if t > 1 else range(0, 1)
        for a, b in zip(evens, odds):
            first.append(base + offset + a * per_frame)
            second.append(base + offset + b * per_frame)
        offset += t * per_frame
    return torch.cat(first).to(device), torch.cat(second).to(device)


class Resampler(nn.Module):
    """spatial_linear, temporal_linear, mlp, after_norm (names as in the checkpoint, minus indices)."""

    def __init__(self, config: ErnieVLConfig):
        super().__init__()
        v = config.vision
        self.merge, self.temporal = v.spatial_merge_size, v.temporal_merge_size
        spatial_dim = v.hidden_size * self.merge ** 2
        self.spatial_linear = MergeMLP(spatial_dim, spatial_dim, v.layer_norm_eps)
        self.temporal_linear = MergeMLP(spatial_dim * self.temporal, spatial_dim, v.layer_norm_eps)
        self.mlp = Linear(spatial_dim, config.text.hidden_size)
        self.after_norm = RMSNorm(config.text.hidden_size, config.text.rms_norm_eps)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """features (N, C) of all images/videos in order -> embeddings (sum of tokens, H)."""
        x = features.reshape(-1, features.shape[-1] * self.merge ** 2)  # (N/m^2, m^2*C): 2x2 windows
        x = self.spatial_linear(x)
        if all(t == 1 for t, _, _ in grids) and self.temporal_linear.can_self_pair():
            x = self.temporal_linear.forward_self_paired(x)  # images only: each row pairs with itself
        else:
            first, second = temporal_pair_index(grids, self.merge, x.device)
            x = torch.cat([x[first], x[second]], dim=-1)  # (pairs*rows, 2*m^2*C)
            x = self.temporal_linear(x)
        return self.after_norm(self.mlp(x))

    def tokens_per_item(self, grids: list[tuple[int, int, int]]) -> list[int]:
        """Embeddings each image/video produces (how many placeholder tokens it fills)."""
        return [max(t // self.temporal, 1) * h * w // self.merge ** 2 for t, h, w in grids]
