"""The CUDA runtime (GPU work lands here: CUDA graphs, fused MoE kernels, quantized products).

Today a CUDA device runs the plain torch operations of ``model.backends.base``."""
