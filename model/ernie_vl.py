"""ErnieVL: the multimodal ERNIE 4.5 VL MoE model (vision tower + resampler + MoE text decoder).

Legend: B = batch, T = new tokens, H = text hidden, V = vocabulary, E = experts per bank.

One forward does, in order: embed tokens; when pixels are given (prefill), encode images and
videos and write their embeddings over the placeholder tokens; compute 3D RoPE positions; run
the decoder (with the KV cache when one is passed); project the last ``logits_to_keep`` states to
the vocabulary; optionally the causal-LM loss and the MoE load-balancing loss.

State-dict names are the "our key" column of docs/ARCHITECTURE.md: ``model.embed_tokens``,
``model.layers.{i}``, ``model.norm``, ``model.resampler_model``, ``vision_model``, and
``lm_head`` only when the embeddings are untied (tied: the logits reuse ``embed_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import build_attention_mask
from model.backends import Backend, select_backend, use_backend
from model.checkpoint.hub import DEFAULT_REPO
from model.checkpoint.loading import load_checkpoint
from model.config import ErnieVLConfig
from model.errors import ErnieError
from model.generation.generate import generate
from model.moe import Experts, Router
from model.positions import decode_positions, get_rope_index
from model.resampler import Resampler
from model.text import RMSNorm, TextDecoder
from model.vision import VisionTransformer, grid_list

IGNORE_INDEX = -100


@dataclass
class ErnieVLOutput:
    logits: torch.Tensor  # (B, T_kept, V)
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: object | None = None
    rope_deltas: torch.Tensor | None = None  # (B, 1)
    router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer, (B*T, E) fp32


class ErnieVL(nn.Module):
    """The whole model. ``forward`` follows docs/ARCHITECTURE.md; see the module docstring."""

    def __init__(self, config: ErnieVLConfig):
        super().__init__()
        self.config = config
        self.model = TextDecoder(config.text)
        # the checkpoint keeps the resampler under "model.", beside the decoder
        self.model.resampler_model = Resampler(config)
        self.vision_model = VisionTransformer(config.vision)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        # output_weight in the backend's own layout (CPU bf16: oneDNN-packed), or None; counted as a buffer
        self.register_buffer("packed_head", None, persistent=False)
        self.backend = select_backend(self.output_weight.device)
        self.quantized_head = None  # a QuantLinear in place of the vocabulary projection (model/quantize.py)
        self.quantization = None  # the QuantSpec of a quantized model
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def from_config(cls, config: ErnieVLConfig, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "ErnieVL":
        """Build the model; ``device="meta"`` allocates nothing (a loader then assigns tensors).

        Routers and their correction biases stay fp32 whatever ``dtype`` is.
        """
        with torch.device(device or "cpu"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
            for m in model.modules():
                if isinstance(m, Router):
                    m.float()
        return model

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str = DEFAULT_REPO, revision: str | None = None,
                        dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                        offline: bool | None = None, pack: bool = True, quantize: str | None = None) -> "ErnieVL":
        """A checkpoint (local directory or Hub repo id) loaded in eval mode; see
        ``model.checkpoint.loading.load_checkpoint`` for dtype, device, offline, pack and quantize
        ("int8" / "int4": weight-only, quantized while loading; a directory written by
        ``ernie quantize`` loads quantized without it)."""
        return load_checkpoint(cls.from_config, path_or_repo_id, revision=revision, dtype=dtype,
                               device=device, offline=offline, pack=pack, quantize=quantize)

    def use_backend(self, backend: Backend) -> "ErnieVL":
        """Run every operation on ``backend`` (the loader calls it with its device's backend)."""
        return use_backend(self, backend)

    def _apply(self, *args, **kwargs):
        """``to`` / ``cuda`` / ``cpu``: a model moved to another device kind takes that device's backend."""
        super()._apply(*args, **kwargs)
        backend = select_backend(self.output_weight.device)
        if backend.device_type != self.backend.device_type:
            self.use_backend(backend)
        return self

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Prompt + new token ids (model/generation/generate.py)."""
        return generate(self, input_ids, attention_mask, **kwargs)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for tests and training from scratch: N(0, std), zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, Experts):
                m.gate_up_proj.normal_(0.0, std)
                m.down_proj.normal_(0.0, std)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, H) projection to the vocabulary: lm_head, or the token embeddings when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """3D positions (3, B, T) and rope_deltas (B, 1); see model/positions.py."""
        return get_rope_index(self.config, input_ids, mm_token_type_ids, image_grid_thw,
                              video_grid_thw, attention_mask)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, mm_token_type_ids=None,
                moe_mm_token_type_ids=None, past_key_values=None, inputs_embeds=None, pixel_values=None,
                pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None, rope_deltas=None,
                cache_position=None, logits_to_keep=0, labels=None, output_router_logits=False) -> ErnieVLOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ErnieError("ErnieVL.forward needs exactly one of input_ids and inputs_embeds")
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ErnieError("a loss needs the logits of every position; pass logits_to_keep=0 with labels")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # (B, T, H)
        inputs_embeds = self._insert_vision(input_ids, inputs_embeds, pixel_values, image_grid_thw,
                                            self.config.image_token_id, "image")
        inputs_embeds = self._insert_vision(input_ids, inputs_embeds, pixel_values_videos, video_grid_thw,
                                            self.config.video_token_id, "video")
        B, T, _ = inputs_embeds.shape
        cache = past_key_values
        past_len = cache.seq_len if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + T, device=inputs_embeds.device)
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = self._token_types(input_ids, with_markers=False)
        if moe_mm_token_type_ids is None and input_ids is not None:
            moe_mm_token_type_ids = self._token_types(input_ids, with_markers=True)
        if position_ids is None:
            position_ids, rope_deltas = self._positions(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                                        attention_mask, rope_deltas, past_len, B, T)
        elif position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # (3, B, T)
        num_slots = max(past_len, int(cache_position.max()) + 1) if cache is not None else T
        if cache_position.ndim == 2:  # every row its own slots (continuous batching): up to the furthest
            num_slots = int(cache_position.max()) + 1
        mask = build_attention_mask(attention_mask, cache_position, num_slots)
        vision_mask = moe_mm_token_type_ids != 0 if moe_mm_token_type_ids is not None else None
        if vision_mask is not None and not bool(vision_mask.any()):
            vision_mask = None  # one check per forward, not one per MoE layer (every decode step)
        # the last layer runs only the positions whose logits are kept (not when its router logits are wanted)
        keep_last = logits_to_keep if isinstance(logits_to_keep, int) and not output_router_logits else 0
        hidden, router_logits = self.model(inputs_embeds, position_ids, mask, vision_mask, cache, cache_position,
                                           keep_last)
        hidden = _keep_last(hidden, logits_to_keep)
        if self.quantized_head is not None:
            logits = self.quantized_head(hidden)  # (B, T_kept, V)
        else:
            logits = self.backend.vocab_logits(hidden, self.output_weight, self.packed_head)  # (B, T_kept, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        aux_loss = None
        if output_router_logits:
            flat_mask = attention_mask if attention_mask is not None and attention_mask.numel() == B * T else None
            aux_loss = load_balancing_loss(router_logits, self.config.text.moe_num_experts,
                                           self.config.text.moe_k, flat_mask)
            if loss is not None:
                loss = loss + self.config.text.router_aux_loss_coef * aux_loss.to(loss.device)
        return ErnieVLOutput(logits=logits, loss=loss, aux_loss=aux_loss, past_key_values=cache,
                             rope_deltas=rope_deltas,
                             router_logits=tuple(router_logits) if output_router_logits else None)

    # --- pieces of forward ------------------------------------------------------------------

    def _insert_vision(self, input_ids, embeds, pixels, grid_thw, token_id: int, kind: str) -> torch.Tensor:
        """Encode images or videos and write their embeddings over the ``token_id`` placeholders."""
        if pixels is None:
            return embeds
        if input_ids is None or grid_thw is None:
            raise ErnieError(f"{kind} pixels need input_ids (to find the placeholders) and {kind}_grid_thw")
        grids = grid_list(grid_thw)
        patches = sum(t * h * w for t, h, w in grids)
        if pixels.shape[0] != patches:
            raise ErnieError(f"{kind}_grid_thw describes {patches} patches but {pixels.shape[0]} pixel rows "
                             f"were given", hint="pass the processor's pixel values and grids together")
        parts = split_items(grids, self.backend.parallel_parts())
        encode = partial(self._encode_vision, pixels, grid_thw, grids)
        vision_embeds = torch.cat(self.backend.map_parts(encode, parts))  # (tokens, H)
        slots = input_ids == token_id  # (B, T)
        n_slots = int(slots.sum())
        if n_slots != vision_embeds.shape[0]:
            raise ErnieError(f"the prompt has {n_slots} {kind} tokens but the {kind}s produce "
                             f"{vision_embeds.shape[0]} embeddings",
                             hint=f"expand each {kind} placeholder to t*h*w/"
                                  f"{4 if kind == 'image' else 8} tokens, as the processor does")
        return embeds.masked_scatter(slots.unsqueeze(-1), vision_embeds.to(embeds.dtype))

    def _encode_vision(self, pixels, grid_thw, grids, part: tuple[int, int, int, int]) -> torch.Tensor:
        """Items i..j of the batch (pixel rows a..b): vision tower then resampler -> (tokens, H).
        Items never see each other (attention stays inside a frame), so parts encode apart."""
        i, j, a, b = part
        features = self.vision_model(pixels[a:b], grid_thw[i:j])  # (b - a, C)
        return self.model.resampler_model(features, grids[i:j])  # (tokens, H)

    def _token_types(self, input_ids: torch.Tensor, with_markers: bool) -> torch.Tensor:
        """Modality per token derived from ids: 0 text, 1 image, 2 video (markers count as vision for the MoE)."""
        c = self.config
        image_ids = [c.image_token_id] + ([c.image_start_token_id, c.image_end_token_id] if with_markers else [])
        video_ids = [c.video_token_id] + ([c.video_start_token_id, c.video_end_token_id] if with_markers else [])
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[torch.isin(input_ids, torch.tensor(image_ids, device=input_ids.device))] = 1
        types[torch.isin(input_ids, torch.tensor(video_ids, device=input_ids.device))] = 2
        return types

    def _positions(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
                   rope_deltas, past_len: int, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill: 3D layout of the prompt (and its rope_deltas). Later: continue after it."""
        if past_len == 0 and input_ids is not None:
            return get_rope_index(self.config, input_ids, mm_token_type_ids, image_grid_thw,
                                  video_grid_thw, attention_mask)
        device = input_ids.device if input_ids is not None else self.output_weight.device
        return decode_positions(B, past_len, T, rope_deltas, attention_mask, device), rope_deltas


load_pretrained = ErnieVL.from_pretrained  # ``from model import load_pretrained``


def split_items(grids: list[tuple[int, int, int]], parts: int) -> list[tuple[int, int, int, int]]:
    """Consecutive items (images or videos) in at most ``parts`` runs of about equal patches:
    [(first item, end item, first pixel row, end pixel row)]; one run when ``parts`` <= 1."""
    sizes = [t * h * w for t, h, w in grids]
    total, runs, start, row, done = sum(sizes), [], 0, 0, 0
    for i, n in enumerate(sizes[:-1]):
        done += n
        target = total * (len(runs) + 1) / parts  # where the next run should end
        if len(runs) < parts - 1 and abs(done - target) <= abs(done + sizes[i + 1] - target):
            runs.append((start, i + 1, row, done))  # cut after item i: the nearer side of the target
            start, row = i + 1, done
    runs.append((start, len(sizes), row, total))
    return runs


def _keep_last(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Keep the last ``logits_to_keep`` positions (0 = all) or the given position indices."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[:, logits_to_keep]
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; position t predicts labels[t + 1]; -100 is ignored."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance loss over all MoE layers: E * sum_e(f_e * P_e).

    f_e: share of top-k choices (on plain softmax, no correction bias) that went to expert e, per
    token row; P_e: mean router probability of e. Rows of all layers are pooled before the
    product; padding rows (attention_mask == 0) are left out.
    """
    if not router_logits:
        return torch.zeros((), dtype=torch.float32)
    logits = torch.cat(router_logits, dim=0).float()  # (L*N, E)
    probs = logits.softmax(dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L*N, K)
    counts = F.one_hot(chosen, num_experts).sum(dim=1).float()  # (L*N, E)
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        weights = attention_mask.reshape(-1, 1).float().to(logits.device).repeat(len(router_logits), 1)
    total = weights.sum()
    f = (counts * weights).sum(dim=0) / total  # (E,)
    p = (probs * weights).sum(dim=0) / total  # (E,)
    return (f * p).sum() * num_experts
