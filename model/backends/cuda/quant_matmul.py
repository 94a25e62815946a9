"""Weight-only int8 / int4 products on CUDA: one Triton kernel that dequantizes weight tiles in registers.

``quant_linear(x, qw, bias)`` computes ``x @ dequantize(qw).T (+ bias)`` for x (..., K) in bf16 /
fp16 / fp32 on the GPU, reading the weight in its packed form (model/backends/qformat.py: int8
codes, or int4 nibbles laid out per 32-column block, fp16 scales and zeros per group along K).
Each program computes a (BLOCK_M, BLOCK_N) tile of the output: for each BLOCK_K slice of K it
loads x's tile, the codes of the weight tile (an int4 byte is read for both its columns), scales
them (one scale and zero per row, as BLOCK_K divides the group), and multiplies in fp32 through
``tl.dot`` with the tile cast to x's dtype. Decode (a few rows) uses the smallest row tile
``tl.dot`` takes (16). No host synchronisation and no allocation but the output: usable inside
the CUDA decode step and its graph (the caller allocates nothing else). ``applies`` says when it
runs; otherwise callers dequantize and use ``F.linear``.

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, small shapes) and on a GPU
by the tests marked ``cuda``.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

try:  # triton is optional: without it (or without a GPU) the products dequantize in torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    return triton is not None and os.environ.get("ERNIE_NO_KERNELS", "").lower() in ("", "0", "false", "no", "off")


def applies(x: torch.Tensor, qw) -> bool:
    """Whether the kernel takes these: x on a CUDA device (or any device under TRITON_INTERPRET=1)
    in bf16/fp16/fp32 with K a multiple of 32, the quantized tensors contiguous on x's device with
    a power-of-two group of at least 32, and triton importable."""
    N, K = qw.shape
    G = qw.group_size
    return (triton_available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.dtype in _DTYPES and x.shape[-1] == K and K % 32 == 0 and G >= 32 and G & (G - 1) == 0
            and qw.qweight.device == x.device and qw.qweight.is_contiguous() and qw.scales.is_contiguous()
            and (qw.zeros is None or qw.zeros.is_contiguous()))


def quant_linear(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, qw.dequantize(x.dtype), bias)`` through the Triton kernel (see ``applies``)."""
    N, K = qw.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_k = min(qw.group_size, 64)
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    zeros = qw.zeros if qw.zeros is not None else qw.scales  # a placeholder pointer when HAS_ZERO is False
    _wq_matmul[grid](
        x2, qw.qweight, qw.scales, zeros, bias if bias is not None else out, out,
        M, N, K, x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0), out.stride(0),
        GROUP=qw.group_size, BITS=qw.bits, HAS_ZERO=qw.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out.view(*x.shape[:-1], N)


def expert_rows_product(x: torch.Tensor, experts: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bits: int, row_div: int) -> torch.Tensor:
    """For each slot s: x[s // row_div] times expert ``experts[s]``'s quantized weight (stacked
    (E, N, ...) tensors), (S, N) in x's dtype; a slot whose expert is -1 gets zeros. Reads the
    expert index on the device: no host synchronisation (a decode step's graph can hold it)."""
    E, N = qweight.shape[:2]
    K = x.shape[-1]
    S = experts.numel()
    out = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    group = K // scales.shape[-1]
    z = zeros if zeros is not None else scales
    grid = (S, triton.cdiv(N, 64))
    _wq_expert_rows[grid](x, experts, qweight, scales, z, out, N, K, x.stride(0), qweight.stride(0),
                          qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), row_div,
                          GROUP=group, BITS=bits, HAS_ZERO=zeros is not None, BLOCK_N=64, BLOCK_K=min(group, 64))
    return out


def quant_bank_product(bank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A quantized expert bank (model/quantize.py's ``QuantExpertBank``: stacked codes, scales, zeros)
    on x (N, H) for the chosen experts (N, K) (-1: none) with their weights (N, K) -> (N, H):
    gate/up per slot, SiLU(gate) * up, down per slot, the weighted sum over each token's slots.
    Fixed shapes, no host synchronisation: the CUDA decode step and its graph can run it."""
    N, K = experts.shape
    flat = experts.reshape(-1).contiguous()  # (S,), slot n*K + k
    x = x.contiguous()
    gate_up = expert_rows_product(x, flat, bank.gate_up_qweight, bank.gate_up_scales, bank.gate_up_zeros,
                                  bank.bits, K)  # (S, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up).contiguous()  # (S, I)
    y = expert_rows_product(h, flat, bank.down_qweight, bank.down_scales, bank.down_zeros, bank.bits, 1)  # (S, H)
    w = weights.masked_fill(experts < 0, 0).to(y.dtype)
    return torch.bmm(w.unsqueeze(1), y.view(N, K, -1)).squeeze(1)  # (N, H)


if triton is not None:

    @triton.jit
    def _wq_expert_rows(x_ptr, e_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_qe, stride_qn,
                        stride_se, stride_sn, stride_ym, row_div,
                        GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[s, n-tile] = x[s // row_div] . W_e[n-tile] for e = experts[s] (zeros when e < 0)."""
        slot, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(e_ptr + slot)
        valid = e >= 0
        e = tl.where(valid, e, 0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        row = slot // row_div
        q_base = q_ptr + e * stride_qe
        s_base = s_ptr + e * stride_se
        z_base = z_ptr + e * stride_se
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x = tl.load(x_ptr + row * stride_xm + k).to(tl.float32)  # (BK,)
            if BITS == 8:
                w = tl.load(q_base + rn[:, None] * stride_qn + k[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
            else:
                byte = (k // 32) * 16 + (k % 16)
                shift = ((k % 32) // 16) * 4
                q = tl.load(q_base + rn[:, None] * stride_qn + byte[None, :], mask=n_ok[:, None], other=0)
                w = ((q.to(tl.int32) >> shift[None, :]) & 15).to(tl.float32)
            g = k0 // GROUP
            sc = tl.load(s_base + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1) * sc  # (BN,): the codes' term of this slice
            if HAS_ZERO:
                z = tl.load(z_base + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                part += z * tl.sum(x, axis=0)
            acc += part
        acc = tl.where(valid, acc, 0.0)
        tl.store(y_ptr + slot * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


    @triton.jit
    def _wq_matmul(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) @ dequantized W (N, K)^T (+ bias); one (BLOCK_M, BLOCK_N) tile per program."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        rk = tl.arange(0, BLOCK_K)  # (BK,)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk  # (BK,) columns of this slice
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)  # (BM, BK)
            if BITS == 8:
                q = tl.load(q_ptr + rn[:, None] * stride_qn + k[None, :], mask=n_ok[:, None], other=0)
                w = q.to(tl.float32)  # (BN, BK)
            else:
                # per 32 columns: byte j holds column j (low nibble) and column 16 + j (high nibble)
                byte = (k // 32) * 16 + (k % 16)
                shift = ((k % 32) // 16) * 4
                q = tl.load(q_ptr + rn[:, None] * stride_qn + byte[None, :], mask=n_ok[:, None], other=0)
                w = ((q.to(tl.int32) >> shift[None, :]) & 15).to(tl.float32)  # (BN, BK)
            g = k0 // GROUP  # BLOCK_K divides GROUP: one scale (and zero) per row in this slice
            s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
            w = w * s[:, None]
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                w = w + z[:, None]
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
