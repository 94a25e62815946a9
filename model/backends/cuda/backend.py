"""``CudaBackend``: the operations a CUDA device runs (see model/backends/cuda/__init__.py)."""

from __future__ import annotations

from model.backends.base import Backend


class CudaBackend(Backend):
    """Torch's CUDA kernels for products and attention; each MoE layer through the fused Triton
    kernel of model/backends/cuda/fused_moe.py (both banks, no host-side split). The decode loop's
    graph-captured step is model/backends/cuda/decode.py, run by model/generation/device_loop.py."""

    name = "cuda"

    def modality_moe(self, moe, x, vision_mask):
        from model.backends.cuda.moe import modality_moe  # here: importing it imports Triton

        return modality_moe(moe, x, vision_mask)
