"""Tier 1: model/backends/cpu/threads.py runs a narrow model on one intra-op thread, leaves a wide one
(and a user's OMP_NUM_THREADS) alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from model.backends.cpu import threads  # noqa: E402
from model.config import ErnieVLConfig, tiny  # noqa: E402


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_narrow_model_runs_on_one_thread(restore_threads):
    torch.set_num_threads(2)
    assert threads.widest_product(tiny()) < threads.ONE_THREAD_BELOW_MACS
    assert threads.fit_threads(SimpleNamespace(config=tiny())) == 1
    assert torch.get_num_threads() == 1


def test_a_wide_model_and_the_users_choice_are_left_alone(restore_threads, monkeypatch):
    torch.set_num_threads(2)
    wide = ErnieVLConfig()  # the defaults: ERNIE 4.5 VL 28B's widths
    assert threads.widest_product(wide) >= threads.ONE_THREAD_BELOW_MACS
    assert threads.fit_threads(SimpleNamespace(config=wide)) is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.fit_threads(SimpleNamespace(config=tiny())) is None and torch.get_num_threads() == 2


def test_parts_run_at_once_in_order_and_keep_the_callers_grad_mode(restore_threads, monkeypatch):
    monkeypatch.setattr(threads, "part_workers", lambda: 3)
    seen = []

    def fn(part):
        seen.append(part)
        return part * 10, torch.is_grad_enabled()

    with torch.no_grad():
        out = threads.map_parts(fn, [1, 2, 3, 4])
    assert [x for x, _ in out] == [10, 20, 30, 40] and sorted(seen) == [1, 2, 3, 4]
    assert not any(grad for _, grad in out), "a worker thread built autograd graphs under no_grad"


def test_parts_use_the_idle_cores_only_when_torch_runs_one_thread(restore_threads):
    torch.set_num_threads(2)
    assert threads.part_workers() == 1
    torch.set_num_threads(1)
    assert threads.part_workers() >= 1


def test_split_items_gives_consecutive_runs_of_about_equal_patches():
    from model.ernie_vl import split_items

    grids = [(1, 16, 16), (1, 14, 20), (1, 12, 24), (2, 8, 8), (1, 16, 16)]
    for parts in (1, 2, 3, 8):
        runs = split_items(grids, parts)
        assert 1 <= len(runs) <= min(parts, len(grids))
        assert runs[0][:3:2] == (0, 0) and runs[-1][1] == len(grids)
        assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(runs, runs[1:]))  # contiguous
        assert runs[-1][3] == sum(t * h * w for t, h, w in grids)
    assert [r[:2] for r in split_items(grids, 2)] == [(0, 2), (2, 5)]  # 536 | 672 patches
