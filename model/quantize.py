"""Weight-only int8 / int4 quantization: a transform applied to a loaded (or meta) ErnieVL.

Legend: N = output features (rows of a weight), K = input features, G = group size (columns of
one row sharing a scale), NG = K / G, E = experts per bank, I = expert width, H = hidden.

Format (one per quantized weight (N, K); ``QuantizedWeight`` holds it):
- int8: ``qweight`` int8 (N, K), ``scales`` fp16 (N, NG); weight = scale * q, q in -127..127
  (symmetric, llama.cpp's Q8_0): a zero point buys nothing measurable at 8 bits;
- int4: ``qweight`` uint8 (N, K / 2), ``scales`` and ``zeros`` fp16 (N, NG); weight = scale * q
  + zero with q in 0..15, zero the group's minimum (llama.cpp's Q4_1, torchao's int4 with a
  float zero point): on Gaussian weights its error is about 0.77x the symmetric one's for 0.25
  more bits per weight at G = 64 (benchmarks/quant_error.txt). In each block of 32 columns,
  byte j holds column j in its low nibble and column 16 + j in its high one (what the C and
  Triton kernels unpack with one mask and one shift).
Groups run along K. The default G is 128 for int8 and 64 for int4 (benchmarks/RESULTS-quant.md:
error and speed per group size); a layer whose K is not a multiple of G gets the largest power
of two below G that divides K, down to 32; one whose K is not a multiple of 32 keeps its
precision (none in the released model: every input width is a multiple of 256).

What is quantized (``QuantSpec``): the attention projections, the dense MLP, the shared experts
and both routed expert banks of every decoder layer, the vocabulary projection (lm_head, or a
quantized copy of the tied embeddings: the embedding lookup itself keeps the original table),
and the linear layers of the vision tower and the resampler. Routers, norms and embeddings keep
their precision. The two choices were measured (benchmarks/RESULTS-quant.md): on ernie-tiny's
held-out set the quantized lm_head costs nothing measurable and the quantized vision tower at
most one picture in 200; on the 4-layer bench checkpoint a bf16 vision tower and resampler would
keep the int4 model above 0.32x of bf16's memory. ``QuantSpec(lm_head=False, vision=False)``
keeps either in float.

``quantize_model(model, spec, release)`` quantizes a loaded model in place, layer by layer (the
loader releases the source pages after each, so the whole unquantized model is never resident);
``quantize_structure(model, spec)`` puts empty quantized modules of the right shapes in a meta
model, for a quantized checkpoint to be assigned into (model/quantized_checkpoint.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backends import select_backend
from model.backends.qformat import QuantizedWeight
from model.errors import CheckpointError, ErnieError

DEFAULT_GROUP = {8: 128, 4: 64}
MIN_GROUP = 32  # the kernels multiply whole 32-column blocks


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how: bits 8 or 4, the group size, and the two measured choices."""

    bits: int
    group_size: int = 0  # 0: DEFAULT_GROUP[bits]
    lm_head: bool = True
    vision: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if not self.group_size:
            object.__setattr__(self, "group_size", DEFAULT_GROUP[self.bits])
        if self.group_size < MIN_GROUP or self.group_size & (self.group_size - 1):
            raise ValueError(f"group size must be a power of two >= {MIN_GROUP}, got {self.group_size}")

    @property
    def zero_point(self) -> bool:
        return self.bits == 4

    @classmethod
    def parse(cls, name: str | int | None) -> "QuantSpec | None":
        """"int8" / "int4" / 8 / 4 / "8" / "4" -> a spec; None, "", "none", "bf16" -> None."""
        if name is None:
            return None
        text = str(name).strip().lower()
        if text in ("", "none", "no", "off", "bf16", "bfloat16"):
            return None
        bits = text.removeprefix("int").removeprefix("q")
        if bits not in ("4", "8"):
            raise ErnieError(f"unknown quantization {name!r}; expected int8 or int4", hint="--quantize int8 or int4")
        return cls(int(bits))

    def to_config(self) -> dict:
        """The ``quantization`` block of a quantized checkpoint's config.json."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, **{k: v for k, v in asdict(self).items() if k in ("lm_head", "vision")}}

    @property
    def name(self) -> str:
        return f"int{self.bits}"


FORMAT, FORMAT_VERSION = "ernie-weight-only", 1


def group_for(K: int, bits: int, group: int) -> int | None:
    """The group size a weight with K input features gets (see the module docstring), or None."""
    g = group
    while g > MIN_GROUP and K % g:
        g //= 2
    return g if K % g == 0 else None


# --- modules ---------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A linear layer with a quantized weight: buffers qweight, scales, zeros (int4), bias (optional)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: torch.Tensor | None = None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features // 2 if bits == 4 else in_features
        qdtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group, dtype=torch.float16, device=device))
        zeros = torch.empty(out_features, in_features // group, dtype=torch.float16, device=device) if bits == 4 else None
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.backend = select_backend(self.qweight.device)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group: int) -> "QuantLinear":
        N, K = weight.shape
        layer = cls(K, N, bits, group, None, device="meta")
        qw = _quantize_weight(weight, bits, group)
        layer.qweight, layer.scales, layer.zeros = qw.qweight, qw.scales, qw.zeros
        layer.bias = None if bias is None else bias.detach()
        layer.backend = select_backend(layer.qweight.device)
        return layer

    @property
    def weight_q(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.quant_linear(x, self.weight_q, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, " \
               f"group={self.in_features // self.scales.shape[1]}"


class QuantExpertBank(nn.Module):
    """E quantized experts (what ``Experts.use_bank`` takes): stacked buffers per projection,
    ``gate_up_{qweight,scales,zeros}`` (E, 2I, ...) and ``down_{...}`` (E, H, ...); expert e's
    weights are views of row e. The interface of model/packing.py's ExpertBank (gate_up, down)."""

    packed = True  # nothing to pack: Experts.packable() is False
    quantized = True

    def __init__(self, num_experts: int, hidden: int, width: int, bits: int, groups: tuple[int, int], device=None):
        super().__init__()
        self.num_experts, self.bits = num_experts, bits
        for name, (N, K), G in (("gate_up", (2 * width, hidden), groups[0]), ("down", (hidden, width), groups[1])):
            layer = QuantLinear(K, N, bits, G, device=device)
            for part in ("qweight", "scales", "zeros"):
                t = getattr(layer, part)
                self.register_buffer(f"{name}_{part}", None if t is None else t.new_empty(num_experts, *t.shape))
        self.backend = select_backend(self.down_qweight.device)

    def weight(self, name: str, e: int) -> QuantizedWeight:
        zeros = getattr(self, f"{name}_zeros")
        return QuantizedWeight(getattr(self, f"{name}_qweight")[e], getattr(self, f"{name}_scales")[e],
                               None if zeros is None else zeros[e], self.bits)

    def set_expert(self, e: int, gate_up: QuantizedWeight, down: QuantizedWeight) -> None:
        for name, qw in (("gate_up", gate_up), ("down", down)):
            for part in ("qweight", "scales", "zeros"):
                t = getattr(qw, part)
                if t is not None:
                    getattr(self, f"{name}_{part}")[e].copy_(t)

    def __len__(self) -> int:
        return self.num_experts

    def gate_up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.backend.quant_linear(x, self.weight("gate_up", e))

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return self.backend.quant_linear(h, self.weight("down", e))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized stacked (E, 2I, H) and (E, H, I) weights (bf16)."""
        return tuple(torch.stack([self.weight(name, e).dequantize(torch.bfloat16) for e in range(self.num_experts)])
                     for name in ("gate_up", "down"))


def _quantize_weight(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """The C quantizer where it runs (the same numbers as the torch code, ~20x faster), else torch."""
    from model.backends.cpu import qkernels

    return qkernels.quantize(weight.detach(), bits, group)


# --- the transform ---------------------------------------------------------------------------------

def _targets(model: nn.Module, spec: QuantSpec):
    """(owner module, attribute name, module) for every linear layer and expert bank to quantize, by layer."""
    from model.moe import Experts

    groups = []
    for layer in model.model.layers:
        found = []
        for owner in layer.modules():
            for name, child in owner.named_children():
                if isinstance(child, Experts) or (isinstance(child, nn.Linear) and not _is_router(owner, name)):
                    found.append((owner, name, child))
        groups.append(found)
    if spec.vision:  # the vision tower and the resampler that maps its features into the decoder
        for part in (model.vision_model, model.model.resampler_model):
            groups.append([(owner, name, child) for owner in part.modules()
                           for name, child in owner.named_children() if isinstance(child, nn.Linear)])
    return groups


def _is_router(owner: nn.Module, name: str) -> bool:
    return name.endswith("router")


def _linear_group(module: nn.Linear, spec: QuantSpec) -> int | None:
    return group_for(module.in_features, spec.bits, spec.group_size)


def _bank_groups(experts, spec: QuantSpec) -> tuple[int, int] | None:
    H, I = _bank_dims(experts)
    groups = (group_for(H, spec.bits, spec.group_size), group_for(I, spec.bits, spec.group_size))
    return None if None in groups else groups


def _bank_dims(experts) -> tuple[int, int]:
    if experts.bank is not None:
        gate_up, down = experts.bank[0] if not getattr(experts.bank, "quantized", False) else (None, None)
        if gate_up is not None:
            return gate_up.shape[1], down.shape[1]
    return experts.gate_up_proj.shape[2], experts.down_proj.shape[2]


def _expert_pair(experts, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    if experts.bank is not None:
        gate_up, down = experts.bank[e]
        if experts.bank.packed:
            gate_up, down = gate_up.to_dense(), down.to_dense()
        return gate_up, down
    return experts.gate_up_proj[e], experts.down_proj[e]


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, release=None) -> nn.Module:
    """Quantize ``model`` (an ErnieVL with real weights) in place, module by module, calling
    ``release()`` after each (and every few experts): the loader drops the source pages read so
    far, so the peak stays near the quantized size. Returns the model, frozen."""
    for found in _targets(model, spec):
        for owner, name, child in found:
            replacement = _quantized(child, spec, release)
            if replacement is not None:
                if isinstance(replacement, QuantExpertBank):
                    child.use_bank(replacement)
                else:
                    setattr(owner, name, replacement)
            if release is not None:
                release()
    if spec.lm_head:
        head = model.output_weight
        G = group_for(head.shape[1], spec.bits, spec.group_size)
        if G is not None:
            model.quantized_head = QuantLinear.from_weight(head, None, spec.bits, G)
            model.lm_head = None  # untied: the float projection is no longer needed (tied: the embeddings stay)
        if release is not None:
            release()
    model.quantization = spec
    return model.requires_grad_(False)


RELEASE_EVERY_EXPERTS = 8  # source pages are dropped after this many experts (a 28B text bank is 1.5 GB)


def _quantized(child: nn.Module, spec: QuantSpec, release=None):
    from model.moe import Experts

    if isinstance(child, Experts):
        groups = _bank_groups(child, spec)
        if groups is None:
            return None
        H, I = _bank_dims(child)
        device = _expert_pair(child, 0)[0].device
        bank = QuantExpertBank(child.num_experts, H, I, spec.bits, groups, device=device)
        for e in range(child.num_experts):
            gate_up, down = _expert_pair(child, e)
            bank.set_expert(e, _quantize_weight(gate_up, spec.bits, groups[0]),
                            _quantize_weight(down, spec.bits, groups[1]))
            if release is not None and e % RELEASE_EVERY_EXPERTS == RELEASE_EVERY_EXPERTS - 1:
                release()
        return bank
    G = _linear_group(child, spec)
    if G is None:
        return None
    return QuantLinear.from_weight(child.weight, child.bias, spec.bits, G)


def quantize_structure(model: nn.Module, spec: QuantSpec, has_head: bool) -> nn.Module:
    """Put empty quantized modules (on the meta device) where ``quantize_model`` would put real
    ones, so that a quantized checkpoint's tensors can be assigned by name."""
    for found in _targets(model, spec):
        for owner, name, child in found:
            from model.moe import Experts

            if isinstance(child, Experts):
                groups = _bank_groups(child, spec)
                if groups is not None:
                    H, I = _bank_dims(child)
                    child.use_bank(QuantExpertBank(child.num_experts, H, I, spec.bits, groups, device="meta"))
                continue
            G = _linear_group(child, spec)
            if G is not None:
                bias = None if child.bias is None else torch.empty_like(child.bias, device="meta")
                setattr(owner, name, QuantLinear(child.in_features, child.out_features, spec.bits, G, bias, device="meta"))
    if spec.lm_head and has_head:
        V, H = model.output_weight.shape
        G = group_for(H, spec.bits, spec.group_size)
        model.quantized_head = QuantLinear(H, V, spec.bits, G, device="meta")
        if model.lm_head is not None:
            model.lm_head = None  # untied: no float projection in the file (see ErnieVL.output_weight)
    model.quantization = spec
    return model


def spec_from_config(raw: dict) -> QuantSpec | None:
    """The QuantSpec of a config.json's ``quantization`` block; None when absent. Raises CheckpointError."""
    block = raw.get("quantization") or raw.get("quantization_config")
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        fmt = block.get("format") or block.get("quant_method") if isinstance(block, dict) else block
        raise CheckpointError(f"config.json has a quantization block of format {fmt!r}; ernie reads only "
                              f"{FORMAT!r} (written by `ernie quantize`)",
                              hint="quantize the original bf16 checkpoint with `ernie quantize MODEL OUTDIR`")
    if block.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"quantized checkpoint format version {block.get('version')!r} is not supported "
                              f"(this ernie reads version {FORMAT_VERSION})", hint="re-run `ernie quantize`")
    try:
        return QuantSpec(int(block["bits"]), int(block["group_size"]), bool(block.get("lm_head", True)),
                         bool(block.get("vision", True)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json's quantization block is invalid ({type(e).__name__}: {e}); "
                              "expected bits 4 or 8 and a power-of-two group_size >= 16",
                              hint="re-run `ernie quantize` on the original checkpoint") from None
