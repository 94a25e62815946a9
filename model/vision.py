"""The vision tower: a ViT over 14x14 patches with 2D RoPE and per-image / per-frame attention.

Legend: N = patches of all images and frames, C = vision hidden, Hd = heads, D = head dim,
P = 3 * patch * patch values per patch.

Input rows are patches as the processor lays them out: image by image (video by video, frame by
frame), and inside a frame in 2x2 merge windows (the four patches of a window are consecutive),
which is what lets the resampler merge them with a reshape. Attention never crosses an image or a
video frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backends import Linear, select_backend
from model.config import VisionConfig
from model.rope import vision_rope


def grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """(M, 3) tensor of (t, h, w) patch grids -> Python ints (one host sync)."""
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]


def patch_positions(grids: list[tuple[int, int, int]], merge: int, device: torch.device) -> torch.Tensor:
    """(row, column) of every patch, (N, 2), in the processor's 2x2-window order, repeated per frame."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)  # (h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)  # (h, w)
        # (h/m, m, w/m, m) -> windows first, then the m x m patches inside a window
        rows = rows.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        cols = cols.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(out, dim=0)


class PatchEmbed(nn.Module):
    """A bias-free linear map of each flattened patch (P values) to C."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = Linear(config.patch_dim, config.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    """Fused qkv projection, 2D RoPE, bidirectional attention inside each frame, output proj."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.backend = select_backend(self.proj.weight.device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[tuple[int, int]]) -> torch.Tensor:
        """x (N, C); segments: (frames, patches per frame) per image/video, in order."""
        N = x.shape[0]
        qkv = self.qkv(x).view(N, 3, self.num_heads, self.head_dim)  # (N, 3, Hd, D)
        q, k = self.backend.rotate_vision(qkv[:, :2], cos, sin).unbind(1)  # 2 x (N, Hd, D)
        v = qkv[:, 2]  # (N, Hd, D)
        outs, start = [], 0
        for frames, length in segments:
            end = start + frames * length
            # frames of one image/video share a length: batch them, (frames, Hd, length, D)
            qs, ks, vs = (t[start:end].view(frames, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            o = self.backend.attention(qs, ks, vs)  # (frames, Hd, length, D), bidirectional
            outs.append(o.transpose(1, 2).reshape(frames * length, -1))  # (frames*length, C)
            start = end
        return self.proj(torch.cat(outs, dim=0))


class VisionMLP(nn.Module):
    """fc2(quick_gelu(fc1(x))); quick_gelu(x) = x * sigmoid(1.702 x)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.quick = config.hidden_act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if not self.quick:
            return self.fc2(F.gelu(h))
        if torch.is_grad_enabled() and h.requires_grad:
            return self.fc2(h * torch.sigmoid(1.702 * h))
        # in place on fresh buffers when nothing will differentiate through them: the same
        # numbers, two (N, 4C) buffers fewer to allocate and fault in
        return self.fc2(h.mul_(torch.mul(h, 1.702).sigmoid_()))


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """patch_embed, blocks, ln: pixel patches (N, P) -> patch features (N, C)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = grid_list(grid_thw)
        segments = [(t, h * w) for t, h, w in grids]
        positions = patch_positions(grids, self.config.spatial_merge_size, pixels.device)  # (N, 2)
        cos, sin = vision_rope(self.config, positions)  # (N, D) each
        x = self.patch_embed(pixels)  # (N, C)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.ln(x)
