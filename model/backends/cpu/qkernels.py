"""The compiled int8 / int4 weight-only products of ``csrc/q_gemv.c`` (CPU, x86-64).

Two builds of the one source: AVX-512 (F/BW/VL, 16-lane registers) on CPUs that have it, else
AVX2 + FMA + F16C. Each is compiled on first use into the kernel cache (``model.kernels.build``),
loaded with ctypes (which releases the GIL during the call) and checked against the torch
reference (``model.backends.qformat.reference_product``) before use. When anything is missing or fails (no
compiler, not x86-64 AVX2, ``ERNIE_NO_KERNELS=1``, a wrong self-check) ``available()`` is False
and ``unavailable_reason`` says why: the products then dequantize in torch.

- ``gemv(x, qw, bias)``: x (..., K) with 1..SLICED_MAX_ROWS rows, bf16 or fp32 -> (..., N) in x's dtype;
- ``moe_decode(bank, x, experts, weights)``: one token through its K chosen experts of a quantized
  bank (gate/up, SwiGLU, down, the weighted sum) in one call and one parallel region;
- ``dequantize(qw)``: the (N, K) fp32 weight, for products of many rows (prefill).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from model.backends.cpu import kernels

MAX_ROWS = 8
# Up to this many rows (the decode steps of a batch) ``gemv`` runs the C product on slices of
# MAX_ROWS rows, reading the codes once per slice: at 32 rows that is 4 reads of 0.56 (int4) or
# 1.03 (int8) bytes per weight, where dequantizing writes and reads 8 (fp32).
SLICED_MAX_ROWS = 32
SOURCE = Path(__file__).parent / "csrc" / "q_gemv.c"
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
AVX512_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared",
                "-fPIC")
BUILDS = {"avx512vnni": AVX512_FLAGS, "avx2": AVX2_FLAGS}

unavailable_reason = ""

_ptr, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cpu_builds() -> list[str]:
    """The builds this CPU can run, fastest first."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return []
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return ["avx512vnni", "avx2"] if capability == "AVX512" and vnni else ["avx2"]


def load_build(name: str) -> ctypes.CDLL:
    """Build (or find in the cache) and load one build by name; raises on failure."""
    lib = kernels._compile_and_load(SOURCE, BUILDS[name])
    lib.q_gemv.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _int, _ptr, _ptr, _int, _int]
    lib.q_dequant.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _int]
    lib.q_quantize.argtypes = [_ptr, _int, _i64, _i64, _i64, _i64, _int, _ptr, _ptr, _ptr, _int]
    lib.q_moe1.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64,
                           _ptr, _i64, _ptr, _ptr, _i64, _i64, _int, _ptr, _int]
    lib.q_gemv.restype = lib.q_dequant.restype = lib.q_quantize.restype = lib.q_moe1.restype = ctypes.c_int
    lib.build_name = name
    return lib


def self_check(lib: ctypes.CDLL) -> str:
    """"" when both products of ``lib`` match the torch reference on odd shapes, else why not."""
    from model.backends.qformat import QuantizedWeight, reference_product  # torch reference

    gen = torch.Generator().manual_seed(0)
    for bits, (N, K, G), rows in ((8, (37, 96, 32), 3), (4, (21, 128, 64), 1), (4, (9, 96, 32), 5), (8, (7, 256, 128), 1)):
        qw = QuantizedWeight.quantize(torch.randn(N, K, generator=gen), bits, G)
        x = torch.randn(rows, K, generator=gen).bfloat16()
        b = torch.randn(N, generator=gen).bfloat16()
        w = qw.dequantize()
        ref = reference_product(x, qw, b)
        out = _gemv(lib, x, qw, b, 1).float()
        if not torch.allclose(out, ref, rtol=2 ** -7, atol=1e-3 * float(ref.abs().max())):
            return f"self-check of q_gemv (int{bits}) against torch failed"
        if not torch.allclose(_dequantize(lib, qw, 1), w, rtol=1e-6, atol=1e-6):
            return f"self-check of q_dequant (int{bits}) against torch failed"
        source = torch.randn(N, K, generator=gen).bfloat16()
        mine, ref = _quantize(lib, source, bits, G, 1), QuantizedWeight.quantize(source, bits, G)
        if not all(torch.equal(a, b) for a, b in ((mine.qweight, ref.qweight), (mine.scales, ref.scales))) or \
                (bits == 4 and not torch.equal(mine.zeros, ref.zeros)):
            return f"self-check of q_quantize (int{bits}) against torch failed"
    return ""


def _load() -> ctypes.CDLL:
    builds = cpu_builds()
    if not builds:
        raise RuntimeError(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, needs AVX2 + FMA")
    error = None
    for name in builds:
        try:
            lib = load_build(name)
            if not self_check(lib):
                return lib
        except (OSError, RuntimeError) as e:  # an older compiler: the next build
            error = e
    raise RuntimeError(f"no build of {SOURCE.name} passed its self-check ({error})")


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    global unavailable_reason
    lib, unavailable_reason = kernels._guarded(_load, lambda lib: "")
    return lib


def available() -> bool:
    """True when a build loaded and passed its self-check (decided once per process)."""
    return _library() is not None


def build_in_use() -> str | None:
    lib = _library()
    return None if lib is None else lib.build_name


def _gemv(lib, x: torch.Tensor, qw, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    N, K = qw.shape
    f32 = x.dtype == torch.float32
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    status = lib.q_gemv(x.data_ptr(), x.numel() // K, K, qw.qweight.data_ptr(), qw.scales.data_ptr(),
                        None if qw.zeros is None else qw.zeros.data_ptr(), N, qw.group_size, qw.bits,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), int(f32), threads)
    if status != 0:
        raise RuntimeError(f"q_gemv returned {status}")
    return out


def _dequantize(lib, qw, threads: int) -> torch.Tensor:
    N, K = qw.shape
    out = torch.empty(N, K, dtype=torch.float32)
    status = lib.q_dequant(qw.qweight.data_ptr(), qw.scales.data_ptr(),
                           None if qw.zeros is None else qw.zeros.data_ptr(), N, K, qw.group_size, qw.bits,
                           out.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"q_dequant returned {status}")
    return out


def _quantize(lib, weight: torch.Tensor, bits: int, group: int, threads: int):
    from model.backends.qformat import QuantizedWeight

    N, K = weight.shape
    codes = torch.empty(N, K // 2 if bits == 4 else K, dtype=torch.uint8 if bits == 4 else torch.int8)
    scales = torch.empty(N, K // group, dtype=torch.float16)
    zeros = torch.empty_like(scales) if bits == 4 else None
    status = lib.q_quantize(weight.data_ptr(), int(weight.dtype == torch.float32), N, K, weight.stride(0), group, bits,
                            codes.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"q_quantize returned {status}")
    return QuantizedWeight(codes, scales, zeros, bits)


def quantize(weight: torch.Tensor, bits: int, group: int):
    """``QuantizedWeight.quantize(weight, bits, group)``, bit for bit, in C: a CPU bf16 or fp32
    (N, K) weight with unit column stride (a view of a mapped file works); else the torch code."""
    from model.backends.qformat import QuantizedWeight

    ok = (weight.dim() == 2 and weight.is_cpu and weight.dtype in (torch.bfloat16, torch.float32)
          and weight.stride(-1) == 1 and weight.shape[1] % group == 0 and group % 32 == 0 and available()
          and not (torch.is_grad_enabled() and weight.requires_grad))
    if not ok:
        return QuantizedWeight.quantize(weight, bits, group)
    return _quantize(_library(), weight, bits, group, torch.get_num_threads())


def applies(x: torch.Tensor, qw) -> bool:
    """Whether ``gemv`` takes these: CPU x bf16/fp32 with 1..SLICED_MAX_ROWS rows, contiguous quantized
    tensors on the CPU with a group size the C code takes, and the library loaded."""
    N, K = qw.shape
    rows = x.numel() // max(K, 1)
    G = qw.group_size
    return (x.is_cpu and x.dtype in (torch.bfloat16, torch.float32) and 0 < rows <= SLICED_MAX_ROWS and x.shape[-1] == K
            and G % 32 == 0 and qw.qweight.is_cpu
            and qw.qweight.is_contiguous() and qw.scales.is_contiguous()
            and (qw.zeros is None or qw.zeros.is_contiguous()) and available())


def gemv(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, qw.dequantize(), bias)`` in fp32 sums with one rounding; see ``applies``."""
    if not applies(x, qw):
        raise ValueError(f"q_gemv does not take x {tuple(x.shape)} {x.dtype} with an int{qw.bits} weight "
                         f"{qw.shape} (or the library is unavailable: {unavailable_reason})")
    x = x if x.is_contiguous() else x.contiguous()
    rows = x.numel() // qw.shape[1]
    if rows <= MAX_ROWS:
        return _gemv(_library(), x, qw, bias, torch.get_num_threads())
    flat = x.view(rows, -1)
    out = torch.cat([_gemv(_library(), flat[i:i + MAX_ROWS], qw, bias, torch.get_num_threads())
                     for i in range(0, rows, MAX_ROWS)])
    return out.view(*x.shape[:-1], qw.shape[0])


MOE_MAX_K = 16  # experts per token q_moe1 takes


def moe_applies(bank, x: torch.Tensor, experts: torch.Tensor) -> bool:
    """Whether ``moe_decode`` takes these: one CPU bf16 token, a quantized bank of contiguous CPU
    buffers in group sizes the C code takes, at most MOE_MAX_K experts, and the library loaded."""
    if not (x.dim() == 2 and x.shape[0] == 1 and x.is_cpu and x.dtype == torch.bfloat16
            and 0 < experts.numel() <= MOE_MAX_K and available()):
        return False
    parts = [getattr(bank, f"{name}_{part}") for name in ("gate_up", "down") for part in ("qweight", "scales", "zeros")]
    return all(t is None or (t.is_cpu and t.is_contiguous()) for t in parts) and \
        bank.gate_up_qweight.shape[0] > 0 and all(q.group_size % 32 == 0 for q in (bank.weight("gate_up", 0), bank.weight("down", 0)))


def moe_decode(bank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token through the chosen experts of a quantized bank (see ``moe_applies``): x (1, H) bf16,
    experts / weights (1, K) -> sum_k weights[k] * expert_k(x), (1, H) bf16, in one C call."""
    return _moe1(_library(), bank, x, experts, weights, torch.get_num_threads())


def _moe1(lib, bank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, threads: int) -> torch.Tensor:
    gu, dn = bank.weight("gate_up", 0), bank.weight("down", 0)
    H, I = x.shape[-1], dn.shape[1]
    x = x.contiguous()
    ids = experts.reshape(-1).to(torch.int64).contiguous()
    w = weights.reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(1, H, dtype=torch.bfloat16)

    def ptr(t):
        return None if t is None else t.data_ptr()

    status = lib.q_moe1(
        x.data_ptr(), H, I, ids.numel(), ids.data_ptr(), w.data_ptr(),
        bank.gate_up_qweight.data_ptr(), bank.gate_up_qweight.stride(0), bank.gate_up_scales.data_ptr(),
        ptr(bank.gate_up_zeros), bank.gate_up_scales.stride(0), gu.group_size,
        bank.down_qweight.data_ptr(), bank.down_qweight.stride(0), bank.down_scales.data_ptr(),
        ptr(bank.down_zeros), bank.down_scales.stride(0), dn.group_size,
        bank.bits, y.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"q_moe1 returned {status}")
    return y


def dequantize(qw) -> torch.Tensor:
    """The (N, K) fp32 weight through the C code (``available()`` and contiguous CPU tensors)."""
    return _dequantize(_library(), qw, torch.get_num_threads())


def dequantized_product(x: torch.Tensor, qw, bias: torch.Tensor | None, native_bf16: bool) -> torch.Tensor:
    """Products of many rows (prefill, the vision tower): the weight dequantized to fp32 (by the C
    code where it takes it, else torch), then one fp32 product rounded to x's dtype; with
    ``native_bf16`` (AVX512-BF16 / AMX) and bf16 x, the weight rounded to bf16 and oneDNN's bf16
    GEMM, as an unquantized bf16 layer runs."""
    c_ok = available() and qw.group_size % 32 == 0 and qw.qweight.is_contiguous() and qw.qweight.is_cpu
    w = dequantize(qw) if c_ok else qw.dequantize()  # (N, K) fp32
    if x.dtype == torch.bfloat16 and native_bf16:
        return torch.nn.functional.linear(x, w.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
    out = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)
