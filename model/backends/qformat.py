"""The numbers of the weight-only int8 / int4 format (model/quantize.py describes it) and their torch
reference: quantize, pack, dequantize, and what the CPU kernel computes. Every backend's quantized
product is checked against these.

Legend: N = rows of a weight, K = input features, G = group size, NG = K / G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANT_ROWS_CHUNK_BYTES = 64 << 20  # fp32 working set of one quantization step (a weight's rows in chunks)


def quantize_tensor(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight (N, K) float -> (qweight, scales (N, NG) fp16, zeros (N, NG) fp16 or None), rows in chunks."""
    N, K = weight.shape
    rows = max(1, QUANT_ROWS_CHUNK_BYTES // max(1, 4 * K))
    parts = [_quantize_rows(weight[i:i + rows], bits, group) for i in range(0, N, rows)]
    q = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    s = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    z = None if bits == 8 else (torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2])
    return q, s, z


def _quantize_rows(weight: torch.Tensor, bits: int, group: int):
    N, K = weight.shape
    w = weight.detach().to(device="cpu" if weight.is_meta else weight.device, dtype=torch.float32)
    w = w.view(N, K // group, group)  # (N, NG, G)
    if bits == 8:
        scale = (w.abs().amax(-1) / 127).clamp(max=65504).half()  # (N, NG)
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, w / s.clamp(min=1e-30), 0.0).round_().clamp_(-127, 127).to(torch.int8)
        return q.view(N, K), scale, None
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(max=65504).half()
    zero = lo.clamp(-65504, 65504).half()
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.where(s > 0, (w - z) / s.clamp(min=1e-30), 0.0).round_().clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 uint8 -> (N, K / 2): per 32 columns, byte j = col j | col 16 + j << 4."""
    N, K = q.shape
    q = q.view(N, K // 32, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).view(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: (N, K / 2) uint8 -> (N, K) values 0..15."""
    N, half = packed.shape
    p = packed.view(N, half // 16, 1, 16)
    return torch.cat([p & 15, p >> 4], dim=2).view(N, 2 * half)


@dataclass
class QuantizedWeight:
    """One quantized (N, K) weight: the tensors of the format above and how to read them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        N = self.qweight.shape[0]
        return N, self.qweight.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int, group: int) -> "QuantizedWeight":
        return cls(*quantize_tensor(weight, bits, group), bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight the format stands for, computed in fp32 and cast to ``dtype`` (torch only)."""
        N, K = self.shape
        G = self.group_size
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        w = q.float().view(N, K // G, G) * self.scales.float().unsqueeze(-1)  # (N, NG, G)
        if self.zeros is not None:
            w += self.zeros.float().unsqueeze(-1)
        return w.view(N, K).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def quantize_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x (..., K) -> the fp32 values the CPU kernel multiplies: per block of 32 columns,
    round(x / s) * s with s = max|x| / 127 (its activations are int8 in blocks, as llama.cpp's)."""
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)  # (M, K / 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, 0.0)
    return ((xb * inv).round_() * (amax / 127.0)).view(shape)


def reference_product(x: torch.Tensor, qw: "QuantizedWeight", bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the CPU GEMV computes, in fp32 torch: the int8-block activations times the dequantized weight."""
    out = F.linear(quantize_activations(x), qw.dequantize())
    return out if bias is None else out + bias.float()
