"""The decode step on a GPU: static shapes, no host synchronisation, replayed as a CUDA graph.

Legend: B = batch rows, L = cache slots (capacity), H = hidden, Hq / Hkv = query / key-value heads,
G = Hq / Hkv, D = head dim, V = vocabulary.

A ``DecodeRunner`` belongs to one batch size and one cache capacity (a power of two, at least
``MIN_CAPACITY``; model/generation/device_loop.py keeps one per size it met). It owns the KV
cache (a ``StaticKVCache``; the prefill writes into it eagerly) and static inputs:
``tokens`` (B,), ``positions`` (3, B) the RoPE position of each new token, ``slot`` (1,) its cache
slot, ``visible`` (B, L) which slots each row may attend (the prompt's real tokens, then every
slot written since). ``step()`` runs one token for every row into ``logits`` (B, V) fp32:

- the same weights and arithmetic as the eager forward, with fewer launches: RMSNorm with the
  residual add before it, and RoPE with the cache write (model/backends/cuda/ops.py), are one
  kernel each; q, k, v (and gate, up) one product each (``fuse_projections``); the MoE the fused
  Triton kernels (model/backends/cuda/fused_moe.py) with routing in one kernel, text bank only
  (a decode token is always text);
- attention reads the whole static cache under an additive mask built from ``visible`` (one
  shape for every step), the G query heads of a kv head as G query rows;
- nothing reads a device value on the host, so the whole step is captured once as a CUDA graph
  and replayed (``ERNIE_CUDA_GRAPHS=0`` runs it eagerly instead, for debugging).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from model.backends.cuda.moe import modality_moe, swiglu
from model.backends.cuda.ops import add_rms_norm, rope_qkv_to_cache

MIN_CAPACITY = 256


def graphs_enabled() -> bool:
    """CUDA graphs unless ERNIE_CUDA_GRAPHS=0 (read when a runner is made, never inside a step)."""
    return os.environ.get("ERNIE_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


def capacity_for(needed: int) -> int:
    """The cache capacity bucket for ``needed`` slots: the next power of two, at least MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << (max(needed, 1) - 1).bit_length())


@torch.no_grad()
def fuse_projections(model) -> None:
    """Give every attention one (q; k; v) weight and every SwiGLU MLP one (gate; up) weight; the
    separate weights become views of it (no extra memory, the same state dict). Idempotent."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if getattr(attn, "qkv_weight", None) is None and isinstance(attn.q_proj, torch.nn.Linear):  # not quantized
            attn.qkv_weight, attn.qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        mlps = [layer.mlp] if not layer.is_moe else [layer.mlp.shared_experts]
        for mlp in mlps:
            if mlp is not None and getattr(mlp, "gate_up_weight", None) is None \
                    and isinstance(mlp.gate_proj, torch.nn.Linear):
                mlp.gate_up_weight, mlp.gate_up_bias = _fuse(mlp.gate_proj, mlp.up_proj)


def _fuse(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along their outputs and rebind each
    module's parameters to views of the result."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias


class DecodeRunner:
    """Static buffers, the decode step, and its CUDA graph for one (batch, capacity); see the module."""

    def __init__(self, model, cache, rope_tables: tuple[torch.Tensor, torch.Tensor], use_graph: bool = True):
        """cache: an empty ``StaticKVCache`` (B rows, L slots) on the model's device; rope_tables:
        (inv_freq (D/2,) fp32, axis (D/2,) long) of model/rope.py, the frequency and driving axis
        of every (even, odd) pair."""
        fuse_projections(model)
        self.model, self.cache = model, cache
        self.batch, self.capacity = cache.batch_size, cache.max_len
        weight = model.output_weight
        device = weight.device
        B, L = self.batch, self.capacity
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, B, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(B, L, dtype=torch.bool, device=device)
        self.logits = torch.zeros(B, model.config.text.vocab_size, dtype=torch.float32, device=device)
        self._inv_freq, self._axis = (t.to(device) for t in rope_tables)
        self.graph = None
        if use_graph and device.type == "cuda":
            self._capture()

    def start(self, attention_mask: torch.Tensor) -> None:
        """Before a prefill: empty cache, and the prompt's real slots (B, P) as visible."""
        self.cache.reset()
        self.visible.zero_()
        self.visible[:, :attention_mask.shape[1]] = attention_mask.bool()

    def step(self) -> torch.Tensor:
        """One token per row: ``tokens`` at ``positions`` into cache ``slot`` -> ``logits`` (B, V)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.
        The warm-up writes only slot 0 of the cache, which every prefill overwrites."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.current_stream().synchronize()

    @torch.no_grad()
    def _step(self) -> None:
        text = self.model.model
        self.visible.index_fill_(1, self.slot, True)
        # one additive mask for every layer (a boolean one is converted inside each SDPA call)
        dtype = self.model.output_weight.dtype
        mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
        mask = mask.masked_fill_(~self.visible, float("-inf"))[:, None, None, :]  # (B, 1, 1, L)
        cos, sin = self._rope()  # (B, D) each
        x = text.embed_tokens(self.tokens)  # (B, H): the residual stream
        h = None  # the last block's output, added to x by the next norm
        for layer in text.layers:
            x, y = _norm(layer.input_layernorm, x, h)
            x, y = _norm(layer.post_attention_layernorm, x, self._attention(layer.self_attn, y, cos, sin, mask))
            if layer.is_moe:
                h, _ = modality_moe(layer.mlp, y[:, None], None, fused_router=True)
                h = h[:, 0]
            else:
                h = swiglu(layer.mlp, y)
        _, x = _norm(text.norm, x, h)
        head = getattr(self.model, "quantized_head", None)  # int8 / int4 vocabulary projection
        self.logits.copy_(head(x) if head is not None else F.linear(x, self.model.output_weight))  # (B, V) fp32

    def _rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, D) fp32 of ``positions`` (3, B); as model.rope.text_rope, tables on the device."""
        pos = self.positions.t().float()[:, self._axis]  # (B, D/2): each pair's axis
        angles = (pos * self._inv_freq).repeat_interleave(2, dim=-1)  # (B, D)
        return angles.cos(), angles.sin()

    def _attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """x (B, H) -> (B, H): fused qkv, RoPE and the cache write in one kernel, attention over the cache."""
        B, Hq, Hkv, D = x.shape[0], attn.n_heads, attn.n_kv_heads, attn.head_dim
        if getattr(attn, "qkv_weight", None) is not None:
            qkv = F.linear(x, attn.qkv_weight, attn.qkv_bias)  # (B, (Hq + 2 Hkv) D)
        else:  # quantized projections (model/backends/cuda/quant_matmul.py through QuantLinear)
            qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        kbuf, vbuf = self.cache.keys[attn.layer_idx], self.cache.values[attn.layer_idx]  # (B, Hkv, L, D)
        q = rope_qkv_to_cache(qkv, cos, sin, Hq, Hkv, kbuf, vbuf, self.slot)  # (B, Hq, D)
        # the G query heads of one kv head as G query rows: no repeated keys, any SDPA kernel
        q = q.view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
        out = F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=mask)  # (B, Hkv, G, D)
        return attn.o_proj(out.reshape(B, Hq * D))


def _norm(norm, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm of it) in one kernel."""
    return add_rms_norm(x, norm.weight, norm.eps, residual)
