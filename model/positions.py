"""3D RoPE positions (t, h, w) for mixed text / image / video sequences.

Legend: B = batch, T = tokens, m = spatial merge, tm = temporal merge.

* A run of text tokens counts up by one on all three axes.
* An image (mm_token_type 1) of t x h x w patches covers t*(h/m)*(w/m) tokens laid out on a
  grid: token (i, j, k) gets (start + i, start + j, start + k), with t taken as is for images and
  divided by tm for videos (type 2). The sequence then continues at start + max(h, w)/m: the
  position advances by the grid's side, *not* by the token count.
* Image/video start and end markers are ordinary text tokens here (type 0).
* Padding (attention_mask == 0) is skipped: it gets position 0 and does not advance.

Because of that, the cache slot of a token is not its RoPE position. ``rope_deltas`` (B, 1) =
(last position + 1) - (real token count) carries the difference into decoding, where a new
token at slot s (counting real tokens) sits at position s + delta on all three axes.
"""

from __future__ import annotations

import torch

from model.config import ErnieVLConfig
from model.errors import ErnieError


def _runs(types: list[int]) -> list[tuple[int, int]]:
    """[(type, length)] of consecutive equal token types."""
    runs: list[tuple[int, int]] = []
    for t in types:
        if runs and runs[-1][0] == t:
            runs[-1] = (t, runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


def _grid_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    """(3, t*h*w) positions of a vision grid whose corner sits at ``start``."""
    tt = torch.arange(t)[:, None, None].expand(t, h, w)
    hh = torch.arange(h)[None, :, None].expand(t, h, w)
    ww = torch.arange(w)[None, None, :].expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start  # (3, t*h*w)


def _sequence_positions(types: list[int], grids: dict[int, list], config: ErnieVLConfig) -> torch.Tensor:
    """(3, len(types)) positions of one unpadded sequence; consumes grids[1] / grids[2] in order."""
    m, tm = config.vision.spatial_merge_size, config.vision.temporal_merge_size
    parts, pos = [], 0
    for kind, length in _runs(types):
        if kind == 0:
            parts.append(torch.arange(length).expand(3, length) + pos)
            pos += length
            continue
        if not grids.get(kind):
            name = "image" if kind == 1 else "video"
            raise ErnieError(f"the prompt has more {name} token runs than {name}_grid_thw rows",
                             hint="pass one grid row per image/video, in prompt order")
        t, h, w = grids[kind].pop(0)
        t = t if kind == 1 else t // tm
        parts.append(_grid_positions(pos, t, h // m, w // m))
        pos += max(h, w) // m
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def get_rope_index(config: ErnieVLConfig, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, B, T) long and rope_deltas (B, 1) long. See the module docstring.

    Grids are consumed in order across the whole batch (image rows for type-1 runs, video rows
    for type-2 runs), as the processor emits them.
    """
    B, T = input_ids.shape
    types = mm_token_type_ids if mm_token_type_ids is not None else torch.zeros_like(input_ids)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    grids = {1: image_grid_thw.tolist() if image_grid_thw is not None else [],
             2: video_grid_thw.tolist() if video_grid_thw is not None else []}
    position_ids = torch.zeros(3, B, T, dtype=torch.long)
    deltas = []
    for b in range(B):
        row_keep = keep[b].cpu()
        pos = _sequence_positions(types[b].cpu()[row_keep].tolist(), grids, config)  # (3, n_real)
        position_ids[:, b, row_keep] = pos
        n_real = pos.shape[1]
        deltas.append(int(pos.max()) + 1 - n_real if n_real else 0)
    return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def decode_positions(batch: int, past_len: int, num_new: int, rope_deltas: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(3, B, T) positions for tokens appended after a prompt whose 3D layout gave ``rope_deltas``.

    Without padding a token at cache slot s sits at s + delta; with an attention mask covering
    the past and new tokens, real tokens are counted instead of slots.
    """
    if attention_mask is not None:
        counted = attention_mask.long().cumsum(-1) - 1  # (B, L)
        pos = counted[:, past_len:past_len + num_new].clamp(min=0)  # (B, T)
    else:
        pos = torch.arange(past_len, past_len + num_new, device=device).expand(batch, num_new)
    if rope_deltas is not None:
        pos = pos + rope_deltas.to(device).view(-1, 1)
    return pos.unsqueeze(0).expand(3, -1, -1)  # (3, B, T)
