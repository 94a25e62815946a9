"""The one module that knows the on-disk weight layouts, and how they map onto our state dict.

Three layouts come in, one goes out (our names, see docs/ARCHITECTURE.md):

* Baidu's original checkpoint: top-level ``vision_model.``, one tensor per expert
  (``mlp.experts.{0..E-1}`` text, ``{E..2E-1}`` vision), routers stored transposed as
  ``mlp.gate.weight`` / ``mlp.gate.weight_1`` [H, E], both correction biases in one
  ``mlp.moe_statics.e_score_correction_bias`` [2, E], resampler ``nn.Sequential`` indices 0/2/3;
* transformers' ``save_pretrained``: the same names, except ``model.vision_model.``;
* transformers' in-memory names (``model.language_model.``, ``model.vision_tower.``,
  ``mlp.{text,vision}_moe.{gate,experts}``), which its non-legacy save writes.

The map is strict (every problem is listed in one ``CheckpointError``) and idempotent (our own
names pass through unchanged). ``to_baidu`` inverts it so our checkpoints load anywhere.

Legend: E = experts per bank, H = hidden size, I = expert width, V = vocabulary, C = vision width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from model.config import ErnieVLConfig, mlp_ratio_for
from model.errors import CheckpointError

Shape = tuple[int, ...]

IGNORED = re.compile(r"(^|\.)mtp")
_RENAMES = [  # (pattern, replacement), applied in order to every key
    (re.compile(r"^model\.(vision_model|vision_tower)\."), "vision_model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.0\."), r"\1.fc1."),
    (re.compile(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.2\."), r"\1.fc2."),
    (re.compile(r"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.3\."), r"\1.ln."),
    (re.compile(r"\.mlp\.(text|vision)_moe\.gate\.moe_statics\.e_score_correction_bias$"),
     r".mlp.\1_router.e_score_correction_bias"),
    (re.compile(r"\.mlp\.(text|vision)_moe\.gate\.weight$"), r".mlp.\1_router.weight"),
    (re.compile(r"\.mlp\.(text|vision)_moe\.experts\."), r".mlp.\1_experts."),
]
PER_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight(_1)?$")
_STATICS = re.compile(r"^model\.layers\.(\d+)\.mlp\.moe_statics\.e_score_correction_bias$")
_FP32 = re.compile(r"_router\.(weight|e_score_correction_bias)$")  # routing runs in fp32
BANKS = ("text", "vision")


# --- the expected state dict ------------------------------------------------------------------

def expected_shapes(config: ErnieVLConfig) -> dict[str, Shape]:
    """Every key of our state dict with its shape, computed from the config alone."""
    t = config.text
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (t.vocab_size, t.hidden_size)}
    for i in range(t.num_hidden_layers):
        shapes.update(_layer_shapes(config, i))
    shapes["model.norm.weight"] = (t.hidden_size,)
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    shapes.update(_vision_shapes(config))
    shapes.update(_resampler_shapes(config))
    return shapes


def _linear(prefix: str, n_out: int, n_in: int, bias: bool) -> dict[str, Shape]:
    shapes = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _mlp(prefix: str, hidden: int, width: int, bias: bool) -> dict[str, Shape]:
    return {**_linear(f"{prefix}.gate_proj", width, hidden, bias),
            **_linear(f"{prefix}.up_proj", width, hidden, bias),
            **_linear(f"{prefix}.down_proj", hidden, width, bias)}


def _layer_shapes(config: ErnieVLConfig, i: int) -> dict[str, Shape]:
    t = config.text
    H, D, b = t.hidden_size, t.head_dim, t.use_bias
    p = f"model.layers.{i}"
    shapes = {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
              **_linear(f"{p}.self_attn.q_proj", t.num_attention_heads * D, H, b),
              **_linear(f"{p}.self_attn.k_proj", t.num_key_value_heads * D, H, b),
              **_linear(f"{p}.self_attn.v_proj", t.num_key_value_heads * D, H, b),
              **_linear(f"{p}.self_attn.o_proj", H, t.num_attention_heads * D, b)}
    if not t.is_moe_layer(i):
        return {**shapes, **_mlp(f"{p}.mlp", H, t.intermediate_size, b)}
    E = t.moe_num_experts
    for bank, I in zip(BANKS, t.moe_intermediate_size):
        shapes[f"{p}.mlp.{bank}_router.weight"] = (E, H)
        shapes[f"{p}.mlp.{bank}_router.e_score_correction_bias"] = (E,)
        shapes[f"{p}.mlp.{bank}_experts.gate_up_proj"] = (E, 2 * I, H)
        shapes[f"{p}.mlp.{bank}_experts.down_proj"] = (E, H, I)
    if t.moe_num_shared_experts > 0:
        shapes.update(_mlp(f"{p}.mlp.shared_experts", H, t.shared_intermediate_size, b))
    return shapes


def _vision_shapes(config: ErnieVLConfig) -> dict[str, Shape]:
    v = config.vision
    C = v.hidden_size
    shapes: dict[str, Shape] = {"vision_model.patch_embed.proj.weight": (C, v.patch_dim)}
    for j in range(v.depth):
        p = f"vision_model.blocks.{j}"
        for norm in ("norm1", "norm2"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (C,)
        shapes.update(_linear(f"{p}.attn.qkv", 3 * C, C, True))
        shapes.update(_linear(f"{p}.attn.proj", C, C, True))
        shapes.update(_linear(f"{p}.mlp.fc1", v.intermediate_size, C, True))
        shapes.update(_linear(f"{p}.mlp.fc2", C, v.intermediate_size, True))
    shapes["vision_model.ln.weight"] = shapes["vision_model.ln.bias"] = (C,)
    return shapes


def _resampler_shapes(config: ErnieVLConfig) -> dict[str, Shape]:
    v, H = config.vision, config.text.hidden_size
    S = v.hidden_size * v.spatial_merge_size ** 2  # one merged 2x2 window
    p = "model.resampler_model"
    shapes: dict[str, Shape] = {}
    for name, n_in in (("spatial_linear", S), ("temporal_linear", S * v.temporal_merge_size)):
        shapes.update(_linear(f"{p}.{name}.fc1", S, n_in, True))
        shapes.update(_linear(f"{p}.{name}.fc2", S, S, True))
        shapes[f"{p}.{name}.ln.weight"] = shapes[f"{p}.{name}.ln.bias"] = (S,)
    shapes.update(_linear(f"{p}.mlp", H, S, True))
    shapes[f"{p}.after_norm.weight"] = (H,)
    return shapes


# --- any layout -> ours -----------------------------------------------------------------------

class _Problems:
    """Collects every mismatch so the user sees them all in one error."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []
        self.covered: set[str] = set()  # our keys whose source tensors were already reported

    def shape(self, key: str, expected: Shape, found: Shape) -> bool:
        if tuple(found) == tuple(expected):
            return True
        self.misshaped.append(f"{key} (expected {list(expected)}, found {list(found)})")
        return False

    def raise_if_any(self) -> None:
        parts = [_listing(n, what) for n, what in ((self.missing, "missing"), (self.unexpected, "unexpected"),
                                                   (self.misshaped, "mis-shaped")) if n]
        if parts:
            raise CheckpointError(
                "checkpoint tensors do not match config.json: " + "; ".join(parts),
                hint="use the config.json that was saved with these weights, or re-download the checkpoint")


def _listing(keys: list[str], what: str, limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what} ({shown}{more})"


def renamed(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def to_ours(state: Mapping[str, Tensor], config: ErnieVLConfig, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None,
            release: Callable[[list[str]], None] | None = None) -> dict[str, Tensor]:
    """Map a state dict in any known layout to our names and shapes; strict and idempotent.

    ``state`` may be lazy: each tensor is read once. ``dtype``/``device`` give the destination;
    experts are stacked straight into it, routers and correction biases stay fp32. Tensors
    already in place are returned as they are (no copy). ``release(keys)``, when given, is told
    the source keys of each bank of per-expert tensors once they were stacked (a memory-mapped
    source drops their pages, so the load never holds both copies of the experts).
    """
    t, E = config.text, config.text.moe_num_experts
    expected = expected_shapes(config)
    problems, out = _Problems(), {}
    experts: dict[int, dict[tuple[int, str], str]] = {}  # layer -> (expert, proj) -> source key
    for key in state:
        if IGNORED.search(key) or (key == "lm_head.weight" and t.tie_word_embeddings):
            continue
        name = renamed(key)
        if m := PER_EXPERT_KEY.match(name):
            experts.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = key
        elif m := _ROUTER.match(name):
            _put_router(out, problems, state[key], key, int(m[1]), BANKS[bool(m[2])], config, dtype, device)
        elif m := _STATICS.match(name):
            _put_statics(out, problems, state[key], key, int(m[1]), config, device)
        elif name in out:
            problems.unexpected.append(f"{key} (given twice)")
        else:
            x = state[key]
            out[name] = _placed(name, x, dtype, device)
            if release is not None and out[name].data_ptr() != x.data_ptr():
                release([key])  # copied (another dtype or device): the source pages are done
    for i, sources in experts.items():
        _put_experts(out, problems, state, sources, i, E, config, dtype, device, release)
    _check(out, expected, problems)
    return out


def _placed(name: str, x: Tensor, dtype: torch.dtype | None, device: Any) -> Tensor:
    if _FP32.search(name):
        dtype = torch.float32
        if x.ndim == 2 and x.shape[0] == 1:  # transformers keeps one [1, E] bias per router
            x = x.reshape(-1)
    return x.to(device=device, dtype=dtype or x.dtype)


def _put_router(out: dict, problems: _Problems, x: Tensor, key: str, i: int, bank: str,
                config: ErnieVLConfig, dtype: Any, device: Any) -> None:
    H, E = config.text.hidden_size, config.text.moe_num_experts
    name = f"model.layers.{i}.mlp.{bank}_router.weight"
    problems.covered.add(name)
    if i >= config.text.num_hidden_layers or not config.text.is_moe_layer(i):
        problems.unexpected.append(key)
    elif problems.shape(key, (H, E), x.shape):
        out[name] = x.to(device=device, dtype=torch.float32).t().contiguous()  # [H, E] -> [E, H]


def _put_statics(out: dict, problems: _Problems, x: Tensor, key: str, i: int,
                 config: ErnieVLConfig, device: Any) -> None:
    names = [f"model.layers.{i}.mlp.{bank}_router.e_score_correction_bias" for bank in BANKS]
    problems.covered.update(names)
    if i >= config.text.num_hidden_layers or not config.text.is_moe_layer(i):
        problems.unexpected.append(key)
    elif problems.shape(key, (2, config.text.moe_num_experts), x.shape):
        x = x.to(device=device, dtype=torch.float32)
        for r, name in enumerate(names):  # row 0 text, row 1 vision
            out[name] = x[r].clone()


def _put_experts(out: dict, problems: _Problems, state: Mapping[str, Tensor],
                 sources: dict[tuple[int, str], str], i: int, E: int, config: ErnieVLConfig,
                 dtype: Any, device: Any, release: Callable[[list[str]], None] | None) -> None:
    """Stack one layer's per-expert tensors into [E, 2I, H] (gate rows first) and [E, H, I]."""
    t, p = config.text, f"model.layers.{i}.mlp"
    if i >= t.num_hidden_layers or not t.is_moe_layer(i):
        problems.unexpected.extend(sources.values())
        return
    problems.unexpected.extend(k for (e, _), k in sources.items() if e >= 2 * E)
    for b, (bank, I) in enumerate(zip(BANKS, t.moe_intermediate_size)):
        gate_up, down = f"{p}.{bank}_experts.gate_up_proj", f"{p}.{bank}_experts.down_proj"
        bank_keys = {(e - b * E, proj): k for (e, proj), k in sources.items() if b * E <= e < (b + 1) * E}
        if not bank_keys:
            continue  # perhaps given already stacked; the final check decides
        problems.covered.update((gate_up, down))
        want = {"gate": (I, t.hidden_size), "up": (I, t.hidden_size), "down": (t.hidden_size, I)}
        missing = [f"{p}.experts.{b * E + e}.{proj}_proj.weight" for e in range(E) for proj in want
                   if (e, proj) not in bank_keys]
        problems.missing.extend(missing)
        tensors = {ek: state[k] for ek, k in bank_keys.items()}
        shaped = all([problems.shape(bank_keys[ek], want[ek[1]], x.shape) for ek, x in tensors.items()])
        if missing or not shaped:
            continue
        first = tensors[(0, "gate")]
        gu = torch.empty((E, 2 * I, t.hidden_size), dtype=dtype or first.dtype, device=device)  # (E, 2I, H)
        dn = torch.empty((E, t.hidden_size, I), dtype=dtype or first.dtype, device=device)  # (E, H, I)
        for e in range(E):
            gu[e, :I].copy_(tensors[(e, "gate")])
            gu[e, I:].copy_(tensors[(e, "up")])
            dn[e].copy_(tensors[(e, "down")])
        del tensors
        if release is not None:
            release(list(bank_keys.values()))
        _put_once(out, problems, gate_up, gu)
        _put_once(out, problems, down, dn)


def _put_once(out: dict, problems: _Problems, name: str, x: Tensor) -> None:
    if name in out:
        problems.unexpected.append(f"{name} (given both stacked and per expert)")
    out[name] = x


def _check(out: dict[str, Tensor], expected: dict[str, Shape], problems: _Problems) -> None:
    problems.missing.extend(k for k in expected if k not in out and k not in problems.covered)
    problems.unexpected.extend(k for k in out if k not in expected)
    for k, x in out.items():
        if k in expected:
            problems.shape(k, expected[k], x.shape)
    problems.raise_if_any()


# --- ours -> Baidu ----------------------------------------------------------------------------

def to_baidu(state: Mapping[str, Tensor], config: ErnieVLConfig) -> dict[str, Tensor]:
    """Our state dict in Baidu's original layout; every tensor is its own contiguous copy."""
    ours = to_ours(state, config)  # validates, and accepts any layout
    t, E = config.text, config.text.moe_num_experts
    out: dict[str, Tensor] = {}
    for name, x in ours.items():
        if m := re.match(r"^(model\.layers\.\d+\.mlp)\.(text|vision)_router\.weight$", name):
            out[f"{m[1]}.gate.weight{'_1' if m[2] == 'vision' else ''}"] = x.t().contiguous()  # [E, H] -> [H, E]
        elif m := re.match(r"^(model\.layers\.\d+\.mlp)\.text_router\.e_score_correction_bias$", name):
            vision = ours[name.replace("text_router", "vision_router")]
            out[f"{m[1]}.moe_statics.e_score_correction_bias"] = torch.stack([x, vision])  # (2, E)
        elif m := re.match(r"^(model\.layers\.\d+\.mlp)\.(text|vision)_experts\.(gate_up|down)_proj$", name):
            _unstack(out, m[1], BANKS.index(m[2]) * E, m[3], x, t.moe_intermediate_size[BANKS.index(m[2])])
        elif "vision_router.e_score" not in name:
            out[_baidu_name(name)] = x.contiguous().clone()
    return out


def _unstack(out: dict, prefix: str, offset: int, kind: str, x: Tensor, I: int) -> None:
    for e in range(x.shape[0]):
        if kind == "down":
            out[f"{prefix}.experts.{offset + e}.down_proj.weight"] = x[e].clone()
        else:
            out[f"{prefix}.experts.{offset + e}.gate_proj.weight"] = x[e, :I].clone()
            out[f"{prefix}.experts.{offset + e}.up_proj.weight"] = x[e, I:].clone()


def _baidu_name(name: str) -> str:
    for ours, idx in (("fc1", 0), ("fc2", 2), ("ln", 3)):
        name = re.sub(rf"^(model\.resampler_model\.(?:spatial|temporal)_linear)\.{ours}\.", rf"\g<1>.{idx}.", name)
    return name


def config_to_baidu_dict(config: ErnieVLConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Baidu's flat ``config.json`` for ``config``; ``ErnieVLConfig.from_dict`` reads it back equal."""
    t, v = config.text, config.vision
    h, w, time = t.mrope_section
    raw: dict[str, Any] = {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "use_bias": t.use_bias, "tie_word_embeddings": t.tie_word_embeddings,
        "moe_k": t.moe_k, "moe_num_experts": [t.moe_num_experts] * 2,
        "moe_intermediate_size": list(t.moe_intermediate_size),
        "moe_num_shared_experts": t.moe_num_shared_experts, "moe_norm_min": t.moe_norm_min,
        "router_aux_loss_coef": t.router_aux_loss_coef, "mlp_layer_types": list(t.mlp_layer_types),
        **_baidu_moe_indices(t.mlp_layer_types),
        "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id),
        "im_patch_id": config.image_token_id, "image_start_token_id": config.image_start_token_id,
        "image_end_token_id": config.image_end_token_id, "video_token_id": config.video_token_id,
        "video_start_token_id": config.video_start_token_id, "video_end_token_id": config.video_end_token_id,
        "spatial_conv_size": v.spatial_merge_size, "temporal_conv_size": v.temporal_merge_size,
        "vision_config": {"depth": v.depth, "embed_dim": v.hidden_size, "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size,
                          "mlp_ratio": mlp_ratio_for(v.intermediate_size, v.hidden_size), "num_heads": v.num_heads,
                          "hidden_act": v.hidden_act, "in_channels": v.in_channels, "patch_size": v.patch_size,
                          "rope_theta": v.rope_theta, "layer_norm_eps": v.layer_norm_eps},
    }
    if t.head_dim_override is not None:
        raw["head_dim"] = t.head_dim_override
    if h == w:
        raw["freq_allocation"] = time  # Baidu's form: the last `time` pairs, the rest split h/w
    else:
        raw["mrope_section"] = [h, w, time]
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    return raw


def _baidu_moe_indices(types: tuple[str, ...]) -> dict[str, Any]:
    sparse = [i for i, kind in enumerate(types) if kind == "sparse"]
    if not sparse:
        return {"moe_layer_start_index": len(types), "moe_layer_end_index": -1, "moe_layer_interval": 1}
    return {"moe_layer_start_index": sparse[0], "moe_layer_end_index": sparse[-1], "moe_layer_interval": 1}
