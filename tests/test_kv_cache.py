"""StaticKVCache: writes land in the requested slots, storage never moves, overflow is typed."""

import pytest
import torch

from model.config import tiny
from model.errors import ContextLengthError
from model.generation.kv_cache import StaticKVCache

TEXT = tiny().text  # 3 layers, 2 kv heads, head_dim 16


def _kv(B, T, fill):
    k = torch.full((B, TEXT.num_key_value_heads, T, TEXT.head_dim), float(fill))
    return k, -k


def test_shapes_and_initial_state():
    c = StaticKVCache(TEXT, batch_size=2, max_len=10)
    assert c.seq_len == 0 and c.max_len == 10 and c.num_layers == 3
    assert c.keys[0].shape == (2, 2, 10, 16)


def test_prefill_then_decode_land_in_their_slots():
    c = StaticKVCache(TEXT, batch_size=1, max_len=8)
    k, v = _kv(1, 3, 1.0)
    k_all, v_all = c.update(0, k, v, torch.arange(3))
    assert k_all.shape == (1, 2, 3, 16) and c.seq_len == 3
    k, v = _kv(1, 1, 7.0)
    k_all, v_all = c.update(0, k, v, torch.tensor([3]))
    assert k_all.shape[2] == 4 and c.seq_len == 4
    assert torch.equal(k_all[0, 0, :, 0], torch.tensor([1.0, 1.0, 1.0, 7.0]))
    assert torch.equal(v_all[0, 1, :, 5], torch.tensor([-1.0, -1.0, -1.0, -7.0]))
    # untouched slots stay zero; other layers are independent
    assert c.keys[0][0, 0, 4:].abs().sum() == 0
    assert c.get_seq_length(1) == 0


def test_each_layer_keeps_its_own_values():
    c = StaticKVCache(TEXT, batch_size=1, max_len=4)
    for layer in range(3):
        c.update(layer, *_kv(1, 2, layer + 1), torch.arange(2))
    for layer in range(3):
        assert torch.all(c.keys[layer][:, :, :2] == layer + 1)


def test_no_reallocation_across_updates():
    c = StaticKVCache(TEXT, batch_size=2, max_len=16)
    ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in zip(c.keys, c.values)]
    k_all, _ = c.update(0, *_kv(2, 5, 1), torch.arange(5))
    assert k_all.data_ptr() == ptrs[0][0]  # a view, not a copy
    for pos in range(5, 16):
        for layer in range(3):
            c.update(layer, *_kv(2, 1, pos), torch.tensor([pos]))
    assert [(k.data_ptr(), v.data_ptr()) for k, v in zip(c.keys, c.values)] == ptrs
    assert c.seq_len == 16


def test_overflow_is_a_context_length_error():
    c = StaticKVCache(TEXT, batch_size=1, max_len=4)
    c.update(0, *_kv(1, 4, 1), torch.arange(4))
    with pytest.raises(ContextLengthError, match="holds 4 tokens"):
        c.update(0, *_kv(1, 1, 1), torch.tensor([4]))
    assert c.seq_len == 4  # the failed write left the cache as it was


def test_mismatched_cache_position_is_rejected():
    c = StaticKVCache(TEXT, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="one per new token"):
        c.update(0, *_kv(1, 2, 1), torch.arange(3))


def test_reset_empties_without_reallocating():
    c = StaticKVCache(TEXT, batch_size=1, max_len=4)
    ptr = c.keys[2].data_ptr()
    for layer in range(3):
        c.update(layer, *_kv(1, 3, 2), torch.arange(3))
    c.reset()
    assert c.seq_len == 0 and c.keys[2].data_ptr() == ptr and c.keys[2].abs().sum() == 0


def test_dtype_is_kept_and_inputs_cast():
    c = StaticKVCache(TEXT, batch_size=1, max_len=4, dtype=torch.bfloat16)
    k_all, _ = c.update(0, *_kv(1, 1, 1.5), torch.tensor([0]))
    assert k_all.dtype == torch.bfloat16 and float(k_all[0, 0, 0, 0]) == 1.5
