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

from model.backends.cpu.linear import Linear, linear
from model.backends.cpu.packing import ExpertBank
from model.config import TextConfig

# Up to this many (token, expert) slots (decode) a bank runs each chosen expert on views of its
# weights, grouped on the host; above it (prefill), slots are sorted by expert into segments. No
# path gathers (copies) expert weights: at batch 1 that would double the bytes read per token.
GATHER_MAX_SLOTS = 16


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

    ``bank`` is None, or an ``ExpertBank`` (model/backends/cpu/packing.py) holding one (gate_up, down) pair per
    expert: pre-packed after ``pack()`` (CPU bf16 inference), or views of the memory-mapped
    checkpoint from the loader. The stacked parameters are then released, and ``state_dict``
    rebuilds them from the bank.
    """

    def __init__(self, num_experts: int, hidden: int, width: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.bank = None

    def use_bank(self, bank: ExpertBank) -> None:
        """Run on ``bank`` from now on and drop the stacked parameters."""
        self.bank = bank
        self.gate_up_proj = self.down_proj = None

    def packable(self) -> bool:
        """bf16 weights not packed yet."""
        if self.bank is None:
            return self.gate_up_proj.dtype == torch.bfloat16
        return not self.bank.packed and self.bank.dtype == torch.bfloat16

    def pack(self) -> None:
        """Pack every expert's weights for CPU inference and drop the stacked parameters."""
        if self.bank is None:
            self.use_bank(ExpertBank(self.gate_up_proj, self.down_proj))
        else:
            self.use_bank(self.bank.repacked())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bank is not None:
            destination[prefix + "gate_up_proj"], destination[prefix + "down_proj"] = self.bank.dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.bank is not None:
            names = (prefix + "gate_up_proj", prefix + "down_proj")
            missing_keys.extend(n for n in names if n not in state_dict)
            if all(n in state_dict for n in names):
                gate_up, down = (state_dict[n] for n in names)
                if self.bank.packed:
                    self.bank = ExpertBank(gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
                else:
                    dtype, device = self.bank.dtype, self.bank[0][0].device
                    gate_up, down = (w.to(device=device, dtype=dtype) for w in (gate_up, down))
                    self.bank = ExpertBank.from_plain(list(zip(gate_up.unbind(0), down.unbind(0))))
            state_dict = {k: v for k, v in state_dict.items() if k not in names}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), experts/weights (N, K) -> weighted sum of the chosen experts' outputs (N, H)."""
        N, K = experts.shape
        flat = experts.reshape(-1)  # (S,) with S = N*K: slot n*K + k is token n's k-th choice
        if flat.numel() <= GATHER_MAX_SLOTS:
            y = self._grouped(x, flat.tolist(), K)
        else:
            y = self._segmented(x, flat, K)
        # weighted sum over each token's K slots as one batched product: (N, 1, K) @ (N, K, H)
        # sums in fp32 and rounds once (a product then a sum rounds every product first)
        return torch.bmm(weights.unsqueeze(1).to(y.dtype), y.view(N, K, -1)).squeeze(1)  # (N, H)

    def _gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's fused gate/up projection: x (n, H) -> (n, 2I), gate columns first."""
        if self.bank is not None:
            return self.bank.gate_up(x, e)
        return linear(x, self.gate_up_proj[e])

    def _down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's down projection: h (n, I) -> (n, H)."""
        if self.bank is not None:
            return self.bank.down(h, e)
        return linear(h, self.down_proj[e])

    @staticmethod
    def _act(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (n, I) each
        return F.silu(gate) * up

    def _swiglu(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on x (n, H) -> (n, H)."""
        return self._down(self._act(self._gate_up(x, e)), e)

    def _grouped(self, x: torch.Tensor, flat: list[int], K: int) -> torch.Tensor:
        """Few slots (decode): each distinct chosen expert runs once on the tokens that chose it."""
        y = x.new_empty(len(flat), x.shape[-1])  # (S, H)
        slots_of: dict[int, list[int]] = {}
        for s, e in enumerate(flat):
            slots_of.setdefault(e, []).append(s)
        for e, slots in slots_of.items():
            if len(slots) == 1:
                s = slots[0]
                y[s:s + 1] = self._swiglu(x[s // K:s // K + 1], e)
            else:
                idx = torch.tensor(slots, device=x.device)
                y[idx] = self._swiglu(x[idx // K], e)
        return y

    def _segmented(self, x: torch.Tensor, flat: torch.Tensor, K: int) -> torch.Tensor:
        """Many slots (prefill): sort slots by expert, one matmul per contiguous segment.

        The segments' outputs land in sorted order by plain slice copies, and one row gather puts
        them back in slot order: indexed writes (``y[idx] = ...``) and ``x[idx]`` ran at about a
        third of the speed of ``index_select`` and contiguous copies (1024-token prefill: ~25 ms
        per layer against ~10).
        """
        order = torch.argsort(flat, stable=True)  # (S,)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
        rows = x.index_select(0, order // K)  # (S, H): sorted slot s holds token order[s] // K
        ys = torch.empty_like(rows)  # (S, H), sorted order
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = self._swiglu(rows[start:start + n], e)
                start += n
        del rows
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # slot -> its sorted place
        return ys.index_select(0, inverse)


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
        if x.is_cuda:  # both banks through the fused Triton kernel, no host-side split
            from model.backends.cuda.moe import modality_moe
            return modality_moe(self, x, vision_mask)
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
