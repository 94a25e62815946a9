"""Intra-op threads for a loaded model: one for a model too narrow to split its products.

torch runs a CPU operation on as many OpenMP threads as there are cores. A model a few hundred
wide (ernie-tiny: text 128, vision 96) has products of microseconds: a decode step's (16 rows of
128 x 256) take ~10 us on one core, so a second thread gains nothing there, and every parallel
region waits for all of its threads, a whole time slice (4-8 ms) whenever another thread or
process holds a core. Measured on a 2-core EPYC with one busy neighbour: a (256, 96) x (96, 384)
product 0.19 ms on one thread, 8 ms (median) on two. And the other core is what preprocesses
the next pictures (``describe --each``, ``ernie serve``) while the model runs: ernie-tiny
describing 64 pictures in-process with the preprocessing in a thread beside it, three rounds
(load 1.9): 25-36 files/s at batch 1 and 57-87 at batch 16 on one thread, 23-29 and 46-71 on
two. So such a model runs on
one thread; a real checkpoint (products of millions of multiply-adds per row, weights read at
memory speed by the GEMV kernels) keeps every core.

``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) set by the user wins: then nothing is changed.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

# A model whose widest product (per row: width x hidden width, text or vision) has fewer
# multiply-adds than this runs on one thread. ernie-tiny: 128 x 256 = 33k; ERNIE 4.5 VL 28B:
# 2560 x 12288 = 31M, vision 1280 x 5120 = 6.6M.
ONE_THREAD_BELOW_MACS = 1 << 20


def widest_product(config) -> int:
    """Multiply-adds per row of the model's widest product (text MLP or vision MLP)."""
    text, vision = config.text, config.vision
    return max(text.hidden_size * text.intermediate_size, vision.hidden_size * vision.intermediate_size)


def fit_threads(model) -> int | None:
    """One intra-op thread for a narrow model (see the module docstring); returns the count set, or
    None when nothing was changed (a wide model, or the user chose through the environment)."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    config = getattr(model, "config", None)
    if config is None or widest_product(config) >= ONE_THREAD_BELOW_MACS:
        return None
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return 1


# --- independent parts of a batch on the cores that intra-op threads leave idle ----------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def part_workers() -> int:
    """Parts of a batch worth running at once: the cores this process may use, when torch runs one
    intra-op thread (a narrow model, see ``fit_threads``, or the user's OMP_NUM_THREADS=1); else 1,
    since the intra-op threads already use the cores. A part runs whole on its thread (each
    picture's products and attention), so a core another process holds slows that part only,
    with no barrier to wait at per product."""
    if torch.get_num_threads() != 1:
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def map_parts(fn: Callable[[Any], Any], parts: list) -> list:
    """``[fn(part) for part in parts]``, the parts on ``part_workers()`` threads at once (the
    caller's thread runs the first; autograd's mode follows it into the others)."""
    workers = min(part_workers(), len(parts))
    if workers <= 1:
        return [fn(part) for part in parts]
    grad = torch.is_grad_enabled()
    pool = _pool(workers - 1)
    futures = [pool.submit(_with_grad_mode, grad, fn, part) for part in parts[1:]]
    first = fn(parts[0])
    return [first] + [f.result() for f in futures]


def _with_grad_mode(grad: bool, fn: Callable[[Any], Any], part: Any) -> Any:
    with torch.set_grad_enabled(grad):
        return fn(part)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="ernie-parts")
        return _POOL
