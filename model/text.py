"""The text decoder: token embeddings, pre-norm decoder layers (dense or MoE), final RMSNorm.

Legend: B = batch, T = new tokens, H = hidden.

Layer i uses the modality-isolated MoE when ``config.is_moe_layer(i)`` and a dense SwiGLU MLP
otherwise (layer 0 of the released checkpoints is dense).
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention
from model.config import TextConfig
from model.moe import MLP, ModalityMoE
from model.rope import text_rope


class RMSNorm(nn.Module):
    """x / rms(x) * weight; statistics in fp32 (a bf16 mean of squares over 2560 dims drifts)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); the MLP is dense or MoE."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = Attention(config, layer_idx)
        if self.is_moe:
            self.mlp = ModalityMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.use_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                vision_mask: torch.Tensor | None = None, cache=None,
                cache_position: torch.Tensor | None = None, keep_last: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, H) -> (B, T, H), router logits (B*T, E) or None for a dense layer.

        keep_last = n > 0: the cache gets every token's keys and values, the output only the last
        n tokens, (B, n, H), and the MLP / experts run on those alone."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position, keep_last)
        if keep_last:
            x = x[:, -keep_last:]
            vision_mask = None if vision_mask is None else vision_mask[:, -keep_last:]  # the MoE checks .any()
        x = x + attn
        h = self.post_attention_layernorm(x)
        router_logits = None
        if self.is_moe:
            h, router_logits = self.mlp(h, vision_mask)
        else:
            h = self.mlp(h)
        return x + h, router_logits


class TextDecoder(nn.Module):
    """embed_tokens, layers, norm. Takes embeddings (vision features already scattered in)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        # an explicit (uninitialised) weight skips Embedding's own normal_ init: on the meta device
        # that init would import torch's decompositions (~1 s); ErnieVL.init_weights fills it
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                vision_mask: torch.Tensor | None = None, cache=None,
                cache_position: torch.Tensor | None = None, keep_last: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """inputs_embeds (B, T, H), position_ids (3, B, T) -> normed hidden (B, T, H), router logits per MoE layer.

        keep_last = n (0 < n < T): only the last n positions' hidden states are wanted (a prefill
        wants the last one). Every layer still writes all T tokens' keys and values to the cache,
        but nothing reads the other positions' output of the *last* layer, so its queries,
        attention output, MLP or experts run on n rows: the hidden returned is (B, n, H). At 4
        layers that is a quarter of a prefill's matmuls; at the released 28, 1/28.
        """
        cos, sin = text_rope(self.config, position_ids)  # (B, T, D) each
        x = inputs_embeds
        keep_last = keep_last if 0 < keep_last < x.shape[1] else 0
        all_router_logits = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, router_logits = layer(x, cos, sin, mask, vision_mask, cache, cache_position,
                                     keep_last if i == last else 0)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        return self.norm(x), all_router_logits
