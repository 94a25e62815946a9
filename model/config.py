"""Model configuration: frozen dataclasses and the one reader of checkpoint ``config.json``.

Two on-disk forms exist and both land here:

* Baidu's original flat form (``moe_num_experts: [64, 64]``, ``moe_layer_start_index``,
  ``freq_allocation``, ``vision_config.embed_dim`` / ``mlp_ratio``, ``im_patch_id`` ...);
* the nested transformers form (``text_config`` / ``vision_config`` with ``rope_parameters``
  and ``mlp_layer_types``).

``int | list`` fields are normalised once, here, so the rest of the code never branches on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from model.errors import CheckpointError


class ConfigError(CheckpointError):
    """A checkpoint configuration that cannot describe an ERNIE 4.5 VL model."""

    hint = "point at an ERNIE 4.5 VL checkpoint directory (config.json and *.safetensors), or download it again"


# Baidu's original config.json, and transformers' conversion of it.
MODEL_TYPES = frozenset({"ernie4_5_moe_vl", "ernie4_5_vl_moe"})


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim_override: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    mrope_section: tuple[int, int, int] = (22, 22, 20)  # (h, w, t) frequency pairs
    use_bias: bool = False
    tie_word_embeddings: bool = True
    moe_k: int = 6
    moe_num_experts: int = 64
    moe_intermediate_size: tuple[int, int] = (1536, 512)  # (text bank, vision bank)
    moe_num_shared_experts: int = 2
    moe_norm_min: float = 1e-12
    router_aux_loss_coef: float = 0.001
    mlp_layer_types: tuple[str, ...] = ("dense",) + ("sparse",) * 27
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size[0] * self.moe_num_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        return self.mlp_layer_types[i] == "sparse"


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size


@dataclass(frozen=True)
class ErnieVLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ErnieVLConfig":
        """Read either checkpoint form (see the module docstring)."""
        model_type = raw.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json describes a {model_type!r} model, expected ERNIE 4.5 VL "
                              f"(model_type one of {', '.join(sorted(MODEL_TYPES))})",
                              hint="point at an ERNIE 4.5 VL checkpoint such as baidu/ERNIE-4.5-VL-28B-A3B-PT")
        try:
            if isinstance(raw.get("text_config"), dict):
                return _from_nested(raw)
            return _from_flat(raw)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json does not describe an ERNIE 4.5 VL model ({type(e).__name__}: {e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ErnieVLConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}", hint="pass the checkpoint directory that holds config.json "
                              "and the *.safetensors shards, a Hub repo id, or ernie-tiny") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})",
                              hint="fix the file, or download the model again") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, expected an object")
        return cls.from_dict(raw)


def tiny(**text_overrides: Any) -> ErnieVLConfig:
    """A few-MB configuration with every structural feature switched on, for tests."""
    text = TextConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim_override=16,
        max_position_embeddings=2048, mrope_section=(3, 3, 2), moe_k=2, moe_num_experts=4,
        moe_intermediate_size=(32, 16), moe_num_shared_experts=1,
        mlp_layer_types=("dense", "sparse", "sparse"),
    )
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)
    return ErnieVLConfig(text=replace(text, **text_overrides), vision=vision,
                         image_token_id=3, image_start_token_id=4, image_end_token_id=5,
                         video_token_id=8, video_start_token_id=6, video_end_token_id=7)


# --- readers ---------------------------------------------------------------------------------

def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) else v


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1] if len(v) > 1 else v[0]))
    return (int(v), int(v))


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _pick(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names and v is not None}


def _mrope_from_freq_allocation(head_dim: int, t_pairs: int) -> tuple[int, int, int]:
    hw = head_dim // 2 - t_pairs
    if hw < 0 or hw % 2:
        raise ConfigError(f"freq_allocation {t_pairs} does not split head_dim {head_dim} into h/w/t sections")
    return (hw // 2, hw // 2, t_pairs)


def _text_common(raw: dict[str, Any]) -> dict[str, Any]:
    kw = _pick(TextConfig, raw)
    kw.pop("head_dim_override", None)
    if raw.get("head_dim"):
        kw["head_dim_override"] = int(raw["head_dim"])
    if "moe_num_experts" in raw:
        kw["moe_num_experts"] = int(_first(raw["moe_num_experts"]))
    if "moe_intermediate_size" in raw:
        kw["moe_intermediate_size"] = _pair(raw["moe_intermediate_size"])
    if raw.get("moe_num_shared_experts") is None and "moe_num_shared_experts" in raw:
        kw["moe_num_shared_experts"] = 0
    kw["eos_token_id"] = _ids(raw.get("eos_token_id"))
    if "mrope_section" in kw:
        kw["mrope_section"] = tuple(int(x) for x in kw["mrope_section"])
    if "mlp_layer_types" in kw:
        kw["mlp_layer_types"] = tuple(kw["mlp_layer_types"])
    return kw


def _sparse_pattern_baidu(raw: dict[str, Any], n_layers: int) -> tuple[str, ...]:
    start = min(_ids(raw.get("moe_layer_start_index", 0)))
    end_raw = raw.get("moe_layer_end_index", n_layers - 1)
    end = max(_ids(end_raw))
    end = n_layers - 1 if end < 0 else end
    interval = int(raw.get("moe_layer_interval", 1))
    uses_moe = raw.get("use_moe", True) and int(_first(raw.get("moe_num_experts", 0)) or 0) > 0
    return tuple(
        "sparse" if uses_moe and interval > 0 and (i + 1) % interval == 0 and start <= i <= end else "dense"
        for i in range(n_layers)
    )


def _mlp_width(embed_dim: int, mlp_ratio: float) -> int:
    """Baidu's vision MLP width: ``int(embed_dim * mlp_ratio)``, the ratio a float (2.5 stays 2.5)."""
    return int(embed_dim * float(mlp_ratio))


def mlp_ratio_for(width: int, embed_dim: int) -> float:
    """The float ratio that Baidu's ``int(embed_dim * mlp_ratio)`` turns back into ``width``:
    ``width / embed_dim``, or the next float above it where the product rounds just below ``width``
    (e.g. 15 / 11 * 11 = 14.999...)."""
    ratio = width / embed_dim
    while _mlp_width(embed_dim, ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _from_flat(raw: dict[str, Any]) -> ErnieVLConfig:
    kw = _text_common(raw)
    text = TextConfig(**kw)
    kw["mlp_layer_types"] = tuple(raw["mlp_layer_types"]) if raw.get("mlp_layer_types") else \
        _sparse_pattern_baidu(raw, text.num_hidden_layers)
    if raw.get("freq_allocation") is not None:
        kw["mrope_section"] = _mrope_from_freq_allocation(text.head_dim, int(raw["freq_allocation"]))
    text = _validated(TextConfig(**kw))
    rv = raw.get("vision_config") or {}
    hidden = int(rv.get("hidden_size", rv.get("embed_dim", 1280)))
    embed = int(rv.get("embed_dim", hidden))
    vision = VisionConfig(
        depth=int(rv.get("depth", 32)), hidden_size=embed,
        intermediate_size=int(rv.get("intermediate_size") or _mlp_width(embed, rv.get("mlp_ratio", 4))),
        num_heads=int(rv.get("num_heads", 16)), hidden_act=rv.get("hidden_act", "quick_gelu"),
        in_channels=int(rv.get("in_channels", rv.get("in_chans", 3))), patch_size=int(_first(rv.get("patch_size", 14))),
        spatial_merge_size=int(raw.get("spatial_conv_size", rv.get("spatial_merge_size", 2))),
        temporal_merge_size=int(raw.get("temporal_conv_size", rv.get("temporal_merge_size", 2))),
        rope_theta=float(rv.get("rope_theta", VisionConfig.rope_theta)),
        layer_norm_eps=float(rv.get("layer_norm_eps", rv.get("rms_norm_eps", VisionConfig.layer_norm_eps))),
    )
    ids = {k: int(raw[k]) for k in ("image_start_token_id", "image_end_token_id", "video_start_token_id",
                                    "video_end_token_id", "video_token_id") if raw.get(k) is not None}
    image_token_id = int(raw.get("im_patch_id", raw.get("image_token_id", 100295)))
    return ErnieVLConfig(text=text, vision=_validated(vision), image_token_id=image_token_id, **ids)


def _from_nested(raw: dict[str, Any]) -> ErnieVLConfig:
    rt = dict(raw["text_config"])
    for k in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id"):
        if k in raw and k not in rt:
            rt[k] = raw[k]
    kw = _text_common(rt)
    rope = rt.get("rope_parameters") or {}
    if rope.get("rope_theta") is not None:
        kw["rope_theta"] = float(rope["rope_theta"])
    elif rt.get("rope_theta") is not None:
        kw["rope_theta"] = float(rt["rope_theta"])
    if rope.get("mrope_section"):
        kw["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
    n = int(kw.get("num_hidden_layers", TextConfig.num_hidden_layers))
    kw["mlp_layer_types"] = tuple(rt["mlp_layer_types"]) if rt.get("mlp_layer_types") else \
        ("dense",) + ("sparse",) * (n - 1)
    text = _validated(TextConfig(**kw))
    rv = dict(raw.get("vision_config") or {})
    vkw = _pick(VisionConfig, rv)
    vkw["patch_size"] = int(_first(rv.get("patch_size", 14)))
    if rv.get("rms_norm_eps") is not None:
        vkw["layer_norm_eps"] = float(rv["rms_norm_eps"])
    vrope = rv.get("rope_parameters") or {}
    if vrope.get("rope_theta") is not None:
        vkw["rope_theta"] = float(vrope["rope_theta"])
    vision = _validated(VisionConfig(**vkw))
    ids = _pick(ErnieVLConfig, {k: v for k, v in raw.items() if k.endswith("token_id")})
    return ErnieVLConfig(text=text, vision=vision, **{k: int(v) for k, v in ids.items()})


def _validated(cfg: Any) -> Any:
    if isinstance(cfg, TextConfig):
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {cfg.num_key_value_heads}")
        if len(cfg.mlp_layer_types) != cfg.num_hidden_layers:
            raise ConfigError(f"mlp_layer_types has {len(cfg.mlp_layer_types)} entries for "
                              f"{cfg.num_hidden_layers} layers")
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ConfigError(f"mrope_section {list(cfg.mrope_section)} covers {sum(cfg.mrope_section) * 2} "
                              f"of head_dim {cfg.head_dim}")
        if cfg.moe_k > cfg.moe_num_experts and "sparse" in cfg.mlp_layer_types:
            raise ConfigError(f"moe_k {cfg.moe_k} exceeds moe_num_experts {cfg.moe_num_experts}")
    elif isinstance(cfg, VisionConfig):
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"vision hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
    return cfg
