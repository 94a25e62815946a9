"""Shared test settings.

Tiny models run faster on one thread than on several (and the test machine has 2 cores);
OMP_NUM_THREADS is set before torch loads so its pools are sized once.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
