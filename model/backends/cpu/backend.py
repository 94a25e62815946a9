"""``CpuBackend``: the operations on CPU, through the compiled kernels where they apply.

Every decision about this CPU (native bf16, AVX512-BF16, AMX, a C compiler, oneDNN) is made here
and in the modules beside it, once per process (their checks are cached), never in the
architecture. Each operation falls back to the plain torch ``Backend`` when its kernel does not
take the tensors (another dtype, autograd, a shape the C code does not handle).
"""

from __future__ import annotations

import torch

from model.backends.base import Backend
from model.backends.cpu import allocator, kernels, linear, packing, qkernels, threads

# Steps of at most this many new tokens (decode) attend through ``kernels.attn_decode``: torch's
# flash kernel spends ~2 us per cached token and layer on a query block of one row (2-core EPYC,
# 20/4 heads of 128: 0.9 ms at 300 cached tokens, 9.6 at 4000; ours 0.08 and 0.55).
DECODE_MAX_QUERIES = 2


class CpuBackend(Backend):
    """The CPU's routes: bf16 GEMV / AMX / fp32-upcast products (model/backends/cpu/linear.py),
    one-pass decode attention and AVX512-BF16 flash attention, the fused vision RoPE, oneDNN-packed
    weights where they pay, and expert banks read in place from the mapped checkpoint."""

    name = "cpu"
    maps_weights = True

    def linear(self, x, weight, bias=None):
        return linear.linear(x, weight, bias)

    def attention(self, q, k, v, mask=None, causal=False):
        if ((causal or mask is not None) and q.shape[2] <= DECODE_MAX_QUERIES
                and kernels.attn_decode_applies(q, k, v, mask)):
            return kernels.attn_decode(q, k, v, mask)  # a decode step: one pass over the cache
        if mask is None and kernels.flash_attn_applies(q, k, v):
            return kernels.flash_attn(q, k, v, causal=causal)  # prefills and the vision tower on AVX512-BF16
        return super().attention(q, k, v, mask, causal)

    def rotate_vision(self, x, cos, sin):
        if kernels.rope_half_applies(x, cos, sin):
            return kernels.rope_half(x, cos, sin)  # one pass instead of six, the same numbers
        return super().rotate_vision(x, cos, sin)

    def experts(self, bank, x, experts, weights):
        inner = getattr(bank, "bank", None)
        if getattr(inner, "quantized", False) and qkernels.moe_applies(inner, x, experts):
            return qkernels.moe_decode(inner, x, experts, weights)  # decode: the whole layer's routed experts in one call
        return super().experts(bank, x, experts, weights)

    def quant_linear(self, x, qw, bias=None):
        if qkernels.applies(x, qw):  # decode: the int8 / int4 GEMV
            return qkernels.gemv(x, qw, bias)
        if x.is_cpu:  # more rows: dequantized (in C where it can), then one product
            return qkernels.dequantized_product(x, qw, bias, linear.native_bf16_cpu())
        return super().quant_linear(x, qw, bias)

    def vocab_logits(self, hidden, weight, packed=None):
        return packing.vocab_logits(hidden, weight, packed)

    def parallel_parts(self) -> int:
        return threads.part_workers()

    def map_parts(self, fn, parts):
        return threads.map_parts(fn, parts)

    def packs(self, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and packing.packing_pays()

    def pack(self, model, release=None):
        return packing.pack_for_cpu(model, release=release)

    def pack_experts(self, experts) -> None:
        packing.pack_experts(experts)

    def pack_weight(self, weight):
        return packing.pack_weight(weight)

    def expert_bank(self, pairs, packed=False):
        return packing.ExpertBank.from_packed(pairs) if packed else packing.ExpertBank.from_plain(pairs)

    def loaded(self, model) -> None:
        allocator.keep_freed_memory()  # activations reuse freed heap blocks instead of faulting pages in anew
        threads.fit_threads(model)  # a model too narrow to split its products runs on one thread
