"""Tier 1: model/backends/cpu/allocator.py keeps freed large blocks in the process (glibc Linux)."""

from __future__ import annotations

import sys

import pytest

from model.backends.cpu import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_glibc_takes_both_thresholds():
    """mallopt accepts both (it returns 0 for a value it refuses). The effect, measured on the
    benchmark checkpoint (benchmarks/README.md): 28-44 thousand minor faults per image prompt
    without it, 0-4 thousand with it; a synthetic alloc/free loop is too dependent on the heap's
    layout to assert on here."""
    allocator.keep_freed_memory.cache_clear()
    assert allocator.keep_freed_memory() is True


def test_opt_out(monkeypatch):
    monkeypatch.setenv("ERNIE_KEEP_FREED_MEMORY", "0")
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()
