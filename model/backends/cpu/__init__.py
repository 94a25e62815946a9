"""The CPU runtime: compiled kernels (``kernels``, C sources in ``csrc/``), the bf16 linear routes
(``linear``), oneDNN weight packing and expert banks (``packing``) and the allocator setting
(``allocator``)."""
