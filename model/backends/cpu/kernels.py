"""A streaming bf16 matrix-vector product for CPUs without native bf16 (AVX2 + FMA x86).

torch's bf16 ``F.linear`` with one row of x reads the weight at about a third of memory speed on
such CPUs, and decode at batch 1 is almost nothing but these products. ``csrc/bf16_gemv.c``
reads each weight row once for up to ``MAX_ROWS`` rows of x, widens bf16 to fp32 in registers,
accumulates in fp32 and rounds the result to bf16 once. On CPUs with AVX512-BF16,
``csrc/bf16_gemv_dp.c`` (the same interface) multiplies bf16 pairs natively, takes up to 16 rows
and stays at memory speed up to about 4; ``max_rows()`` says which build is in use.

The C file is compiled on first use with the system C compiler into the cache
(``$ERNIE_CACHE``, else ``$XDG_CACHE_HOME/ernie``, else ``~/.cache/ernie``, under ``kernels/``),
named by a hash of source, flags, compiler and machine, and loaded with ctypes (which releases
the GIL during the call). When anything is missing or fails (no compiler, not x86-64 AVX2,
``ERNIE_NO_KERNELS=1``, a wrong self-check) ``gemv_available()`` is False, silently, and
``unavailable_reason`` says why.

``csrc/bf16_ops.c`` (built and loaded the same way, checked by ``ops_available()``) holds fused
elementwise passes: the vision RoPE (``rope_half``), one pass instead of six, bit-identical; and the
attention of a decode step over the KV cache (``attn_decode``), which torch's flash kernel runs at
~2 us per cached token and layer.
``csrc/bf16_amx.c`` (``amx_linear``, ``amx_available()``) multiplies tens of rows of x by a weight
on AMX tiles, reading the weight in place as the tiles' left operand. ``csrc/bf16_flash.c``
(``flash_attn``) is attention of many queries (prefill, the vision tower) on AVX512-BF16.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from model.backends.base import rotate_vision_torch
from model.env import env_flag

MAX_ROWS = 8  # rows of x the AVX2 build takes; see max_rows() for the build in use
SOURCE = Path(__file__).parent / "csrc" / "bf16_gemv.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
# CPUs with AVX512-BF16 get csrc/bf16_gemv_dp.c instead (same C interface, up to 16 rows of x,
# through vdpbf16ps); when it cannot be built or fails its check, the AVX2 build.
DP_MAX_ROWS = 16
DP_SOURCE = Path(__file__).parent / "csrc" / "bf16_gemv_dp.c"
DP_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")
# products of tens of rows on AMX tiles (csrc/bf16_amx.c), on CPUs with AMX-BF16
AMX_SOURCE = Path(__file__).parent / "csrc" / "bf16_amx.c"
AMX_FLAGS = ("-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
             "-fopenmp", "-shared", "-fPIC")
# the fused elementwise passes (vision RoPE): a library of their own,
# built without FMA contraction so that separate fp32 products and sums stay separate, as in torch
OPS_SOURCE = Path(__file__).parent / "csrc" / "bf16_ops.c"
OPS_FLAGS = FLAGS + ("-ffp-contract=off",)

unavailable_reason = ""  # why gemv_available() is False (for debugging); empty when it is True

_ptr, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ARGTYPES = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _int]  # x, M, K, W, N, ldw, bias, y, threads


def cache_dir() -> Path:
    """Where compiled kernels live: ``$ERNIE_CACHE/kernels`` (or the XDG / home fallbacks)."""
    root = os.environ.get("ERNIE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "ernie") if xdg else os.path.join(Path.home(), ".cache", "ernie")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    name = os.environ.get("CC")
    candidates = [name] if name else ["cc", "gcc"]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def build(compiler: str, directory: Path | None = None, source_file: Path = SOURCE,
          flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile a C source unless a build for this source (and the headers beside it), flags, compiler
    and machine exists.

    The library is written under a temporary name in the same folder and renamed into place, so
    a concurrent process never loads a half-written file. Raises RuntimeError on failure.
    """
    source = source_file.read_bytes() + b"".join(h.read_bytes() for h in sorted(source_file.parent.glob("*.h")))
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), platform.machine().encode()]))
    directory = directory or cache_dir()
    stem = source_file.stem
    target = directory / f"{stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, str(source_file), "-o", tmp],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def has_avx512_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def _compile_and_load(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    """Build ``source`` with ``flags`` (or find the cached build) and load it; raises on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    return ctypes.CDLL(str(build(compiler, source_file=source, flags=flags)))


def load_build(dp: bool) -> ctypes.CDLL:
    """Build (or find in the cache) and load one of the two GEMV builds; raises on failure."""
    source, flags = (DP_SOURCE, DP_FLAGS) if dp else (SOURCE, FLAGS)
    lib = _compile_and_load(source, flags)
    for name in ("bf16_gemv", "bf16_gemv_f32"):
        getattr(lib, name).argtypes = _ARGTYPES
        getattr(lib, name).restype = ctypes.c_int
    lib.max_rows = DP_MAX_ROWS if dp else MAX_ROWS
    return lib


def _load() -> ctypes.CDLL:
    if has_avx512_bf16():
        try:
            lib = load_build(dp=True)
            if not _self_check(lib):
                return lib
        except (OSError, RuntimeError):
            pass  # an older compiler without -mavx512bf16: the AVX2 build below
    return load_build(dp=False)


def _unsupported_platform() -> str:
    if env_flag("ERNIE_NO_KERNELS"):
        return "disabled by ERNIE_NO_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability}, needs AVX2 + FMA"
    return ""


def _self_check(lib: ctypes.CDLL) -> str:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 45, generator=gen).bfloat16()
    w = torch.randn(37, 45, generator=gen).bfloat16()
    b = torch.randn(37, generator=gen).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    out = _call(lib, x, w, b, 1)
    ok = torch.allclose(out.float(), ref, rtol=2**-7, atol=1e-3 * float(ref.abs().max()))
    return "" if ok else "self-check against F.linear failed"


def _guarded(load, self_check) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") when the platform suits, it builds and loads, and its self-check passes;
    else (None, why). Any failure means "use torch instead", never an error for the user."""
    try:
        reason = _unsupported_platform()
        if reason:
            return None, reason
        lib = load()
        reason = self_check(lib)
    except Exception as err:  # noqa: BLE001
        reason = f"{type(err).__name__}: {err}"
    return (None, reason) if reason else (lib, "")


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    global unavailable_reason
    lib, unavailable_reason = _guarded(_load, _self_check)
    return lib


def gemv_available() -> bool:
    """True when the compiled kernel loaded and passed its self-check (decided once per process)."""
    return _library() is not None


def dp_in_use() -> bool:
    """True when the loaded GEMV is the AVX512-BF16 build."""
    lib = _library()
    return lib is not None and lib.max_rows == DP_MAX_ROWS


def max_rows() -> int:
    """Rows of x the loaded build takes (16 for the AVX512-BF16 build, else 8)."""
    lib = _library()
    return lib.max_rows if lib is not None else MAX_ROWS


def _call(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int):
    """The C call on checked tensors, x (..., K) contiguous: about 5 of the ~7 us per call."""
    K, N = x.shape[-1], weight.shape[0]
    out = torch.empty((*x.shape[:-1], N), dtype=torch.bfloat16)  # no view afterwards: views cost
    bias_ptr = None if bias is None else bias.data_ptr()
    M = x.numel() // K
    status = lib.bf16_gemv(
        x.data_ptr(), M, K, weight.data_ptr(), N, weight.stride(0), bias_ptr, out.data_ptr(), threads
    )
    if status != 0:
        raise RuntimeError(f"bf16_gemv returned {status}")
    return out


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, most_rows: int | None = None,
           name: str = "bf16_gemv") -> None:
    """Raise ValueError unless x (..., K), weight (N, K) and bias (N,) suit the kernel. Kept cheap:
    it runs on every decode product."""
    bf16 = torch.bfloat16
    if x.dtype != bf16 or weight.dtype != bf16 or not (x.is_cpu and weight.is_cpu):
        raise ValueError(f"{name} needs bf16 CPU tensors for x and weight")
    if weight.dim() != 2 or x.dim() == 0:
        raise ValueError(f"{name}: x {tuple(x.shape)} must be (..., K) and weight {tuple(weight.shape)} (N, K)")
    (N, K), (row_stride, col_stride) = weight.shape, weight.stride()
    if x.shape[-1] != K or col_stride != 1 or (row_stride < K and N > 1):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be (N, {x.shape[-1]}) with unit column stride")
    most_rows = max_rows() if most_rows is None else most_rows
    if not 1 <= x.numel() // max(K, 1) <= most_rows:
        raise ValueError(f"{name}: x {tuple(x.shape)} must have 1 to {most_rows} rows")
    if bias is not None and (bias.dtype != bf16 or not bias.is_cpu or bias.shape != (N,) or bias.stride(0) != 1):
        raise ValueError(f"{name}: bias must be a contiguous bf16 CPU tensor of shape ({N},)")


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None):
    """``F.linear(x, weight, bias)`` for bf16 CPU tensors with at most ``max_rows()`` rows of x.

    x (..., K); weight (N, K) with unit column stride and any row stride (a view such as
    ``stacked[e]`` works without a copy); bias (N,) or None. Returns a new (..., N) bf16 tensor:
    fp32 sums rounded once to bf16. ``threads`` defaults to ``torch.get_num_threads()``.
    Raises ValueError on misuse, RuntimeError when the kernel is unavailable.
    """
    _check(x, weight, bias)
    lib = _library()
    if lib is None:
        raise RuntimeError(f"bf16_gemv is unavailable: {unavailable_reason}")
    x = x if x.is_contiguous() else x.contiguous()
    return _call(lib, x, weight, bias, threads or torch.get_num_threads())


# --- fused elementwise passes (csrc/bf16_ops.c) ---------------------------------------------------
#
# Each replaces a chain of torch ops on bf16 CPU activations with one pass that rounds where torch
# rounds. Callers use them only for inference (no autograd) and fall back to torch whenever they
# do not apply; the self-check holds each to that torch chain, bit for bit.

ops_unavailable_reason = ""


def _load_ops() -> ctypes.CDLL:
    lib = _compile_and_load(OPS_SOURCE, OPS_FLAGS)
    lib.bf16_rope_half.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int]
    lib.bf16_rope_half.restype = ctypes.c_int
    lib.bf16_attn_decode.argtypes = [_ptr, _ptr, _ptr, _ptr] + [_i64] * 17 + [ctypes.c_float, _ptr, _int]
    lib.bf16_attn_decode.restype = ctypes.c_int
    return lib


def _ops_self_check(lib: ctypes.CDLL) -> str:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, 3, 2, 20, generator=gen).bfloat16()
    cos, sin = torch.randn(7, 20, generator=gen), torch.randn(7, 20, generator=gen)
    if not torch.equal(_rope_half(lib, qkv[:, :2], cos, sin, 1), rotate_vision_torch(qkv[:, :2], cos, sin)):
        return "self-check of rope_half failed"
    q, k, v = (torch.randn(1, h, t, 16, generator=gen).bfloat16() for h, t in ((4, 2), (2, 70), (2, 70)))
    mask = torch.rand(1, 1, 2, 70, generator=gen) > 0.3
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    if not torch.allclose(_attn_decode(lib, q, k, v, mask, 0.25, 1).float(), ref, rtol=2 ** -7, atol=1e-2):
        return "self-check of attn_decode failed"
    return ""


@lru_cache(maxsize=1)
def _ops_library() -> ctypes.CDLL | None:
    global ops_unavailable_reason
    lib, ops_unavailable_reason = _guarded(_load_ops, _ops_self_check)
    return lib


def ops_available() -> bool:
    """True when the fused elementwise library loaded and passed its self-check (once per process)."""
    return _ops_library() is not None


def _rope_half(lib, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, threads: int) -> torch.Tensor:
    N, D = x.shape[0], x.shape[-1]
    groups = x.numel() // (N * D) if N * D else 0
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    status = lib.bf16_rope_half(x.data_ptr(), N, groups, D, x.stride(0), x.stride(-2) if x.dim() > 2 else D,
                                cos.data_ptr(), sin.data_ptr(), out.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"bf16_rope_half returned {status}")
    return out


def rope_half_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope_half`` takes these: bf16 CPU x (N, ..., D) with unit stride on an even D
    whose middle dims flatten to evenly spaced groups (q and k of a fused qkv output, (N, 2, H, D),
    qualify without a copy), fp32 contiguous cos/sin (N, D), nothing autograd tracks, and the
    library loaded."""
    return (x.dtype == torch.bfloat16 and x.is_cpu and x.dim() >= 2 and x.stride(-1) == 1
            and x.shape[-1] % 2 == 0 and not (torch.is_grad_enabled() and x.requires_grad)
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and cos.is_cpu and sin.is_cpu
            and cos.is_contiguous() and sin.is_contiguous() and cos.shape == (x.shape[0], x.shape[-1])
            and sin.shape == cos.shape and _even_groups(x) and _ops_library() is not None)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``model.backends.base.rotate_vision_torch(x, cos, sin)`` in one pass, bit-identical: a new contiguous
    bf16 tensor shaped like x. Raises ValueError unless ``rope_half_applies``."""
    if not rope_half_applies(x, cos, sin):
        raise ValueError(f"rope_half does not take x {tuple(x.shape)} {x.dtype} {x.device} with cos "
                         f"{tuple(cos.shape)} {cos.dtype} (or the library is unavailable: {ops_unavailable_reason})")
    return _rope_half(_ops_library(), x, cos, sin, torch.get_num_threads())


ATTN_MAX_ROWS, ATTN_MAX_D = 16, 256  # query rows per kv head (G * T) and head dim the C code takes


def _attn_decode(lib, q, k, v, mask, scale: float, threads: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, T, Hq, D, dtype=torch.bfloat16)
    mask_ptr, msB, msT = None, 0, 0
    if mask is not None:
        mask = mask.expand(mask.shape[0], 1, T, S)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_ptr, msB, msT = mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2)
    status = lib.bf16_attn_decode(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_ptr, B, Hq, Hkv, T, S, D,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), msB, msT, scale, out.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"bf16_attn_decode returned {status}")
    return out.transpose(1, 2)  # (B, Hq, T, D), a view of (B, T, Hq, D)


def attn_decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``attn_decode`` takes these: bf16 CPU q (B, Hq, T, D), k and v (B, Hkv, S, D) with
    unit stride along D, Hq a multiple of Hkv with at most ATTN_MAX_ROWS query rows per kv head
    (decode: T = 1 or a few), D a multiple of 8 up to ATTN_MAX_D, a bool mask (B|1, 1, T|1, S) or
    None (causal aligned to the end), nothing autograd tracks, and the library loaded."""
    if not (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and (mask is None or mask.dim() == 4)):
        return False
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask_ok = mask is None or (mask.dtype == torch.bool and mask.is_cpu and mask.shape[0] in (1, B)
                               and mask.shape[1] == 1 and mask.shape[2] in (1, T) and mask.shape[3] == S)
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.is_cpu and k.is_cpu and v.is_cpu
            and mask_ok and T <= S and k.shape[0] == B and k.shape[3] == D
            and Hkv > 0 and Hq % Hkv == 0 and (Hq // Hkv) * T <= ATTN_MAX_ROWS and 0 < D <= ATTN_MAX_D
            and D % 8 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and _ops_library() is not None)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` for a few
    queries (a decode step), in fp32 with one rounding to bf16; a query that sees no key gets
    zeros. mask None: query t of T sees key slots 0 .. S - T + t (the new tokens are the last T).
    Returns (B, Hq, T, D) as a view of a contiguous (B, T, Hq, D) tensor (what the output
    projection wants). Raises ValueError unless ``attn_decode_applies``."""
    if not attn_decode_applies(q, k, v, mask):
        raise ValueError(f"attn_decode does not take q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, mask "
                         f"{None if mask is None else tuple(mask.shape)} (or the library is unavailable: "
                         f"{ops_unavailable_reason})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _attn_decode(_ops_library(), q, k, v, mask, scale, torch.get_num_threads())


def _even_groups(x: torch.Tensor) -> bool:
    """The dims between N and D flatten to one dim of non-overlapping groups, evenly strided."""
    if x.dim() == 2:
        return True
    expected = x.stride(-2)
    for size, stride in zip(reversed(x.shape[1:-1]), reversed(x.stride()[1:-1])):
        if size != 1 and stride != expected:
            return False
        expected = stride * size
    return x.stride(-2) >= x.shape[-1]


# --- AMX tiles (csrc/bf16_amx.c) --------------------------------------------------------------------

amx_unavailable_reason = ""
AMX_MAX_ROWS = 1 << 20  # what the C code takes; which products are worth it is model/backends/cpu/linear.py's call


def has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check()) and has_avx512_bf16()


def _load_amx() -> ctypes.CDLL:
    if not has_amx():
        raise RuntimeError("no AMX-BF16 on this CPU")
    lib = _compile_and_load(AMX_SOURCE, AMX_FLAGS)
    lib.bf16_amx_linear.argtypes = _ARGTYPES
    lib.bf16_amx_linear.restype = ctypes.c_int
    lib.bf16_amx_init.restype = ctypes.c_int
    if lib.bf16_amx_init() != 0:
        raise RuntimeError("the kernel refused the AMX tile state (arch_prctl)")
    return lib


def _amx_self_check(lib: ctypes.CDLL) -> str:
    gen = torch.Generator().manual_seed(0)
    for M, K, N in ((5, 45, 37), (100, 64, 33)):  # tails of K, N and a second pass of rows
        x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(N, K, generator=gen).bfloat16()
        b = torch.randn(N, generator=gen).bfloat16()
        ref = F.linear(x.float(), w.float(), b.float())
        out = _amx_call(lib, x, w, b, 1)
        if not torch.allclose(out.float(), ref, rtol=2**-7, atol=1e-3 * float(ref.abs().max())):
            return "self-check of the AMX product against F.linear failed"
    return ""


@lru_cache(maxsize=1)
def _amx_library() -> ctypes.CDLL | None:
    global amx_unavailable_reason
    lib, amx_unavailable_reason = _guarded(_load_amx, _amx_self_check)
    return lib


def amx_available() -> bool:
    """True when the AMX product loaded and passed its self-check (decided once per process)."""
    return _amx_library() is not None


def _amx_call(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int):
    K, N = x.shape[-1], weight.shape[0]
    out = torch.empty((*x.shape[:-1], N), dtype=torch.bfloat16)
    status = lib.bf16_amx_linear(x.data_ptr(), x.numel() // K, K, weight.data_ptr(), N, weight.stride(0),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"bf16_amx_linear returned {status}")
    return out


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None):
    """``F.linear(x, weight, bias)`` for bf16 CPU tensors on AMX tiles: x (..., K), weight (N, K) with
    unit column stride (an expert's view of a stacked bank works), bias (N,) or None. fp32 sums
    rounded once to bf16. Raises ValueError on misuse, RuntimeError when unavailable."""
    _check(x, weight, bias, most_rows=AMX_MAX_ROWS, name="amx_linear")
    lib = _amx_library()
    if lib is None:
        raise RuntimeError(f"the AMX product is unavailable: {amx_unavailable_reason}")
    x = x if x.is_contiguous() else x.contiguous()
    return _amx_call(lib, x, weight, bias, threads or torch.get_num_threads())


# --- attention of many queries on AVX512-BF16 (csrc/bf16_flash.c) -----------------------------------

flash_unavailable_reason = ""
FLASH_SOURCE = Path(__file__).parent / "csrc" / "bf16_flash.c"
FLASH_MAX_D = 256  # head dims the C code takes: multiples of 16 up to this


def _load_flash() -> ctypes.CDLL:
    if not has_avx512_bf16():
        raise RuntimeError("no AVX512-BF16 on this CPU")
    lib = _compile_and_load(FLASH_SOURCE, DP_FLAGS)
    lib.bf16_flash_attn.argtypes = [_ptr, _ptr, _ptr] + [_i64] * 15 + [_int, _i64, ctypes.c_float, _ptr, _int]
    lib.bf16_flash_attn.restype = ctypes.c_int
    return lib


def _flash_self_check(lib: ctypes.CDLL) -> str:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 70, 32, generator=gen).bfloat16() for h in (4, 2, 2))
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
        if not torch.allclose(_flash_call(lib, q, k, v, causal, 0, 32 ** -0.5, 1).float(), ref, rtol=2 ** -6, atol=2e-2):
            return f"self-check of flash_attn (causal={causal}) failed"
    return ""


@lru_cache(maxsize=1)
def _flash_library() -> ctypes.CDLL | None:
    global flash_unavailable_reason
    lib, flash_unavailable_reason = _guarded(_load_flash, _flash_self_check)
    return lib


def _flash_call(lib, q, k, v, causal: bool, offset: int, scale: float, threads: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    out = torch.empty(B, T, Hq, D, dtype=torch.bfloat16)
    status = lib.bf16_flash_attn(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, Hq, k.shape[1], T, k.shape[2], D,
                                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], int(causal), offset, scale,
                                 out.data_ptr(), threads)
    if status == 2:  # no memory for the repacked keys and values: torch's kernel needs none
        S = k.shape[2]
        mask = (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + offset) if causal else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if status != 0:
        raise RuntimeError(f"bf16_flash_attn returned {status}")
    return out.transpose(1, 2)  # (B, Hq, T, D), a view of (B, T, Hq, D)


def flash_attn_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``flash_attn`` takes these: bf16 CPU q (B, Hq, T, D), k and v (B, Hkv, S, D) with unit
    stride along D, Hq a multiple of Hkv, D a multiple of 16 up to FLASH_MAX_D, nothing autograd
    tracks, and the library loaded (AVX512-BF16 CPUs)."""
    if not (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape):
        return False
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.is_cpu and k.is_cpu and v.is_cpu
            and k.shape[0] == B and k.shape[3] == D and Hkv > 0 and Hq % Hkv == 0 and 0 < D <= FLASH_MAX_D
            and D % 16 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and _flash_library() is not None)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)`` on AVX512-BF16:
    fp32 scores and softmax, the probabilities rounded to bf16 for the product with v (as torch's
    flash kernel does), one rounding at the end. Causal aligns the queries with the *last* T keys
    (key j visible to query i when j <= i + S - T), which is SDPA's alignment when T == S.
    Returns (B, Hq, T, D) as a view of a contiguous (B, T, Hq, D) tensor. Raises ValueError unless
    ``flash_attn_applies``."""
    if not flash_attn_applies(q, k, v):
        raise ValueError(f"flash_attn does not take q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"(or the library is unavailable: {flash_unavailable_reason})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _flash_call(_flash_library(), q, k, v, causal, k.shape[2] - q.shape[2], scale, torch.get_num_threads())
