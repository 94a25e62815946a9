"""A preallocated key/value cache for the text decoder.

Every layer owns two buffers of shape (B, H_kv, max_len, D), allocated once; decoding writes into
them in place and never grows or reallocates them (the compiled-decode path relies on stable
storage).

ERNIE specific: the cache slot is NOT the RoPE position. Slots count tokens: an image of
t x h x w patches occupies t*h*w/4 slots. Its 3D RoPE position, however, advances only by
max(h, w) / merge (the image is laid out on a grid, not a line), so after an image the next text
token sits at a RoPE position well below its slot. Callers therefore pass two different things:
``cache_position`` (slots, here) and ``position_ids`` (RoPE, in the model). Never derive one from
the other except through ``rope_deltas``.

Rows normally share their slots (``cache_position`` (T,)). Continuous batching gives each row
slots of its own instead (``cache_position`` (B, T)): rows that joined at different times hold
sequences of different lengths, each from slot 0.
"""

from __future__ import annotations

import torch

from model.config import TextConfig
from model.errors import ContextLengthError


class StaticKVCache:
    """Per-layer K/V buffers of fixed size. ``update`` writes, ``seq_len`` counts filled slots.

    Legend: B = batch, H = key/value heads, L = max_len (slots), D = head dim, T = new tokens.
    """

    def __init__(self, text_config: TextConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len <= 0 or batch_size <= 0:
            raise ValueError(f"StaticKVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        shape = (batch_size, text_config.num_key_value_heads, max_len, text_config.head_dim)  # (B, H, L, D)
        n = text_config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.max_len = max_len
        self.batch_size = batch_size
        self._filled = [0] * n

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def seq_len(self) -> int:
        """Filled slots (as seen by layer 0, which is updated first in every forward)."""
        return self._filled[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Filled slots of one layer (name kept familiar to readers of the reference)."""
        return self._filled[layer_idx]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at slots ``cache_position`` (T,) and return the filled prefix.

        Returns views (B, H, S, D) of the buffers, S = the number of filled slots after the write
        (the highest written slot + 1, never less than before).
        """
        T = k.shape[2]
        if cache_position.ndim == 2:
            return self._update_rows(layer_idx, k, v, cache_position)
        if cache_position.ndim != 1 or cache_position.numel() != T:
            raise ValueError(f"cache_position must be 1-D with {T} entries (one per new token), "
                             f"got shape {tuple(cache_position.shape)}")
        end = self._end(cache_position) if T else self._filled[layer_idx]
        if end > self.max_len:
            raise ContextLengthError(
                f"the KV cache holds {self.max_len} tokens but slot {end - 1} was requested",
                hint="allocate the cache for prompt length + max_new_tokens")
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        kbuf.index_copy_(2, cache_position, k.to(kbuf.dtype))
        vbuf.index_copy_(2, cache_position, v.to(vbuf.dtype))
        self._filled[layer_idx] = max(self._filled[layer_idx], end)
        S = self._filled[layer_idx]
        return kbuf[:, :, :S], vbuf[:, :, :S]  # (B, H, S, D) views

    def _end(self, cache_position: torch.Tensor) -> int:
        """Highest slot + 1: read from the device once per forward, not once per layer (every layer
        gets the same ``cache_position`` tensor; each read waits for the device to catch up)."""
        if getattr(self, "_end_of", (None,))[0] is not cache_position:
            self._end_of = (cache_position, int(cache_position.max()) + 1)
        return self._end_of[1]

    def _update_rows(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                     cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row slots: write k, v (B, H, T, D) of row b at slots ``cache_position[b]`` (B, T).

        Returns views (B, H, S, D) with S = the highest slot written + 1: each row is expected
        to hold its own tokens at slots 0..cache_position[b, -1] (continuous batching, see
        model/generation/scheduler.py), so nothing beyond S belongs to any row of this step.
        """
        B, _, T, _ = k.shape
        if cache_position.shape != (B, T):
            raise ValueError(f"per-row cache_position must be (batch, new tokens) = {(B, T)}, "
                             f"got {tuple(cache_position.shape)}")
        end = self._end(cache_position)
        if end > self.max_len:
            raise ContextLengthError(
                f"the KV cache holds {self.max_len} tokens but slot {end - 1} was requested",
                hint="allocate the cache for prompt length + max_new_tokens")
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(B, device=kbuf.device)[:, None]  # (B, 1)
        kbuf[rows, :, cache_position] = k.transpose(1, 2).to(kbuf.dtype)  # indexed view (B, T, H, D)
        vbuf[rows, :, cache_position] = v.transpose(1, 2).to(vbuf.dtype)
        self._filled[layer_idx] = max(self._filled[layer_idx], end)
        return kbuf[:, :, :end], vbuf[:, :, :end]  # (B, H, S, D) views

    def first_rows(self, n: int) -> "StaticKVCache":
        """A cache over rows 0..n-1 that shares these buffers (writes through it land here)."""
        if not 0 < n <= self.batch_size:
            raise ValueError(f"first_rows needs 0 < n <= {self.batch_size}, got {n}")
        view = object.__new__(StaticKVCache)
        view.keys, view.values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
        view.max_len, view.batch_size, view._filled = self.max_len, n, list(self._filled)
        return view

    def reset(self) -> None:
        """Forget everything (buffers stay allocated; stale values are masked by seq_len)."""
        for kbuf, vbuf in zip(self.keys, self.values):
            kbuf.zero_()
            vbuf.zero_()
        self._filled = [0] * self.num_layers
