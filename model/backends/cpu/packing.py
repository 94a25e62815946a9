"""CPU inference transform: pre-pack bf16 linear weights into oneDNN's blocked layout.

Why: on CPU, ``F.linear`` with a plain bf16 weight re-lays the weight out on every call, so a
batch-1 decode step streams each weight about three times and reaches a fraction of the memory
bandwidth. A weight packed once (``torch.ops.mkldnn._reorder_linear_weight``) is read once per
call by a kernel that uses the CPU's bf16 dot products; the results are bit-identical to
``F.linear`` (tests/test_perf_paths.py checks it).

The loader packs only where ``packing_pays()``: where the streaming GEMV kernel of
``model.backends.cpu.kernels`` runs, plain weights are faster at every size, even on AMX CPUs.

``pack_for_cpu(model)`` rewrites a loaded model in place: decoder ``nn.Linear`` layers become
``PackedLinear``, every expert bank gets one packed (gate_up, down) pair per expert (its stacked
parameters are released), and the vocabulary projection gets a packed copy (the tied embedding
itself stays, for lookups). Packed tensors are opaque; ``state_dict`` still returns the plain
weights under the usual names. The result is for inference only: packed layers have no backward,
so the model's parameters are frozen (``requires_grad`` False) and an input that needs a gradient
is refused with an ErnieError.
The vision tower is left alone (its matmuls are large and compute-bound).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import nn

from model.backends.cpu import kernels
from model.backends.cpu.linear import linear
from model.errors import ErnieError


@lru_cache(maxsize=1)
def packing_available() -> bool:
    """True when this torch build has oneDNN's weight-packing ops *and* this CPU can run their
    bf16 path (oneDNN wants AVX512-BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU cannot). The CPU
    side is probed by packing and using a small weight once."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        weight = torch.ones(16, 32, dtype=torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 32, dtype=torch.bfloat16),
                                                 torch.ops.mkldnn._reorder_linear_weight(weight, 1),
                                                 None, "none", [], "")
    except RuntimeError:
        return False
    return bool((out == 32).all())


def packing_pays() -> bool:
    """Whether a CPU bf16 load should pack: oneDNN can pack here *and* the streaming GEMV kernel
    of ``model.backends.cpu.kernels`` is unavailable. Where the kernel runs, plain weights win at every size
    (2-core AMX Xeon, 2 threads: batch-1 products 24-30 GB/s through the kernel against 10-16
    packed; 1024-row products 22 ms plain against 28 packed), and plain weights load in place."""
    return packing_available() and not kernels.gemv_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) CPU bf16 weight -> an opaque packed (N, K) weight for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a packed W; x (..., K) bf16 -> (..., N)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ErnieError("a model packed by pack_for_cpu is for inference only and has no backward",
                         hint="run it under torch.no_grad(), or train an unpacked model")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is packed; ``state_dict`` gives (and takes) the plain weight."""

    def __init__(self, linear: nn.Linear, packed_weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed_weight = pack_weight(linear.weight) if packed_weight is None else packed_weight
        self.register_buffer("packed_weight", packed_weight, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.packed_weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        else:
            self.packed_weight = pack_weight(weight.to(torch.bfloat16))
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class ExpertBank(nn.Module):
    """One bank's experts as per-expert buffers ``gate_up_{e}`` (2I, H) and ``down_{e}`` (H, I).

    ``packed``: the buffers are oneDNN-packed copies; otherwise they are plain tensors, typically
    views of a memory-mapped checkpoint (each expert's gate and up rows lie next to each other in
    the file, so a CPU load in the checkpoint's dtype copies no expert at all).
    """

    def __init__(self, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None):
        """Packed, from stacked (E, 2I, H) and (E, H, I) weights; empty when none are given."""
        super().__init__()
        self.num_experts = 0
        self.packed = True
        if gate_up is not None:
            for e in range(gate_up.shape[0]):
                self._append(*self.pack_pair(gate_up[e], down[e]))

    @staticmethod
    def pack_pair(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_weight(gate_up), pack_weight(down)

    @classmethod
    def from_packed(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> "ExpertBank":
        """From already packed (gate_up, down) pairs, one per expert."""
        bank = cls()
        for gate_up, down in pairs:
            bank._append(gate_up, down)
        return bank

    @classmethod
    def from_plain(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> "ExpertBank":
        """From plain (gate_up (2I, H), down (H, I)) tensors, one pair per expert, kept as they are."""
        bank = cls.from_packed(pairs)
        bank.packed = False
        return bank

    def _append(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.register_buffer(f"gate_up_{self.num_experts}", gate_up, persistent=False)
        self.register_buffer(f"down_{self.num_experts}", down, persistent=False)
        self.num_experts += 1

    def __getitem__(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"gate_up_{e}"), getattr(self, f"down_{e}")

    def __len__(self) -> int:
        return self.num_experts

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's fused gate/up projection: x (n, H) -> (n, 2I)."""
        return packed_linear(x, self[e][0]) if self.packed else linear(x, self[e][0])

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's down projection: h (n, I) -> (n, H)."""
        return packed_linear(h, self[e][1]) if self.packed else linear(h, self[e][1])

    @property
    def dtype(self) -> torch.dtype:
        return self[0][0].dtype

    def repacked(self) -> "ExpertBank":
        """This bank packed (itself when it is packed already)."""
        if self.packed:
            return self
        return ExpertBank.from_packed([self.pack_pair(*self[e]) for e in range(self.num_experts)])

    def reloaded(self, gate_up: torch.Tensor, down: torch.Tensor) -> "ExpertBank":
        """A bank of the same kind (packed, or plain in this bank's dtype and device) holding the
        stacked (E, 2I, H) and (E, H, I) weights of a new state dict."""
        if self.packed:
            return ExpertBank(gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
        dtype, device = self.dtype, self[0][0].device
        gate_up, down = (w.to(device=device, dtype=dtype) for w in (gate_up, down))
        return ExpertBank.from_plain(list(zip(gate_up.unbind(0), down.unbind(0))))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain stacked (E, 2I, H) and (E, H, I) weights."""
        pairs = [self[e] for e in range(self.num_experts)]
        if self.packed:
            pairs = [(g.to_dense(), d.to_dense()) for g, d in pairs]
        return torch.stack([g for g, _ in pairs]), torch.stack([d for _, d in pairs])


def pack_experts(experts: nn.Module) -> None:
    """Pack every expert of a bank (``model.moe.Experts``) for CPU inference; its stacked
    parameters are dropped."""
    if experts.bank is None:
        experts.use_bank(ExpertBank(experts.gate_up_proj, experts.down_proj))
    else:
        experts.use_bank(experts.bank.repacked())


def can_pack(model: nn.Module) -> bool:
    """Packing applies to a CPU model whose decoder weights are bf16, on a torch with oneDNN."""
    weight = model.output_weight
    return packing_available() and weight.device.type == "cpu" and weight.dtype == torch.bfloat16


@torch.no_grad()
def pack_for_cpu(model: nn.Module, release=None) -> nn.Module:
    """Pack the text decoder and the vocabulary projection of ``model`` (an ErnieVL) in place.

    A model that cannot be packed (not CPU bf16, no oneDNN) is returned unchanged; banks packed
    already are kept. Weights are packed by as many threads as torch uses (the op releases the
    GIL). ``release()``, when given, runs after each packed weight (the loader drops checkpoint
    pages that were just copied, to keep its peak memory down).
    """
    if not can_pack(model):
        return model
    linears, banks = [], []
    for parent in model.model.layers.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                linears.append((parent, name, child))
            elif callable(getattr(child, "packable", None)) and child.packable():  # an expert bank
                banks.append(child)

    def job(weight: torch.Tensor) -> torch.Tensor:
        packed = pack_weight(weight)
        if release is not None:
            release()
        return packed

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        head = pool.submit(job, model.output_weight)
        packed = list(pool.map(job, [linear.weight for _, _, linear in linears]))
        for (parent, name, linear), weight in zip(linears, packed):
            setattr(parent, name, PackedLinear(linear, weight))
        for bank in banks:
            pack_experts(bank)
        if model.packed_head is None:  # first packing: keep the copy in step with later weight loads
            model.register_load_state_dict_post_hook(_repack_head)
        model.packed_head = head.result()
    return model.requires_grad_(False)  # inference only: forward works without torch.no_grad()


def _repack_head(model: nn.Module, incompatible_keys) -> None:
    with torch.no_grad():
        model.packed_head = pack_weight(model.output_weight)


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """hidden (B, T, H) -> logits (B, T, V), through the packed projection when there is one."""
    if packed is not None and hidden.dtype == torch.bfloat16:
        return packed_linear(hidden, packed)
    return linear(hidden, weight)
