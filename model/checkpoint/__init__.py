"""Reading checkpoints: where they live (``hub``), the names and shapes of both on-disk layouts
(``weights``), and the loader that fills a model from memory-mapped safetensors (``loading``).
Imports only the config, the errors and the backends below it."""
