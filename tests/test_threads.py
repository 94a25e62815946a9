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
