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


# --- quantized sizes (model/quantize.py: what is quantized and how) -------------------------------------

QUANT_DEFAULT_GROUP = {8: 128, 4: 64}
QUANT_MIN_GROUP = 32


def _group(K: int, group: int) -> int | None:
    g = group
    while g > QUANT_MIN_GROUP and K % g:
        g //= 2
    return g if K % g == 0 else None


def _quant_bytes(N: int, K: int, bits: int, group: int, float_bytes: int) -> int:
    """Bytes of one (N, K) weight quantized (codes, fp16 scales, fp16 zeros for int4), or kept in float."""
    G = _group(K, group)
    if G is None:
        return N * K * float_bytes
    return N * K * bits // 8 + N * (K // G) * 2 * (2 if bits == 4 else 1)


def quantized_weight_bytes(cfg: ErnieVLConfig, bits: int, group: int | None = None, float_dtype: str = "bfloat16",
                           lm_head: bool = True, vision: bool = True) -> int:
    """The weight bytes of ``cfg`` quantized to ``bits`` (the decoder's linear layers and experts,
    the vocabulary projection when ``lm_head``; the rest in ``float_dtype``). A tied embedding
    is counted in full beside its quantized copy."""
    t, fb = cfg.text, DTYPE_BYTES[float_dtype]
    group = group or QUANT_DEFAULT_GROUP[bits]
    H, E = t.hidden_size, t.moe_num_experts
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    total = count_parameters(cfg).total * fb
    quantizable = [(q, H), (kv, H), (kv, H), (H, q)] * t.num_hidden_layers  # (N, K) of each weight
    for i in range(t.num_hidden_layers):
        if t.is_moe_layer(i):
            I_t, I_v = t.moe_intermediate_size
            for I, count in ((I_t, E), (I_v, E), (t.shared_intermediate_size, 1)):
                quantizable += [(2 * I, H), (H, I)] * count if count > 1 else [(I, H), (I, H), (H, I)]
        else:
            quantizable += [(t.intermediate_size, H), (t.intermediate_size, H), (H, t.intermediate_size)]
    saved = sum(N * K * fb - _quant_bytes(N, K, bits, group, fb) for N, K in quantizable)
    if lm_head:
        head = _quant_bytes(t.vocab_size, H, bits, group, fb)
        saved += (t.vocab_size * H * fb - head) if not t.tie_word_embeddings else -head
    if vision:  # the blocks' linear layers, the patch projection, the resampler's
        v = cfg.vision
        C, S = v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
        layers = [(3 * C, C), (C, C), (v.intermediate_size, C), (C, v.intermediate_size)] * v.depth
        layers += [(C, v.patch_dim), (S, S), (S, S), (S, S * v.temporal_merge_size), (S, S), (H, S)]
        saved += sum(N * K * fb - _quant_bytes(N, K, bits, group, fb) for N, K in layers)
    return total - saved


def quantization_of(raw: dict) -> dict | None:
    """The ``quantization`` block of a raw config.json written by ``ernie quantize``, or None."""
    block = raw.get("quantization")
    return block if isinstance(block, dict) and block.get("bits") in (4, 8) else None


def format_name(raw: dict) -> str:
    """"int4 (group 64)" for a quantized checkpoint, else its float dtype name."""
    block = quantization_of(raw)
    if block is not None:
        return f"int{block['bits']} (group {block.get('group_size')})"
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype") or "bfloat16"
    return str(name).removeprefix("torch.")


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
