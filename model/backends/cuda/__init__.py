"""The CUDA runtime: ``backend.CudaBackend``, what a CUDA device runs.

Today it is the plain torch ``Backend`` of ``model/backends/base.py`` (cuBLAS products, torch's
SDPA kernels, the MoE dispatch in torch ops), the route CUDA always took. The GPU work lands
here: CUDA graphs for the decode step, fused MoE expert kernels (override ``experts``),
quantized products (``linear`` on packed weights, with ``packs`` / ``pack`` at load time), each
overriding one operation of the interface and falling back to ``super()`` where it does not apply.
"""
