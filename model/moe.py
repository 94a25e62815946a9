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

from model.config import TextConfig

# Below this many (token, expert) slots a bank gathers the chosen experts' weights and runs one
# batched matmul (no host sync); above it, slots are sorted by expert and run as segments.
GATHER_MAX_SLOTS = 16


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

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
    """E SwiGLU experts with stacked weights: gate_up_proj (E, 2I, H) gate rows first, down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), experts/weights (N, K) -> weighted sum of the chosen experts' outputs (N, H)."""
        N, K = experts.shape
        slot_x = x.repeat_interleave(K, dim=0)  # (N*K, H): slot n*K + k is token n's k-th choice
        flat = experts.reshape(-1)  # (N*K,)
        if flat.numel() <= GATHER_MAX_SLOTS:
            y = self._gathered(slot_x, flat)
        else:
            y = self._segmented(slot_x, flat)
        y = y.view(N, K, -1) * weights.unsqueeze(-1).to(y.dtype)  # (N, K, H)
        return y.sum(dim=1)

    def _swiglu(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    def _gathered(self, slot_x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Few slots (decode): gather each slot's expert weights and run batched matmuls."""
        gate_up = self.gate_up_proj[flat]  # (S, 2I, H)
        down = self.down_proj[flat]  # (S, H, I)
        h = torch.bmm(gate_up, slot_x.unsqueeze(-1)).squeeze(-1)  # (S, 2I)
        gate, up = h.chunk(2, dim=-1)
        return torch.bmm(down, (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # (S, H)

    def _segmented(self, slot_x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Many slots (prefill): sort slots by expert, one matmul per contiguous segment."""
        order = torch.argsort(flat, stable=True)  # (S,)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()  # one host sync
        sorted_x = slot_x[order]
        out = torch.empty_like(sorted_x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = slice(start, start + n)
                out[seg] = self._swiglu(sorted_x[seg], self.gate_up_proj[e], self.down_proj[e])
                start += n
        y = torch.empty_like(out)
        y[order] = out
        return y


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

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H), vision_mask (B, T) bool -> out (B, T, H), router logits (B*T, E) fp32.

        Router logits of text tokens come from the text router, those of vision tokens from the
        vision router (the load-balancing loss reads them that way).
        """
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
