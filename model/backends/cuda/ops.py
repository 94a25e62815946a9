"""Small fused Triton kernels of the decode step: each replaces a chain of elementwise launches.

Legend: B = batch rows, H = hidden, Hq / Hkv = query / key-value heads, D = head dim, L = cache slots.

At batch 1 a decode step is mostly launches: torch's RMSNorm is seven kernels, RoPE on q and k
about sixteen, each a few microseconds however little it does. These do the same arithmetic in
one launch each (fp32 inside, one rounding to the activations' dtype where torch rounds):

- ``add_rms_norm``: x + residual (rounded, as torch's add), then x / rms(x) * weight;
- ``rope_qkv_to_cache``: from the fused qkv product, q rotated into its own buffer, k rotated and
  v written at the cache slot (interleaved pairs: the text decoder's 3D RoPE, see model/rope.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, H, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)  # the residual stream keeps its dtype, as torch's add
        tl.store(sum_ptr + row * H + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual) * weight) for x (..., H); without residual, (x, norm(x)).

    As model.text.RMSNorm: statistics in fp32, the normed value rounded to x's dtype, then times
    the weight (rounded once more)."""
    H = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    res = residual.contiguous() if residual is not None else x
    _rms_norm_kernel[(x.numel() // H,)](x, res, total, weight, out, H, eps,
                                        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(H),
                                        num_warps=4 if H <= 4096 else 8)
    return total, out


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     HQ, HKV, D, L,
                     BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    partner = d ^ 1  # the other member of each (even, odd) pair
    sign = tl.where(d % 2 == 0, -1.0, 1.0)  # rotate_pairs: (x0, x1) -> (-x1, x0)
    width = (HQ + 2 * HKV) * D
    row = qkv_ptr + b * width
    cos = tl.load(cos_ptr + b * D + d, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + b * D + d, mask=ok, other=0.0)
    x = tl.load(row + head * D + d, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(row + head * D + partner, mask=ok, other=0.0).to(tl.float32)
    rotated = x * cos + sign * xp * sin
    if head < HQ:
        tl.store(q_ptr + (b * HQ + head) * D + d, rotated.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        kv = head - HQ
        slot = tl.load(slot_ptr)
        at = ((b * HKV + kv) * L + slot) * D + d
        tl.store(k_cache_ptr + at, rotated.to(k_cache_ptr.dtype.element_ty), mask=ok)
        v = tl.load(row + (HQ + HKV + kv) * D + d, mask=ok, other=0.0)
        tl.store(v_cache_ptr + at, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_qkv_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                      keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """qkv (B, (Hq + 2 Hkv) D) of one new token per row, cos/sin (B, D) fp32, caches (B, Hkv, L, D),
    slot (1,) long -> rotated q (B, Hq, D); rotated k and v written at ``slot`` of the caches."""
    B = qkv.shape[0]
    D = keys.shape[-1]
    q = qkv.new_empty(B, n_heads, D)
    _rope_qkv_kernel[(B, n_heads + n_kv_heads)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), q,
                                                keys, values, slot, n_heads, n_kv_heads, D, keys.shape[2],
                                                BLOCK_D=triton.next_power_of_2(D), num_warps=1)
    return q
