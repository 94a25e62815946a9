"""Where the operations of the architecture run: one folder per device kind (``cpu``, ``cuda``),
below the architecture and the checkpoint reader, never importing them."""
