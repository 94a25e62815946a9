"""The modality-isolated MoE on a GPU: both banks through the fused kernel, no host-side splitting.

Legend: N = tokens, H = hidden, E = experts per bank, K = experts per token.

Text tokens go only to the text bank and vision tokens (image/video patches and their start/end
markers) only to the vision bank; the shared experts run on every token. On the CPU that split
is done on the host (index lists per modality). Here every token is routed by both routers (an
(N, H) x (H, E) product each, a few microseconds), the chosen experts of the other modality's
tokens are set to -1, which the kernel skips, and each bank's output is kept where the token
belongs: shapes depend on N alone, and nothing waits for the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.backends.cuda.fused_moe import fused_experts, route
from model.backends.cuda.quant_matmul import quant_bank_product


def modality_moe(moe, x: torch.Tensor, vision_mask: torch.Tensor | None,
                 fused_router: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``ModalityMoE.forward`` on a GPU: x (B, T, H), vision_mask (B, T) bool or None (all text)
    -> out (B, T, H), router logits (B*T, E) fp32 (each token's own modality's router).

    fused_router (the decode step): the text router's softmax, top-k and renormalisation in one
    kernel (``route``) instead of ten (the same arithmetic; its own rounding of the softmax)."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)  # (N, H)
    if fused_router and vision_mask is None:
        router = moe.text_router
        logits = F.linear(flat.float(), router.weight.float())  # (N, E) fp32
        weights, experts = route(logits, router.e_score_correction_bias, router.top_k, router.norm_min, x.dtype)
    else:
        logits, weights, experts = moe.text_router(flat)  # (N, E), (N, K), (N, K)
    if vision_mask is None:
        out = bank_product(moe.text_experts, flat, experts, weights)
    else:
        is_vision = vision_mask.reshape(-1, 1).bool()  # (N, 1)
        v_logits, v_weights, v_experts = moe.vision_router(flat)
        text_out = bank_product(moe.text_experts, flat, experts.masked_fill(is_vision, -1), weights)
        vision_out = bank_product(moe.vision_experts, flat, v_experts.masked_fill(~is_vision, -1), v_weights)
        out = torch.where(is_vision, vision_out, text_out)  # (N, H)
        logits = torch.where(is_vision, v_logits, logits)
    if moe.shared_experts is not None:
        out = out + swiglu(moe.shared_experts, flat)
    return out.view(B, T, H), logits


def bank_product(bank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One ``Experts`` bank on x (N, H) for the chosen experts (N, K) (-1: none) -> (N, H)."""
    if getattr(bank.bank, "quantized", False):  # int8 / int4 weights (model/quantize.py)
        return quant_bank_product(bank.bank, x, experts, weights)
    if bank.gate_up_proj is None:
        raise RuntimeError("the fused MoE needs the stacked expert weights (a CPU-packed bank was moved "
                           "to the GPU); load the model with device='cuda'")
    return fused_experts(x, experts, weights, bank.gate_up_proj, bank.down_proj)


def swiglu(mlp, x: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU ``MLP`` through its fused (gate; up) weight when it has one
    (model/backends/cuda/decode.py ``fuse_projections``): one product instead of two."""
    weight = getattr(mlp, "gate_up_weight", None)
    if weight is None:
        return mlp(x)
    gate, up = F.linear(x, weight, mlp.gate_up_bias).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)
