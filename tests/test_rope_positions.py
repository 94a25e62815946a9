"""Tier 1: 3D positions (hand-computed), the 3D / 2D rotary tables, patch order.

Live checks against the reference rotary code run when transformers is installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.config import tiny
from model.positions import decode_positions, get_rope_index
from model.rope import (apply_text_rope, apply_vision_rope, rotate_half, rotate_pairs, rotate_vision,
                        text_rope, vision_rope)
from model.vision import patch_positions

CFG = tiny()  # image 3, image start 4 / end 5, video start 6 / end 7, video 8; mrope (3, 3, 2)
TXT = 20


def _row(*segments):
    """ids and mm types for segments: int n = n text tokens, ("img"|"vid", tokens)."""
    ids, types = [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += [TXT] * seg
            types += [0] * seg
        else:
            kind, n = seg
            start, tok, end, typ = (4, 3, 5, 1) if kind == "img" else (6, 8, 7, 2)
            ids += [start] + [tok] * n + [end]
            types += [0] + [typ] * n + [0]
    return torch.tensor([ids]), torch.tensor([types])


def test_text_image_text_positions_by_hand():
    # [BOS a b] [START] [4 image tokens of a 1x4x4 grid -> 2x2 after merge] [END] [c d]
    ids, types = _row(3, ("img", 4), 2)
    pos, delta = get_rope_index(CFG, ids, types, image_grid_thw=torch.tensor([[1, 4, 4]]))
    expected = torch.tensor([
        [0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8],  # t: the whole image sits at t = 4
        [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8],  # h: rows 4, 5
        [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8],  # w: columns 4, 5; then text resumes at 4 + max(2, 2)
    ])
    assert torch.equal(pos[:, 0], expected)
    assert delta.tolist() == [[9 - 11]]  # last position + 1 - token count


def test_video_time_axis_is_halved_and_wide_image_advances_by_its_longer_side():
    ids, types = _row(1, ("vid", 8), 1)  # video 4x4x4 -> 2 time steps of a 2x2 grid = 8 tokens
    pos, delta = get_rope_index(CFG, ids, types, video_grid_thw=torch.tensor([[4, 4, 4]]))
    assert pos[0, 0, 2:10].tolist() == [2] * 4 + [3] * 4  # t advances once per frame pair
    assert pos[1, 0, 2:10].tolist() == [2, 2, 3, 3] * 2
    assert pos[2, 0, 2:10].tolist() == [2, 3, 2, 3] * 2
    assert pos[:, 0, 10:].tolist() == [[4, 5]] * 3  # END after the 2x2 grid: 2 + max(2, 2)
    assert delta.item() == 6 - 12
    ids, types = _row(1, ("img", 12), 1)  # image 1x4x12 -> a 2x6 grid of 12 tokens
    pos, delta = get_rope_index(CFG, ids, types, image_grid_thw=torch.tensor([[1, 4, 12]]))
    assert pos[0, 0, 2:14].tolist() == [2] * 12
    assert pos[1, 0, 2:14].tolist() == [2] * 6 + [3] * 6
    assert pos[2, 0, 2:14].tolist() == list(range(2, 8)) * 2
    assert pos[:, 0, 14:].tolist() == [[8, 9]] * 3  # 2 + max(2, 6)
    assert delta.item() == 10 - 16


def test_left_padding_is_skipped():
    ids, types = _row(3, ("img", 4), 2)
    unpadded, delta = get_rope_index(CFG, ids, types, image_grid_thw=torch.tensor([[1, 4, 4]]))
    padded_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    padded_types = torch.cat([torch.zeros(1, 2, dtype=torch.long), types], dim=1)
    mask = torch.tensor([[0, 0] + [1] * ids.shape[1]])
    pos, pdelta = get_rope_index(CFG, padded_ids, padded_types, torch.tensor([[1, 4, 4]]), None, mask)
    assert torch.equal(pos[:, :, 2:], unpadded) and pos[:, :, :2].eq(0).all()
    assert torch.equal(pdelta, delta)


def test_decode_positions_continue_after_the_prompt():
    delta = torch.tensor([[-2]])
    pos = decode_positions(1, past_len=11, num_new=2, rope_deltas=delta, attention_mask=None, device="cpu")
    assert pos[:, 0].tolist() == [[9, 10]] * 3  # the token after "d" (position 8) in the by-hand test
    mask = torch.tensor([[0, 0] + [1] * 12])  # two pads before the same prompt, one new token
    pos = decode_positions(1, past_len=13, num_new=1, rope_deltas=delta, attention_mask=mask, device="cpu")
    assert pos[:, 0].tolist() == [[9]] * 3


def _plain_interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Textbook RoPE on (even, odd) pairs as complex numbers: x (B, H, T, D), positions (T,)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64), positions[:, None].double() * inv)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).float()


def test_equal_thw_positions_reduce_to_interleaved_rope():
    t = CFG.text
    positions = torch.tensor([0, 1, 5, 17, 1000])
    cos, sin = text_rope(t, positions.view(1, 1, -1).expand(3, 1, -1))
    q, k = torch.randn(2, 1, 4, 5, t.head_dim).unbind(0)
    q_rot, k_rot = apply_text_rope(q, k, cos, sin)
    torch.testing.assert_close(q_rot, _plain_interleaved_rope(q, positions, t.rope_theta), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_rot, _plain_interleaved_rope(k, positions, t.rope_theta), atol=1e-4, rtol=1e-4)


def test_each_axis_drives_its_own_pairs():
    t = CFG.text  # mrope (3, 3, 2): pairs 0..5 alternate h/w, pairs 6..7 follow t
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    _, sin0 = text_rope(t, base)
    changed = {}
    for axis, name in enumerate("thw"):
        moved = base.clone()
        moved[axis] = 7
        _, sin = text_rope(t, moved)  # sin, not cos: cos of the slowest pair stays 1.0 in fp32
        pairs = (sin != sin0)[0, 0, 0::2]  # one entry per (even, odd) pair
        changed[name] = pairs.nonzero().flatten().tolist()
    assert changed == {"h": [0, 2, 4], "w": [1, 3, 5], "t": [6, 7]}


def test_rotate_pairs_is_a_quarter_turn():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_pairs(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_vision_rope_rows_then_columns_and_relative():
    v = CFG.vision  # head_dim 16: dims 0..3 follow rows, 4..7 columns, repeated for 8..15
    pos = torch.tensor([[0, 0], [3, 0], [0, 5]])
    cos, _ = vision_rope(v, pos)
    q4 = v.head_dim // 4
    assert torch.equal(cos[1, q4:2 * q4], cos[0, q4:2 * q4]) and not torch.equal(cos[1, :q4], cos[0, :q4])
    assert torch.equal(cos[2, :q4], cos[0, :q4]) and not torch.equal(cos[2, q4:2 * q4], cos[0, q4:2 * q4])
    assert torch.equal(cos[:, :2 * q4], cos[:, 2 * q4:])
    # attention scores depend only on the offset between patches
    q, k = torch.randn(2, 1, 1, v.head_dim).unbind(0)
    pts = torch.tensor([[2, 3], [5, 1], [12, 13], [15, 11]])
    c, s = vision_rope(v, pts)
    qr, _ = apply_vision_rope(q.expand(4, 1, -1), k.expand(4, 1, -1), c, s)
    _, kr = apply_vision_rope(q.expand(4, 1, -1), k.expand(4, 1, -1), c, s)
    assert math.isclose((qr[0] * kr[1]).sum().item(), (qr[2] * kr[3]).sum().item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rope_of_q_and_k_together_equals_each_alone(dtype):
    """The tower rotates q and k as one (N, 2, H, D) block: the same bits as one at a time."""
    v = CFG.vision
    c, s = vision_rope(v, torch.randint(0, 20, (7, 2)))
    qk = torch.randn(7, 2, 3, v.head_dim).to(dtype)
    together = rotate_vision(qk, c, s)
    q_alone, k_alone = apply_vision_rope(qk[:, 0], qk[:, 1], c, s)
    assert together.dtype == dtype
    assert torch.equal(together[:, 0], q_alone) and torch.equal(together[:, 1], k_alone)
    cos, sin = c.unsqueeze(1), s.unsqueeze(1)  # the textbook formula, (N, 1, D)
    want = qk[:, 0].float() * cos + rotate_half(qk[:, 0].float()) * sin
    torch.testing.assert_close(q_alone.float(), want.to(dtype).float(), atol=0, rtol=0)


def test_patch_positions_follow_merge_windows():
    pos = patch_positions([(2, 4, 4)], merge=2, device="cpu")
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos.shape == (32, 2) and torch.equal(pos[:16], pos[16:])  # frames repeat the layout


@pytest.mark.reference
def test_rotary_tables_match_reference():
    pytest.importorskip("transformers")
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe import modeling_ernie4_5_vl_moe as ref

    from model.config import ErnieVLConfig
    from tests.tiny_configs import CONFIGS
    for name, raw in CONFIGS.items():
        ref_cfg, ours = Ernie4_5_VLMoeConfig(**raw), ErnieVLConfig.from_dict(raw)
        positions = torch.randint(0, 3000, (3, 2, 9))
        r_cos, r_sin = ref.Ernie4_5_VLMoeTextRotaryEmbedding(ref_cfg.text_config)(torch.zeros(1), positions)
        cos, sin = text_rope(ours.text, positions)
        torch.testing.assert_close(cos, r_cos, atol=0, rtol=0)
        torch.testing.assert_close(sin, r_sin, atol=0, rtol=0)
        q, k = torch.randn(2, 2, 3, 9, ours.text.head_dim).unbind(0)
        torch.testing.assert_close(apply_text_rope(q, k, cos, sin), ref.apply_rotary_pos_emb(q, k, r_cos, r_sin))
        hw = torch.randint(0, 40, (11, 2))
        r_cos, r_sin = ref.Ernie4_5_VLMoeVisionRotaryEmbedding(ref_cfg.vision_config)(torch.zeros(1), hw)
        cos, sin = vision_rope(ours.vision, hw)
        torch.testing.assert_close(cos, r_cos, atol=0, rtol=0)
        torch.testing.assert_close(sin, r_sin, atol=0, rtol=0)
