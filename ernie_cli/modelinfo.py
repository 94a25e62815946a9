"""What a checkpoint costs, computed from its config alone (torch-free): parameters and memory.

Legend: V vocab, H hidden, L layers, Nq/Nkv heads, D head dim, E experts per bank, K experts per
token, I_t/I_v text/vision expert width, C vision width, P patch size, M spatial merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ErnieVLConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active_text: int  # parameters one text token passes through
    vision: int  # vision encoder + resampler
    experts: int  # all routed experts, both banks


def _linear(i: int, o: int, bias: bool = False) -> int:
    return i * o + (o if bias else 0)


def _attention(cfg: ErnieVLConfig) -> int:
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return _linear(t.hidden_size, q, t.use_bias) + 2 * _linear(t.hidden_size, kv, t.use_bias) + _linear(q, t.hidden_size, t.use_bias)


def _vision(cfg: ErnieVLConfig) -> int:
    v, H = cfg.vision, cfg.text.hidden_size
    C = v.hidden_size
    block = 2 * 2 * C + _linear(C, 3 * C, True) + _linear(C, C, True) + _linear(C, v.intermediate_size, True) \
        + _linear(v.intermediate_size, C, True)
    encoder = _linear(v.patch_dim, C) + v.depth * block + 2 * C
    spatial = C * v.spatial_merge_size ** 2
    mlp = lambda i, o: _linear(i, o, True) + _linear(o, o, True) + 2 * o  # fc1, fc2, LayerNorm
    resampler = mlp(spatial, spatial) + mlp(spatial * v.temporal_merge_size, spatial) + _linear(spatial, H, True) + H
    return encoder + resampler


def count_parameters(cfg: ErnieVLConfig) -> ParamCounts:
    t = cfg.text
    H, E = t.hidden_size, t.moe_num_experts
    I_t, I_v = t.moe_intermediate_size
    embed = t.vocab_size * H
    head = 0 if t.tie_word_embeddings else embed
    total = active = embed + head + H  # + final norm
    experts = 0
    for i in range(t.num_hidden_layers):
        common = _attention(cfg) + 2 * H
        if t.is_moe_layer(i):
            routers = 2 * E * H  # correction biases are buffers, not parameters
            shared = 3 * H * t.shared_intermediate_size
            bank_t, bank_v = E * 3 * H * I_t, E * 3 * H * I_v
            experts += bank_t + bank_v
            total += common + routers + shared + bank_t + bank_v
            active += common + E * H + shared + t.moe_k * 3 * H * I_t
        else:
            dense = 3 * H * t.intermediate_size
            total += common + dense
            active += common + dense
    vision = _vision(cfg)
    return ParamCounts(total=total + vision, active_text=active, vision=vision, experts=experts)


def weight_bytes(cfg: ErnieVLConfig, dtype: str) -> int:
    return count_parameters(cfg).total * DTYPE_BYTES[dtype]


def kv_cache_bytes(cfg: ErnieVLConfig, tokens: int, dtype: str) -> int:
    t = cfg.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * tokens * DTYPE_BYTES[dtype]


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
