"""``CudaBackend``: the operations a CUDA device runs (see model/backends/cuda/__init__.py)."""

from __future__ import annotations

from model.backends.base import Backend


class CudaBackend(Backend):
    """Torch's CUDA kernels for products and attention; each MoE layer through the fused Triton
    kernel of model/backends/cuda/fused_moe.py (both banks, no host-side split). The decode loop's
    graph-captured step is model/backends/cuda/decode.py, run by model/generation/device_loop.py."""

    name = "cuda"

    def quant_linear(self, x, qw, bias=None):
        from model.backends.cuda import quant_matmul  # here: importing it imports Triton

        if quant_matmul.applies(x, qw):
            return quant_matmul.quant_linear(x, qw, bias)
        return super().quant_linear(x, qw, bias)

    def modality_moe(self, moe, x, vision_mask):
        from model.backends.cuda.moe import modality_moe  # here: importing it imports Triton

        return modality_moe(moe, x, vision_mask)
