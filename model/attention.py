"""Grouped-query self-attention of the text decoder. The attention product itself is the
backend's ``attention`` (model/backends/base.py: torch's scaled_dot_product_attention; on CPU the
kernels of model/backends/cpu for decode steps and causal prefills).

Legend: B = batch, T = new tokens, S = key slots (cached + new), Hq / Hkv = query / key-value
heads, D = head dim.

The mask is built once per forward by ``build_attention_mask`` and shared by all layers. A
query at cache slot p may see key slot s when s <= p and slot s is not padding. Without padding,
when the new tokens are the last slots (every prefill, decode step and follow-up turn of one
conversation), there is no mask tensor: the backend applies s <= p itself (its kernels directly,
SDPA through its causal flag when T == S or a mask built for the call). Slots are cache indices, not RoPE positions
(those differ after an image; see model/positions.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backends import Linear, select_backend
from model.config import TextConfig
from model.rope import rotate_text


class Attention(nn.Module):
    """q/k/v/o projections, 3D RoPE on q and k, optional KV cache, causal GQA attention."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        H, D, bias = config.hidden_size, config.head_dim, config.use_bias
        self.q_proj = Linear(H, self.n_heads * D, bias=bias)
        self.k_proj = Linear(H, self.n_kv_heads * D, bias=bias)
        self.v_proj = Linear(H, self.n_kv_heads * D, bias=bias)
        self.o_proj = Linear(self.n_heads * D, H, bias=bias)
        self.backend = select_backend(self.o_proj.weight.device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache=None, cache_position: torch.Tensor | None = None,
                keep_last: int = 0) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). mask: bool (B, 1, T, S), or None for causal attention with
        the T new tokens in the last T slots (see ``build_attention_mask``).

        keep_last = n > 0: keys and values of all T tokens (and the cache) as usual, but queries
        and the output only for the last n tokens, (B, n, H) (see ``TextDecoder.forward``).
        """
        B, T, _ = x.shape
        q = self.q_proj(x[:, -keep_last:] if keep_last else x)  # (B, Tq, Hq*D), Tq = n or T
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Tq, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = rotate_text(q, cos[:, -Tq:], sin[:, -Tq:]), rotate_text(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, Hkv, S, D)
        if keep_last and mask is not None:
            mask = mask[:, :, -keep_last:]  # (None stays None: the kept queries are the last ones)
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = self.backend.attention(q, k, v, mask, causal=True)  # (B, Hq, Tq, D); mask None: end-aligned
        out = out.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # (B, Tq, Hq*D)
        return self.o_proj(out)


def causal_rows(positions: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(1, 1, n, S) bool: the query at cache slot p sees slots 0..p (``positions`` (n,) are slots)."""
    slots = torch.arange(num_slots, device=positions.device)
    return (slots[None, :] <= positions[:, None])[None, None]


def build_attention_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor,
                         num_slots: int) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, S) over key slots, or None when plain causal attention aligned to
    the end suffices: no padding, and the T new tokens are the last T slots in order (a prefill
    into an empty cache or none, a decode step, a follow-up turn), so query i sees slots
    0..S-T+i. Attention then builds no mask at all (its kernels take that rule directly).

    attention_mask: (B, L) with 1 for real tokens, 0 for padding, covering slots 0..L-1
    (L <= S; slots beyond L count as real). cache_position: (T,) slot of every new token, or
    (B, T) when every row has slots of its own (continuous batching): always a mask then.
    A padded query row would see nothing at all; it is allowed its own slot so SDPA stays finite.
    """
    if cache_position.ndim == 2:
        return _row_slots_mask(attention_mask, cache_position, num_slots)
    padded = attention_mask is not None and not bool(attention_mask.all())
    T = cache_position.shape[0]
    at_end = torch.equal(cache_position, torch.arange(num_slots - T, num_slots, device=cache_position.device))
    if at_end and not padded:
        return None
    allowed = causal_rows(cache_position, num_slots)  # (1, 1, T, S)
    if padded:
        slots = torch.arange(num_slots, device=cache_position.device)
        keep = attention_mask.bool()
        if keep.shape[1] < num_slots:
            keep = F.pad(keep, (0, num_slots - keep.shape[1]), value=True)
        keep = keep[:, None, None, :num_slots]  # (B, 1, 1, S)
        own = slots[None, :] == cache_position[:, None]  # (T, S)
        allowed = (allowed & keep) | own[None, None]  # (B, 1, T, S)
    return allowed


def _row_slots_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor,
                    num_slots: int) -> torch.Tensor:
    """(B, 1, T, S): the query at slot p of row b sees that row's slots 0..p (cache_position (B, T)),
    less the padding of ``attention_mask`` (B, L) where given."""
    slots = torch.arange(num_slots, device=cache_position.device)
    allowed = slots[None, None, :] <= cache_position[:, :, None]  # (B, T, S)
    if attention_mask is not None:
        keep = F.pad(attention_mask.bool(), (0, max(num_slots - attention_mask.shape[1], 0)), value=True)
        allowed = allowed & keep[:, None, :num_slots]
    return allowed[:, None]  # (B, 1, T, S)
