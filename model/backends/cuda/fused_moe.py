"""A fused mixture-of-experts product in Triton: each chosen expert's weights read once, in place.

Legend: N = tokens, H = hidden, E = experts in the bank, K = experts per token, I = expert width,
S = N*K slots (slot n*K + k is token n's k-th choice), BM = rows per block.

How it runs (no host synchronisation anywhere, so it can sit inside a CUDA graph):

1. ``align_slots`` sorts the slots by expert on the device and pads each expert's run to a
   multiple of BM: ``sorted_slots`` lists slot ids (S marks padding), ``block_expert`` gives each
   block of BM rows its expert (-1: nothing to do), ``total`` the padded length. The grid is sized
   for the worst case (S + E*(BM-1) rows), so its shape depends on S alone; blocks past ``total``
   return at once.
2. ``_gate_up_kernel``: for a block of one expert's slots, the gate and up products against that
   expert's rows of ``gate_up_proj`` (E, 2I, H), read where they lie, with SiLU(gate) * up in the
   epilogue: (S, I) in the activations' dtype, one rounding.
3. ``_down_kernel``: (S, I) times that expert's ``down_proj`` (E, H, I) -> (S, H) per slot.
4. The K slots of a token are summed with their routing weights as one batched product in fp32
   (the CPU path's order: every slot rounded once, the weighted sum rounded once).

Slots whose expert is -1 (a token of the other modality) are skipped and their rows left zero.
fp32 inputs multiply in IEEE fp32 (Triton's default would be tf32), bf16/fp16 on the matrix units
with fp32 accumulators.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                    num_slots, top_k, H, I,
                    stride_xn, stride_we, stride_wr, stride_on,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + rows)
    valid = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the (S, I) output
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xn + k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        wg = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wr + k[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN): gate rows
        wu = tl.load(w_base + (cols[None, :] + I).to(tl.int64) * stride_wr + k[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN): up rows
        if IEEE:
            acc_gate += tl.dot(a.to(tl.float32), wg.to(tl.float32), input_precision="ieee")
            acc_up += tl.dot(a.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
        else:
            acc_gate += tl.dot(a, wg)
            acc_up += tl.dot(a, wu)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU(gate) * up, in fp32
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_on + cols[None, :],
             h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                 num_slots, H, I,
                 stride_hn, stride_we, stride_wr, stride_on,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + rows)
    valid = slots < num_slots
    slots64 = slots.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the (S, H) output
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks
        k_ok = k < I
        a = tl.load(h_ptr + slots64[:, None] * stride_hn + k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        w = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wr + k[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    tl.store(out_ptr + slots64[:, None] * stride_on + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _gate_up_rows_kernel(x_ptr, w_ptr, out_ptr, experts_ptr, top_k, H, I,
                         stride_xn, stride_we, stride_wr, stride_on,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode: one slot per program row-block, a GEMV against its expert's gate and up rows."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    if expert < 0:  # a slot of the other modality: zeros (the output is not pre-cleared)
        tl.store(out_ptr + slot * stride_on + cols, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty),
                 mask=col_ok)
        return
    token = (slot // top_k).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(x_ptr + token * stride_xn + k, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
        m = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + cols[:, None].to(tl.int64) * stride_wr + k[None, :], mask=m, other=0.0)
        wu = tl.load(w_base + (cols[:, None] + I).to(tl.int64) * stride_wr + k[None, :], mask=m, other=0.0)
        acc_gate += tl.sum(wg.to(tl.float32) * a[None, :], axis=1)
        acc_up += tl.sum(wu.to(tl.float32) * a[None, :], axis=1)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + slot * stride_on + cols, h.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _down_rows_kernel(h_ptr, w_ptr, out_ptr, experts_ptr, H, I,
                      stride_hn, stride_we, stride_wr, stride_on,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode: one slot's (I,) activations times its expert's down rows -> (H,) per slot."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    if expert < 0:
        tl.store(out_ptr + slot * stride_on + cols, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty),
                 mask=col_ok)
        return
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks
        k_ok = k < I
        a = tl.load(h_ptr + slot * stride_hn + k, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
        w = tl.load(w_base + cols[:, None].to(tl.int64) * stride_wr + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + slot * stride_on + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# Up to this many slots (decode: K per token, B tokens) every slot is its own GEMV; above, sorted.
ROWS_MAX_SLOTS = 64
ROWS_TILE = (16, 256)  # (output columns, reduction chunk) per program of the GEMV kernels


def block_rows(num_slots: int) -> int:
    """BM of the sorted path: 16 rows for small products (the matrix units' minimum), else 64."""
    return 16 if num_slots <= 256 else 64


def align_slots(experts: torch.Tensor, num_experts: int, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort slots by expert on the device: (sorted_slots, block_expert, total); see the module docstring.

    experts: (S,) expert of every slot, -1 for a slot to skip. Shapes depend on S, E, BM only.
    """
    S, E, device = experts.numel(), num_experts, experts.device
    bucket = torch.where(experts < 0, E, experts).long()  # (S,): E collects the skipped slots
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(
        0, bucket, torch.ones_like(bucket))  # (E+1,)
    padded = (counts + block_m - 1) // block_m * block_m
    padded[E] = 0  # skipped slots take no blocks
    padded_end = padded.cumsum(0)  # (E+1,)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts  # (E+1,): first sorted place of each bucket
    order = torch.sort(bucket, stable=True).indices  # (S,) slot ids, grouped by expert
    sorted_bucket = bucket[order]
    rank = torch.arange(S, device=device) - start[sorted_bucket]  # place inside its expert's run
    capacity = (S + E * (block_m - 1) + block_m - 1) // block_m * block_m  # worst-case padded rows
    dest = torch.where(sorted_bucket < E, padded_start[sorted_bucket] + rank, capacity)
    sorted_slots = torch.full((capacity + 1,), S, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))  # skipped slots land on the spare last entry
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end[:E].contiguous(), block_starts, right=True)  # (blocks,)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return sorted_slots[:capacity], block_expert, padded_end[E - 1:E]


def _tiles(num_slots: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps) for a product of num_slots rows."""
    bm = block_rows(num_slots)
    if dtype == torch.float32:
        return bm, 32, 32, 4
    return (bm, 64, 128, 4) if bm == 16 else (bm, 128, 64, 8)


def fused_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (N, H), experts (N, K) long (-1: skip), weights (N, K), gate_up (E, 2I, H), down (E, H, I)
    -> (N, H): sum over k of weights[n, k] * expert_k(x[n]) (SwiGLU experts); skipped slots add 0."""
    N, K = experts.shape
    E, two_i, H = gate_up.shape
    I = two_i // 2
    S = N * K
    x = x.contiguous()
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("fused_experts needs expert weights with contiguous rows")
    if S <= ROWS_MAX_SLOTS:  # every row written, skipped slots with zeros
        h, y = x.new_empty(S, I), x.new_empty(S, H)  # (S, I), (S, H)
        _rows(x, experts.reshape(-1).contiguous(), gate_up, down, h, y, K)
    else:  # skipped slots are in no block: they stay zero
        h, y = x.new_zeros(S, I), x.new_zeros(S, H)
        _sorted(x, experts.reshape(-1), gate_up, down, h, y, K)
    # weighted sum over each token's K slots in fp32, rounded once: (N, 1, K) @ (N, K, H)
    return torch.bmm(weights.unsqueeze(1).to(y.dtype), y.view(N, K, H)).squeeze(1)  # (N, H)


def _rows(x, experts, gate_up, down, h, y, K: int) -> None:
    """Decode-sized work: one program per (slot, column block), no sorting (each chosen expert's
    rows are read by the programs of the slots that chose it: once per slot at batch 1)."""
    S, I, H = experts.numel(), h.shape[1], y.shape[1]
    bn, bk = ROWS_TILE
    _gate_up_rows_kernel[(S, triton.cdiv(I, bn))](x, gate_up, h, experts, K, H, I,
                                                  x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
                                                  BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    _down_rows_kernel[(S, triton.cdiv(H, bn))](h, down, y, experts, H, I,
                                               h.stride(0), down.stride(0), down.stride(1), y.stride(0),
                                               BLOCK_N=bn, BLOCK_K=bk, num_warps=4)


def _sorted(x, experts, gate_up, down, h, y, K: int) -> None:
    """Prefill-sized work: slots sorted by expert, blocks of BM rows of one expert on the matrix units."""
    S, (E, _, H), I = experts.numel(), gate_up.shape, h.shape[1]
    bm, bn, bk, warps = _tiles(S, x.dtype)
    sorted_slots, block_expert, total = align_slots(experts, E, bm)
    # fp32 products in IEEE fp32; under Triton's CPU interpreter (tests) bf16 operands go the same
    # way (it has no bf16 dot; bf16 products are exact in fp32, so only the summation order differs)
    ieee = x.dtype == torch.float32 or INTERPRETING
    grid = (block_expert.numel(), triton.cdiv(I, bn))
    _gate_up_kernel[grid](x, gate_up, h, sorted_slots, block_expert, total, S, K, H, I,
                          x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, max(16, triton.next_power_of_2(H))),
                          IEEE=ieee, num_warps=warps)
    grid = (block_expert.numel(), triton.cdiv(H, bn))
    _down_kernel[grid](h, down, y, sorted_slots, block_expert, total, S, H, I,
                       h.stride(0), down.stride(0), down.stride(1), y.stride(0),
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, max(16, triton.next_power_of_2(I))),
                       IEEE=ieee, num_warps=warps)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, E, norm_min,
                  TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    logits = tl.load(logits_ptr + row * E + e, mask=ok, other=-float("inf"))
    z = tl.exp(logits - tl.max(logits, axis=0))
    probs = z / tl.sum(z, axis=0)
    score = tl.where(ok, probs + tl.load(bias_ptr + e, mask=ok, other=0.0), -float("inf"))
    ks = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_K,), dtype=tl.int64)
    picked = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(score, axis=0)
        chosen = tl.where(ks == j, best.to(tl.int64), chosen)
        picked = tl.where(ks == j, tl.sum(tl.where(e == best, probs, 0.0), axis=0), picked)
        score = tl.where(e == best, -float("inf"), score)
    picked = picked / tl.maximum(tl.sum(picked, axis=0), norm_min)
    kk = ks < TOP_K
    tl.store(experts_ptr + row * TOP_K + ks, chosen, mask=kk)
    tl.store(weights_ptr + row * TOP_K + ks, picked.to(weights_ptr.dtype.element_ty), mask=kk)


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm_min: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.moe.Router``'s choice from its fp32 logits (N, E) in one launch: softmax, top-k on
    probabilities + correction bias, the unbiased probabilities renormalised with a floor.
    -> weights (N, K) in ``dtype``, experts (N, K) long."""
    N, E = logits.shape
    weights = torch.empty(N, top_k, dtype=dtype, device=logits.device)
    experts = torch.empty(N, top_k, dtype=torch.long, device=logits.device)
    _route_kernel[(N,)](logits.contiguous(), bias.float().contiguous(), weights, experts, E, norm_min,
                        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(E),
                        BLOCK_K=triton.next_power_of_2(top_k), num_warps=1)
    return weights, experts
