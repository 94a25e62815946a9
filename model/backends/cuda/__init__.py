"""The CUDA runtime: ``backend.CudaBackend`` (what a CUDA device runs), the fused MoE in Triton
(``fused_moe``, ``moe``), fused elementwise kernels (``ops``) and the graph-captured decode step
(``decode``). Everything else is the plain torch ``Backend`` of ``model/backends/base.py``
(cuBLAS products, torch's SDPA kernels). More GPU work (quantized products: ``linear`` on packed
weights, with ``packs`` / ``pack`` at load time) overrides one operation of the interface each,
falling back to ``super()`` where it does not apply.
"""
