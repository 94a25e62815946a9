"""Feed-forward blocks of the text decoder: the dense SwiGLU MLP and the modality-isolated MoE.

Legend: N = tokens (flattened batch x time), H = hidden, E = experts per bank, K = experts per
token, I = expert width.

ERNIE 4.5 VL keeps two expert banks with their own widths and routers. Text tokens are routed
only to the text bank and vision tokens only to the vision bank; "vision" means
``moe_mm_token_type_ids != 0``, which covers image/video patch tokens *and* their start/end
markers. The shared experts (one SwiGLU MLP of width ``moe_intermediate_size[0] * shared``)
run on every token and are added to whichever bank handled it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backends import Linear, select_backend
from model.config import TextConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=bias)
        self.up_proj = Linear(hidden, width, bias=bias)
        self.down_proj = Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k softmax router with a selection-only correction bias.

    The router picks the top-k experts on ``softmax(logits) + e_score_correction_bias`` but
    weights them by the *unbiased* probabilities of the chosen experts, renormalised to sum to
    one with a floor of ``moe_norm_min`` on the denominator. All of it runs in fp32 (the
    weight is stored fp32 too): bf16 logits flip near-tied expert choices.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        E, H = config.moe_num_experts, config.hidden_size
        self.top_k, self.norm_min = config.moe_k, config.moe_norm_min
        self.weight = nn.Parameter(torch.empty(E, H, dtype=torch.float32))  # nn.Linear layout
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> logits (N, E) fp32, weights (N, K) in x's dtype, experts (N, K) long."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        _, experts = torch.topk(probs + self.e_score_correction_bias.float(), self.top_k, dim=-1)  # (N, K)
        weights = probs.gather(-1, experts)  # (N, K)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return logits, weights.to(x.dtype), experts


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj (E, 2I, H) gate rows first, down_proj (E, H, I).

    ``bank`` is None, or a bank from the backend's load-time layout (on CPU an ``ExpertBank`` of
    model/backends/cpu/packing.py: one (gate_up, down) pair per expert, oneDNN-packed, or views
    of the memory-mapped checkpoint) answering ``gate_up(x, e)`` and ``down(h, e)``. The stacked
    parameters are then released, and ``state_dict`` rebuilds them from the bank (``dense()``).
    The routed products themselves are the backend's ``experts`` operation.
    """

    def __init__(self, num_experts: int, hidden: int, width: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.bank = None
        self.backend = select_backend(self.gate_up_proj.device)

    def use_bank(self, bank: nn.Module) -> None:
        """Run on ``bank`` from now on and drop the stacked parameters."""
        self.bank = bank
        self.gate_up_proj = self.down_proj = None

    def packable(self) -> bool:
        """bf16 weights not packed yet."""
        if self.bank is None:
            return self.gate_up_proj.dtype == torch.bfloat16
        return not self.bank.packed and self.bank.dtype == torch.bfloat16

    def pack(self) -> None:
        """Lay every expert's weights out for the backend (CPU: oneDNN-packed)."""
        self.backend.pack_experts(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bank is not None and not getattr(self.bank, "quantized", False):  # a quantized bank saves itself
            destination[prefix + "gate_up_proj"], destination[prefix + "down_proj"] = self.bank.dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.bank is not None and not getattr(self.bank, "quantized", False):
            names = (prefix + "gate_up_proj", prefix + "down_proj")
            missing_keys.extend(n for n in names if n not in state_dict)
            if all(n in state_dict for n in names):
                self.bank = self.bank.reloaded(*(state_dict[n] for n in names))
            state_dict = {k: v for k, v in state_dict.items() if k not in names}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), experts/weights (N, K) -> weighted sum of the chosen experts' outputs (N, H)."""
        return self.backend.experts(self, x, experts, weights)

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's fused gate/up projection: x (n, H) -> (n, 2I), gate columns first."""
        if self.bank is not None:
            return self.bank.gate_up(x, e)
        return self.backend.linear(x, self.gate_up_proj[e])

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's down projection: h (n, I) -> (n, H)."""
        if self.bank is not None:
            return self.bank.down(h, e)
        return self.backend.linear(h, self.down_proj[e])


class ModalityMoE(nn.Module):
    """Modality-isolated mixture of experts (see the module docstring) plus shared experts.

    Parameters: text_router / vision_router (Router), text_experts / vision_experts (Experts of
    widths moe_intermediate_size[0] / [1]), shared_experts (MLP) when moe_num_shared_experts > 0.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        E, H = config.moe_num_experts, config.hidden_size
        self.num_experts = E
        self.text_router = Router(config)
        self.vision_router = Router(config)
        self.text_experts = Experts(E, H, config.moe_intermediate_size[0])
        self.vision_experts = Experts(E, H, config.moe_intermediate_size[1])
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:
            self.shared_experts = MLP(H, config.shared_intermediate_size, config.use_bias)
        self.backend = select_backend(self.text_router.weight.device)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H), vision_mask (B, T) bool -> out (B, T, H), router logits (B*T, E) fp32.

        Router logits of text tokens come from the text router, those of vision tokens from the
        vision router (the load-balancing loss reads them that way).
        """
        fused = self.backend.modality_moe(self, x, vision_mask)  # a backend's whole-layer kernel, if any
        if fused is not None:
            return fused
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # (N, H)
        if vision_mask is None or not bool(vision_mask.any()):
            out, logits = self._bank(flat, self.text_router, self.text_experts)
        else:
            is_vision = vision_mask.reshape(-1).bool()  # (N,)
            out = torch.empty_like(flat)
            logits = flat.new_empty(B * T, self.num_experts, dtype=torch.float32)
            text_idx, vision_idx = (~is_vision).nonzero().squeeze(-1), is_vision.nonzero().squeeze(-1)
            for idx, router, bank in ((text_idx, self.text_router, self.text_experts),
                                      (vision_idx, self.vision_router, self.vision_experts)):
                out[idx], logits[idx] = self._bank(flat[idx], router, bank)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, H), logits

    @staticmethod
    def _bank(x: torch.Tensor, router: Router, bank: Experts) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 0:
            return x, x.new_empty(0, router.weight.shape[0], dtype=torch.float32)
        logits, weights, experts = router(x)
        return bank(x, experts, weights), logits
