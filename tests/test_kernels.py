"""Tier 1: the compiled bf16 GEMV of model/backends/cpu/kernels.py against fp32 F.linear (the fused elementwise
passes: tests/test_kernel_ops.py).

The kernel sums in fp32 and rounds once to bf16, so it may differ from the fp32 product by half
a bf16 ulp (2^-9 relative) plus what a different fp32 summation order gives. Skipped where the
kernel cannot be built (no compiler, no AVX2); the opt-out test runs everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.backends.cpu import kernels
from model.backends import select_backend
from model.backends.base import rotate_vision_torch

needs_kernel = pytest.mark.skipif(not kernels.gemv_available(), reason=f"no bf16 GEMV: {kernels.unavailable_reason}")


def _assert_matches_fp32(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-3 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("K", [16, 40, 1536, 2560, 2567])
@pytest.mark.parametrize("N", [1, 7, 64, 3072])
def test_matches_fp32_linear(M, K, N):
    gen = torch.Generator().manual_seed(M * 10_000 + K + N)
    x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(N, K, generator=gen).bfloat16()
    _assert_matches_fp32(kernels.bf16_gemv(x, w), x, w)


@needs_kernel
@pytest.mark.parametrize("M", [1, 4, 5])
def test_bias_and_strided_expert_view(M):
    gen = torch.Generator().manual_seed(M)
    stacked = torch.randn(4, 70, 99, generator=gen).bfloat16()  # (E, N, K)
    x, b = torch.randn(M, 99, generator=gen).bfloat16(), torch.randn(70, generator=gen).bfloat16()
    for e in range(4):
        _assert_matches_fp32(kernels.bf16_gemv(x, stacked[e], b), x, stacked[e], b)
    padded = torch.randn(70, 128, generator=gen).bfloat16()[:, :99]  # row stride 128, not K
    _assert_matches_fp32(kernels.bf16_gemv(x, padded, b), x, padded, b)


@needs_kernel
def test_rounds_like_torch():
    """Apart from summation order, the result is torch's round-to-nearest-even of the fp32 sum."""
    x = torch.eye(8, 64).bfloat16()  # each output is exactly one weight plus a bias: no summation error
    w = torch.randn(300, 64).bfloat16()
    b = (torch.randn(300) * 1e-3).bfloat16()
    ref = (w[:, :8].t().float() + b.float()).bfloat16()
    assert torch.equal(kernels.bf16_gemv(x, w, b), ref)


@needs_kernel
def test_leading_dims_and_non_contiguous_x():
    x, w = torch.randn(2, 3, 50).bfloat16(), torch.randn(33, 50).bfloat16()
    out = kernels.bf16_gemv(x, w)
    assert out.shape == (2, 3, 33)
    _assert_matches_fp32(out, x, w)
    xt = torch.randn(50, 2).bfloat16().t()  # (2, 50), column-major
    assert torch.equal(kernels.bf16_gemv(xt, w), kernels.bf16_gemv(xt.contiguous(), w))


@needs_kernel
@pytest.mark.parametrize("M", [1, 3, 8])
def test_thread_counts_agree(M):
    x, w, b = torch.randn(M, 2567).bfloat16(), torch.randn(1000, 2567).bfloat16(), torch.randn(1000).bfloat16()
    one = kernels.bf16_gemv(x, w, b, threads=1)
    assert torch.equal(kernels.bf16_gemv(x, w, b, threads=2), one)


@needs_kernel
@pytest.mark.parametrize(
    "x, w, b",
    [
        (torch.randn(1, 16), torch.randn(4, 16).bfloat16(), None),  # fp32 x
        (torch.randn(1, 16).bfloat16(), torch.randn(4, 16), None),  # fp32 weight
        (torch.randn(17, 16).bfloat16(), torch.randn(4, 16).bfloat16(), None),  # more rows than either build takes
        (torch.randn(1, 16).bfloat16(), torch.randn(4, 15).bfloat16(), None),  # K mismatch
        (torch.randn(1, 16).bfloat16(), torch.randn(16, 4).bfloat16().t(), None),  # column stride 4
        (torch.randn(1, 16).bfloat16(), torch.randn(4, 16).bfloat16(), torch.randn(5).bfloat16()),  # bias length
        (torch.randn(1, 16).bfloat16(), torch.randn(4, 16).bfloat16(), torch.randn(4)),  # fp32 bias
        (torch.randn(1, 16).bfloat16(), torch.randn(4, 16).bfloat16()[0], None),  # 1-D weight
    ],
)
def test_misuse_raises_value_error(x, w, b):
    with pytest.raises(ValueError):
        kernels.bf16_gemv(x, w, b)


@needs_kernel
def test_one_row_past_the_build_limit_raises():
    rows = kernels.max_rows() + 1
    with pytest.raises(ValueError):
        kernels.bf16_gemv(torch.randn(rows, 16).bfloat16(), torch.randn(4, 16).bfloat16())


def _builds() -> list[tuple[str, object]]:
    """Every GEMV build that loads here: the AVX2 one, and the AVX512-BF16 one on CPUs that have it."""
    out = []
    for dp in (False, True):
        if dp and not kernels.has_avx512_bf16():
            continue
        try:
            out.append(("dp" if dp else "avx2", kernels.load_build(dp)))
        except (OSError, RuntimeError):
            pass
    return out


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("K", [31, 32, 33, 2560])
def test_each_build_matches_fp32_up_to_its_rows(M, K):
    """Both builds, called directly (the one in use is only one of them), with and without bias,
    at every row count each takes; K around the 32-wide step of the AVX512-BF16 build."""
    gen = torch.Generator().manual_seed(M * 100 + K)
    x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(77, K, generator=gen).bfloat16()
    b = torch.randn(77, generator=gen).bfloat16()
    ran = 0
    for name, lib in _builds():
        if M > lib.max_rows:
            continue
        for bias in (None, b):
            for threads in (1, 2):
                _assert_matches_fp32(kernels._call(lib, x, w, bias, threads), x, w, bias)
        ran += 1
    if not ran:
        pytest.skip(f"no build here takes {M} rows")


@needs_kernel
def test_cache_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_CACHE", str(tmp_path))
    compiler = kernels._compiler()
    first = kernels.build(compiler)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert kernels.build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def test_opt_out_compiles_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_CACHE", str(tmp_path))
    monkeypatch.setenv("ERNIE_NO_KERNELS", "1")
    kernels._library.cache_clear()
    kernels._ops_library.cache_clear()
    try:
        assert not kernels.gemv_available() and not kernels.ops_available()
        assert "ERNIE_NO_KERNELS" in kernels.unavailable_reason
        assert "ERNIE_NO_KERNELS" in kernels.ops_unavailable_reason
        x, angles = torch.randn(6, 2, 3, 8).bfloat16(), torch.randn(6, 8)
        assert not kernels.rope_half_applies(x, angles.cos(), angles.sin())
        cos, sin = angles.cos(), angles.sin()
        assert torch.equal(select_backend("cpu").rotate_vision(x, cos, sin), rotate_vision_torch(x, cos, sin))
        assert not (tmp_path / "kernels").exists()
    finally:
        kernels._library.cache_clear()  # the next caller decides again, without the opt-out
        kernels._ops_library.cache_clear()


needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason=f"no AMX product: {kernels.amx_unavailable_reason}")


@needs_amx
@pytest.mark.parametrize("M", [1, 3, 16, 17, 96, 97, 130, 300])
@pytest.mark.parametrize("K,N", [(32, 16), (45, 37), (2560, 1024), (1536, 33)])
def test_amx_matches_fp32_linear(M, K, N):
    """Tails of rows (groups of 16, passes of 96), of K (steps of 32) and of N (blocks of 16)."""
    gen = torch.Generator().manual_seed(M * 7 + K + N)
    x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(N, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16()
    _assert_matches_fp32(kernels.amx_linear(x, w), x, w)
    _assert_matches_fp32(kernels.amx_linear(x, w, b), x, w, b)


@needs_amx
def test_amx_expert_views_leading_dims_and_threads():
    gen = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 50, 70, generator=gen).bfloat16()  # (E, N, K): rows K apart
    x = torch.randn(2, 20, 70, generator=gen).bfloat16()
    for e in range(3):
        out = kernels.amx_linear(x, stacked[e])
        assert out.shape == (2, 20, 50)
        _assert_matches_fp32(out, x, stacked[e])
    padded = torch.randn(50, 96, generator=gen).bfloat16()[:, :70]  # row stride 96, not K
    _assert_matches_fp32(kernels.amx_linear(x, padded), x, padded)
    xt = torch.randn(70, 20, generator=gen).bfloat16().t()  # column-major x is copied first
    assert torch.equal(kernels.amx_linear(xt, padded), kernels.amx_linear(xt.contiguous(), padded))
    big_x, big_w = torch.randn(40, 256, generator=gen).bfloat16(), torch.randn(300, 256, generator=gen).bfloat16()
    assert torch.equal(kernels.amx_linear(big_x, big_w, threads=1), kernels.amx_linear(big_x, big_w, threads=2))


@needs_amx
def test_amx_nan_in_a_weight_tail_stays_out_of_other_rows():
    """The zero-padded tail copies keep what lies past a row of W (here a NaN) out of the sums."""
    storage = torch.randn(20, 40).bfloat16()
    storage[:, 33:] = float("nan")
    w = storage[:, :33]
    x = torch.randn(4, 33).bfloat16()
    out = kernels.amx_linear(x, w)
    assert not out.isnan().any()
    _assert_matches_fp32(out, x, w)


@needs_amx
def test_amx_misuse_raises_value_error():
    with pytest.raises(ValueError, match="amx_linear"):
        kernels.amx_linear(torch.randn(3, 16).bfloat16(), torch.randn(4, 15).bfloat16())
