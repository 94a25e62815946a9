"""The CPU backend's linear product: the fastest CPU route for bf16 weights.

On a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX: e.g. any AVX2-only x86),
torch's bf16 matmul emulates bf16 and runs several times slower than fp32 (measured on a
2-core AVX2 EPYC: 20 GFLOP/s against 130 for a 1024x2560 @ 2560x3072 product). There:

- a product with many rows (prefill, the vision tower) runs in fp32 on an upcast copy of the
  weight and rounds the result back to bf16. The copy is transient (one layer's weight at a
  time), the bf16 weights stay the only resident ones, and the result equals the bf16 product
  up to its final rounding (both accumulate in fp32);
- a product with a few rows (decode) goes to the streaming bf16 GEMV of ``model.backends.cpu.kernels`` when
  it is available, else to torch.

On a CPU with native bf16 (AVX512-BF16, AMX) torch's bf16 GEMM is the fast one for many rows, but
its products of a few rows read the weight at about half the speed of the GEMV kernel, so they
still go to the kernel: up to 4 rows with its AVX512-BF16 build (decode, and the experts a few
text tokens of an image prompt choose), else one or two. With AMX, products of 5 to 192 rows (a
prefill's expert segments, the vision experts of an image) go to the tile product of
``model.backends.cpu.kernels``, which reads the weight in place as the tiles' left operand; bigger ones stay
with torch (oneDNN), their rows padded to a multiple of 16 (some row counts get a slow blocking).

Everything else (fp32 or fp16 weights, CUDA) calls ``F.linear``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from model.backends.cpu import kernels

# From this many rows on, a CPU bf16 product without native bf16 runs in fp32 (the upcast of the
# weight costs about as much as a 16-row product: below that the weight's bytes dominate).
UPCAST_MIN_ROWS = 16
# On a CPU with native bf16, products of up to this many rows still go to the GEMV kernel: at batch
# 1 it streams a weight at 24-30 GB/s where torch's bf16 GEMV reaches 14 (2-core AMX Xeon).
NATIVE_GEMV_MAX_ROWS = 2
# With the AVX512-BF16 build, up to this many rows: it streams [M, 2560] x [2560, 3072] at 20-22
# GB/s for 1-4 rows against torch's 14-16, but vdpbf16ps retires about one per 2 cycles here, so
# from 8 rows on it is compute-bound and slower than torch (2-core AMX Xeon).
DP_GEMV_MAX_ROWS = 4
# On a CPU with AMX, products of more rows than that and up to this many go to the tile product of
# model/backends/cpu/kernels.py (csrc/bf16_amx.c): the expert segments of a prefill and the few-row products
# of an image prompt's text tokens. Measured for (M, 2560) x (2560, 3072), 2-core AMX Xeon: ~0.7
# against torch's ~1.0 ms up to 16 rows (memory speed), 0.9 vs 1.4 at 32, 1.4 vs 2.0-2.4 at 64,
# 2.2-2.4 vs 2.6-2.9 at 96, 3.1 vs 4.1 at 128, 4.5 vs 6.2 at 192; at 287 and 1024 rows oneDNN is
# as fast or faster (its blocking), so bigger products stay with torch.
AMX_MAX_ROWS = 192
# oneDNN's bf16 GEMM picks its row blocking from the row count, and a few counts get a poor one:
# on a 2-core AVX512-BF16 EPYC, (287, 2560) x (2560, 24576) runs at 271 GFLOP/s where 286 and 288
# rows run at 400 and 370 (also 214 at 986 rows, 264 at 778, against 380-415 around them). Rows
# padded with zeros to a multiple of PAD_ROWS_TO never hit those (347-417 GFLOP/s over 193-1100
# rows); the padding rows cost under 6% at these sizes and the output is a view of the first rows.
PAD_ROWS_FROM = AMX_MAX_ROWS + 1
PAD_ROWS_TO = 16


@lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gemv_max_rows() -> int:
    """Up to how many rows a CPU bf16 product goes to the GEMV kernel: all it takes without native
    bf16; with it, DP_GEMV_MAX_ROWS through the AVX512-BF16 build, else 2 (the AVX2 build is
    compute-bound from 3 rows on, where torch's own bf16 kernels are as fast)."""
    if not native_bf16_cpu():
        return kernels.max_rows()
    return DP_GEMV_MAX_ROWS if kernels.dp_in_use() else NATIVE_GEMV_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, routed as the module docstring says. x (..., K), weight (N, K)."""
    if (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not _needs_grad(x, weight, bias)):
        rows = x.numel() // max(x.shape[-1], 1)
        if rows >= UPCAST_MIN_ROWS and not native_bf16_cpu():
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(torch.bfloat16)
        if 0 < rows <= gemv_max_rows() and kernels.gemv_available():
            return kernels.bf16_gemv(x, weight, bias)
        if rows <= AMX_MAX_ROWS and native_bf16_cpu() and kernels.amx_available():
            return kernels.amx_linear(x, weight, bias)
        if rows >= PAD_ROWS_FROM and rows % PAD_ROWS_TO and native_bf16_cpu():
            return _row_padded_linear(x, weight, bias, rows)
    return F.linear(x, weight, bias)


def _row_padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``F.linear`` on x's rows padded with zeros to a multiple of PAD_ROWS_TO; (..., N) of the real rows."""
    K = x.shape[-1]
    padded = -(-rows // PAD_ROWS_TO) * PAD_ROWS_TO
    buffer = x.new_empty(padded, K)
    buffer[:rows].copy_(x.reshape(rows, K))
    buffer[rows:].zero_()
    out = F.linear(buffer, weight, bias)[:rows]  # the leading rows of a contiguous result: contiguous
    return out.view(*x.shape[:-1], weight.shape[0])
