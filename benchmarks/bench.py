"""ernie vs the transformers 5.23 reference on the same random-weight checkpoint, in one run.

    .venv/bin/python benchmarks/bench.py                 # CPU, 4 text layers, 4 vision blocks
    .venv/bin/python benchmarks/bench.py --layers 2 --new-tokens 16 --prefill-tokens 128 --output-dir /tmp/b
    .venv/bin/python benchmarks/bench.py --device cuda --layers 28 --vision-blocks 32   # GPU, full size

What it does (see benchmarks/README.md for the definitions):
1. makes once, and caches under benchmarks/.cache/, a random bf16 checkpoint with the real layer
   widths of ERNIE-4.5-VL-28B-A3B but few layers, in Baidu's layout (flat config.json, one
   safetensors shard per layer plus an index, per-expert tensors, top-level ``vision_model.``),
   and a sibling directory for the reference (nested config.json, the same text shards
   hard-linked, only the vision shard rewritten under ``model.vision_model.``);
   with ``--device cuda`` (or ``--init random``) nothing is written but the configs: each side
   builds its random weights directly on the device;
2. measures the machine's memory bandwidth (large copy, read + write bytes / time, best of 5);
3. runs each side in its own subprocess, one after the other (clean peak resident memory):
   load time and peak RSS, image time-to-first-token, prefill tokens/s, decode tokens/s;
4. writes RESULTS.md and results.json (each figure, the ernie/reference ratio, the target,
   pass/fail) into ``--output-dir`` (default: benchmarks/); with ``--device cuda``,
   RESULTS-cuda.md and results-cuda.json, with the GPU's name, a batch-8 decode and the GPU
   targets of issue 19 (TARGETS_CUDA).

Legend: L = text layers, H = hidden, D = head dim, Hq/Hkv = query/key-value heads, I = expert
width, K = experts per token, E = experts per bank, V = vocabulary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # tests.helpers.tokenizer (the tiny tokenizer) lives beside the package

import torch  # noqa: E402

CACHE = HERE / ".cache"
SIDES = {"ernie": "_ours", "reference": "_reference"}
PHASES = ("load", "ttft", "prefill", "decode")
# The clean chat format with one picture and a short question, thinking off (the default).
IMAGE_PROMPT = ("<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
                "Describe this picture in one sentence.\nAssistant: <think>\n\n</think>\n\n")
FIRST_TEXT_ID, BOS_ID = 11, 1  # ids of the tiny tokenizer: 0..10 special, then ordinary pieces
TARGETS = {  # metric -> (comparison, bound), applied to the ernie/reference ratio unless noted
    "load_s": ("<=", 0.5),
    "rss_over_weights": ("<=", 1.2),  # ernie's own peak RSS / weight bytes
    "ttft_s": ("<=", 1 / 1.5),
    "prefill_tok_s": (">=", 1.3),
    "decode_tok_s": (">=", 1.3),
    "decode_bw_fraction": (">=", 0.8),  # ernie's own fraction of the measured bandwidth
}
TARGETS_CUDA = {  # issue 19: full size, bf16, one H100/H200
    "ttft_s": ("<=", 0.67),
    "prefill_tok_s": (">=", 1.3),
    "decode_tok_s_abs": (">=", 300.0),  # ernie's own tokens/s, batch 1
    "decode_bw_fraction": (">=", 0.5),
    "decode_b8_over_b1": (">=", 5.0),  # ernie's batch-8 tokens/s over its batch-1 tokens/s
}
B8 = 8  # rows of the batched decode measured on a GPU


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- configuration ----------------------------------------------------------------------------

def bench_config(layers: int, vision_blocks: int):
    """ERNIE-4.5-VL-28B-A3B widths (the TextConfig/VisionConfig defaults), fewer layers, tiny-tokenizer ids."""
    from model.config import ErnieVLConfig, TextConfig, VisionConfig
    from tests.tiny_configs import TOKEN_IDS

    if layers < 1 or vision_blocks < 1:
        raise SystemExit(f"--layers and --vision-blocks must be >= 1, got {layers} and {vision_blocks}")
    text = TextConfig(num_hidden_layers=layers, mlp_layer_types=("dense",) + ("sparse",) * (layers - 1),
                      bos_token_id=BOS_ID, eos_token_id=(2,), pad_token_id=0)
    return ErnieVLConfig(text=text, vision=replace(VisionConfig(), depth=vision_blocks), **TOKEN_IDS)


def reference_config_dict(config) -> dict:
    """transformers' nested config.json for the same model."""
    t, v = config.text, config.vision
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps, use_bias=t.use_bias,
        tie_word_embeddings=t.tie_word_embeddings, moe_intermediate_size=list(t.moe_intermediate_size),
        moe_k=t.moe_k, moe_num_experts=t.moe_num_experts, moe_num_shared_experts=t.moe_num_shared_experts,
        moe_norm_min=t.moe_norm_min, mlp_layer_types=list(t.mlp_layer_types),
        rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section)),
        bos_token_id=t.bos_token_id, eos_token_id=list(t.eos_token_id), pad_token_id=t.pad_token_id)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_merge_size=v.temporal_merge_size,
                  rms_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    ids = {k: getattr(config, k) for k in ("image_token_id", "image_start_token_id", "image_end_token_id",
                                           "video_token_id", "video_start_token_id", "video_end_token_id")}
    return dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], model_type="ernie4_5_vl_moe",
                dtype="bfloat16", text_config=text, vision_config=vision,
                tie_word_embeddings=t.tie_word_embeddings, **ids)


# --- the random checkpoint --------------------------------------------------------------------

def baidu_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of Baidu's original layout with its shape (per-expert, routers [H, E])."""
    from model.checkpoint.weights import expected_shapes

    E, out = config.text.moe_num_experts, {}
    for name, shape in expected_shapes(config).items():
        if m := re.match(r"^(.*\.mlp)\.(text|vision)_router\.weight$", name):
            out[f"{m[1]}.gate.weight{'_1' if m[2] == 'vision' else ''}"] = (shape[1], shape[0])
        elif m := re.match(r"^(.*\.mlp)\.text_router\.e_score_correction_bias$", name):
            out[f"{m[1]}.moe_statics.e_score_correction_bias"] = (2, shape[0])  # row 0 text, row 1 vision
        elif m := re.match(r"^(.*\.mlp)\.(text|vision)_experts\.(gate_up|down)_proj$", name):
            offset, (n, rows, cols) = (0 if m[2] == "text" else E), shape
            for e in range(n):
                if m[3] == "down":
                    out[f"{m[1]}.experts.{offset + e}.down_proj.weight"] = (rows, cols)
                else:
                    out[f"{m[1]}.experts.{offset + e}.gate_proj.weight"] = (rows // 2, cols)
                    out[f"{m[1]}.experts.{offset + e}.up_proj.weight"] = (rows // 2, cols)
        elif "vision_router.e_score" not in name:
            out[re.sub(r"(_linear)\.(fc1|fc2|ln)\.", lambda k: f"{k[1]}.{ {'fc1': 0, 'fc2': 2, 'ln': 3}[k[2]]}.",
                       name)] = shape
    if config.tie_word_embeddings:  # the real repository stores the tied head anyway
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def shard_groups(config) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(file name, tensors): embeddings/norm/head/resampler first, one shard per layer, vision last."""
    L = config.text.num_hidden_layers
    groups: list[dict] = [{} for _ in range(L + 2)]
    for name, shape in baidu_shapes(config).items():
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        k = int(m[1]) + 1 if m else (L + 1 if name.startswith("vision_model.") else 0)
        groups[k][name] = shape
    n = len(groups)
    return [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", g) for k, g in enumerate(groups)]


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases and correction biases 0, everything else N(0, 0.02): finite in bf16."""
    x = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return x.zero_()
    if len(shape) == 1:
        return x.fill_(1.0)
    return x.normal_(0.0, 0.02, generator=gen)


def checkpoint_weight_bytes(config) -> int:
    """Bytes of the unique weights (the tied lm_head copy on disk not counted), all bf16."""
    shapes = baidu_shapes(config)
    shapes.pop("lm_head.weight" if config.tie_word_embeddings else "", None)
    return sum(2 * _numel(s) for s in shapes.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_dirs(config, random_init: bool) -> tuple[Path, Path]:
    kind = "config" if random_init else "random"
    stem = f"ernie-vl-{kind}-L{config.text.num_hidden_layers}-V{config.vision.depth}"
    return CACHE / stem, CACHE / f"{stem}-reference"


def ensure_checkpoints(config, random_init: bool) -> tuple[Path, Path]:
    """Both checkpoint directories, made on first use; a DONE file marks a complete one."""
    ours, ref = checkpoint_dirs(config, random_init)
    stamp = json.dumps({"layers": config.text.num_hidden_layers, "vision": config.vision.depth,
                        "weights": not random_init, "format": 1})
    if (ours / "DONE").is_file() and (ours / "DONE").read_text() == stamp and (ref / "DONE").is_file():
        return ours, ref
    for d in (ours, ref):
        d.mkdir(parents=True, exist_ok=True)
        (d / "DONE").unlink(missing_ok=True)
    _write_small_files(config, ours, ref)
    if not random_init:
        _write_weights(config, ours, ref)
    (ours / "DONE").write_text(stamp)
    (ref / "DONE").write_text(stamp)
    return ours, ref


def _write_small_files(config, ours: Path, ref: Path) -> None:
    from model.checkpoint.weights import config_to_baidu_dict
    from tests.helpers.tokenizer import make_tiny_processor_dir

    for d in (ours, ref):
        make_tiny_processor_dir(d)
    (ours / "config.json").write_text(json.dumps(config_to_baidu_dict(config, dtype=torch.bfloat16), indent=2))
    (ref / "config.json").write_text(json.dumps(reference_config_dict(config), indent=2))


def _write_weights(config, ours: Path, ref: Path) -> None:
    """Shard by shard (peak memory: one layer); the reference gets hard links plus its vision shard."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    groups = shard_groups(config)
    weight_map, ref_map = {}, {}
    for i, (file, shapes) in enumerate(groups):
        log(f"writing shard {i + 1}/{len(groups)} ({sum(2 * _numel(s) for s in shapes.values()) / 1e9:.2f} GB)")
        tensors = {name: random_tensor(name, shape, gen) for name, shape in shapes.items()
                   if name != "lm_head.weight"}
        if "lm_head.weight" in shapes:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, ours / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        if file == groups[-1][0]:  # the vision shard: same weights, transformers' prefix
            save_file({f"model.{k}": v for k, v in tensors.items()}, ref / file, metadata={"format": "pt"})
            ref_map.update({f"model.{k}": file for k in tensors})
        else:
            (ref / file).unlink(missing_ok=True)
            os.link(ours / file, ref / file)
            ref_map.update(dict.fromkeys(tensors, file))
        del tensors
    total = sum(2 * _numel(s) for _, g in groups for s in g.values())
    for d, wm in ((ours, weight_map), (ref, ref_map)):
        index = {"metadata": {"total_size": total}, "weight_map": wm}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def warm_page_cache(directory: Path) -> None:
    """Read every shard once so both sides load from the page cache, not from disk."""
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass


# --- machine figures --------------------------------------------------------------------------

def measure_bandwidth(device: str, size_bytes: int, repeats: int = 5) -> float:
    """Best (read + write bytes) / time of a large tensor copy, in bytes/s."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy also faults the destination pages in
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def decode_bytes_per_token(config, weight_bytes: int = 2, router_bytes: int = 4) -> dict[str, int]:
    """Weight bytes one batch-1 text token must read, by part (KV cache and vision not counted).

    per layer: norms 2*H + attention H*D*(2*Hq + 2*Hkv);
    dense layer: 3*H*I_dense;  MoE layer: K*3*H*I_text (routed) + 3*H*I_shared + router E*H (fp32);
    once: final norm H, embedding row H, lm_head (tied embedding) V*H.
    """
    t = config.text
    H, D, L, E = t.hidden_size, t.head_dim, t.num_hidden_layers, t.moe_num_experts
    n_moe = sum(t.is_moe_layer(i) for i in range(L))
    return {
        "attention": L * H * D * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * weight_bytes,
        "norms": (2 * L + 1) * H * weight_bytes,
        "dense_mlp": (L - n_moe) * 3 * H * t.intermediate_size * weight_bytes,
        "routed_experts": n_moe * t.moe_k * 3 * H * t.moe_intermediate_size[0] * weight_bytes,
        "shared_experts": n_moe * 3 * H * t.shared_intermediate_size * weight_bytes,
        "routers": n_moe * (E * H + E) * router_bytes,
        "embedding_row": H * weight_bytes,
        "lm_head": t.vocab_size * H * weight_bytes,
    }


def machine_info(device: str, threads: int) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        if m := re.search(r"^Model name:\s*(.+)$", lscpu, re.M):
            info["cpu"] = m[1].strip()
    except OSError:
        pass
    try:
        from importlib.metadata import version
        info["transformers"] = version("transformers")
    except Exception:  # not installed: --skip-reference runs still work
        info["transformers"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            from importlib.metadata import version
            info["triton"] = version("triton")
        except Exception:
            info["triton"] = None
    return info


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- one side, in its own process -------------------------------------------------------------

def make_image(size: int):
    """A deterministic size x size RGB picture with structure (gradients plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1)
    rgb = (rgb + rng.integers(0, 32, rgb.shape)).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb, "RGB")


def prompt_ids(n: int, seed: int) -> torch.Tensor:
    """(1, n): BOS then n-1 ordinary token ids of the tiny tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(FIRST_TEXT_ID, 1024, (n - 1,), generator=gen)
    return torch.cat([torch.tensor([BOS_ID]), body])[None]


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_worker(side_name: str, spec_path: Path) -> None:
    """Load one side, run the asked phases, write a JSON result (see ``run_side``)."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    module = importlib.import_module(SIDES[side_name])
    side = module.Side(Path(spec["checkpoint"]), spec["device"])
    if spec.get("quantize") and side_name == "ernie":
        side.quantize = spec["quantize"]  # int8 / int4 weights (benchmarks/quant.py compares them with bf16)
    out: dict = {"side": side_name, "rss_before_load": max_rss_bytes()}
    start = time.perf_counter()
    side.build_random() if spec["random_init"] else side.load()
    _sync(spec["device"])
    out.update(load_s=time.perf_counter() - start, rss_after_load=max_rss_bytes(),
               weight_bytes_in_memory=side.weight_bytes())
    log(f"{side_name}: loaded in {out['load_s']:.1f} s, max RSS {out['rss_after_load'] / 1e9:.2f} GB")
    for phase, fn in (("ttft", _phase_ttft), ("prefill", _phase_prefill), ("decode", _phase_decode)):
        if phase in spec["phases"]:
            out.update(fn(side, spec))
            log(f"{side_name}: {phase} done")
    if spec["profile"]:
        out["profile"] = _profile(side, spec, Path(spec["output_dir"]), side_name)
    out["rss_end"] = max_rss_bytes()
    if torch.device(spec["device"]).type == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["result"]).write_text(json.dumps(out, indent=1))


def _phase_ttft(side, spec) -> dict:
    image = make_image(spec["image_size"])
    side.image_first_token(image, IMAGE_PROMPT)  # warm-up
    runs = [side.image_first_token(image, IMAGE_PROMPT) for _ in range(spec["repeats"])]
    return {"ttft_s": min(s for s, _ in runs), "ttft_runs_s": [s for s, _ in runs],
            "ttft_prompt_tokens": runs[0][1], "ttft_image_size": spec["image_size"]}


def _phase_prefill(side, spec) -> dict:
    P = spec["prefill_tokens"]
    side.generate_timed(prompt_ids(min(P, 64), seed=1), 1)  # warm-up
    runs = [side.generate_timed(prompt_ids(P, seed=2 + r), 1)[0][0] for r in range(spec["repeats"])]
    return {"prefill_tok_s": P / min(runs), "prefill_runs_s": runs, "prefill_tokens": P}


def _phase_decode(side, spec) -> dict:
    N = spec["new_tokens"]
    side.generate_timed(prompt_ids(32, seed=3), 4)  # warm-up
    times, ids = side.generate_timed(prompt_ids(32, seed=4), N)
    if len(times) != N:
        raise RuntimeError(f"{side.__class__.__module__} generated {len(times)} tokens, expected exactly {N}")
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_token = (times[-1] - times[0]) / (N - 1)
    out = {"decode_tok_s": 1 / per_token, "decode_ms_per_token": 1000 * per_token,
           "decode_median_ms": 1000 * statistics.median(gaps), "decode_new_tokens": N, "decode_ids": ids}
    if torch.device(spec["device"]).type == "cuda":  # batched decode: B8 prompts of 32 tokens
        batch = torch.cat([prompt_ids(32, seed=10 + r) for r in range(B8)])  # (B8, 32)
        side.generate_timed(batch[:, :16], 4)  # warm-up (and, for ernie, the batch's graph)
        times, _ = side.generate_timed(batch, N)
        out.update(decode_b8_tok_s=B8 * (N - 1) / (times[-1] - times[0]), decode_b8_rows=B8)
    return out


# --- profiling (--profile) --------------------------------------------------------------------

_PROFILED = re.compile(r"(self_attn|mlp|text_moe|vision_moe|shared_experts|text_experts|vision_experts|"
                       r"text_router|vision_router|gate|vision_model|vision_tower|resampler_model|embed_tokens|"
                       r"lm_head|norm)$")


def _profile(side, spec, out_dir: Path, side_name: str) -> dict:
    """Per-module wall time (forward hooks) for one decode and one prefill; op tables to files."""
    from torch.profiler import ProfilerActivity, profile

    result = {}
    cases = {"decode": (prompt_ids(32, seed=5), 17), "prefill": (prompt_ids(spec["prefill_tokens"], seed=6), 1)}
    for case, (ids, n) in cases.items():
        with _ModuleTimer(side.profile_target()) as timer:
            times, _ = side.generate_timed(ids, n)
        total = times[-1] - (times[0] if case == "decode" else 0.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.generate_timed(ids, n)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out_dir / f"profile_{side_name}_{case}.txt").write_text(table)
        result[case] = {"total_s": times[-1], "modules_s": timer.totals(skip_prefill=case == "decode"),
                        "timed_span_s": total}
    return result


class _ModuleTimer:
    """Wall time spent inside modules whose names match ``_PROFILED``, layer indices folded into N."""

    def __init__(self, model):
        self.model, self.handles, self.calls, self.instances = model, [], {}, {}

    def __enter__(self):
        for name, module in self.model.named_modules():
            if name and _PROFILED.search(name):
                key = re.sub(r"\.\d+\.", ".N.", name)
                self.instances[key] = self.instances.get(key, 0) + 1
                self.handles.append(module.register_forward_pre_hook(self._pre(module)))
                self.handles.append(module.register_forward_hook(self._post(module, key)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _pre(module):
        def hook(*_):
            module._bench_t0 = time.perf_counter()
        return hook

    def _post(self, module, key):
        def hook(*_):
            self.calls.setdefault(key, []).append(time.perf_counter() - module._bench_t0)
        return hook

    def totals(self, skip_prefill: bool) -> dict[str, float]:
        """Seconds per module key, largest first. skip_prefill drops each instance's first call."""
        out = {key: round(sum(calls[self.instances[key] if skip_prefill else 0:]), 4)
               for key, calls in self.calls.items()}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --- orchestration ----------------------------------------------------------------------------

def run_side(side: str, args, checkpoint: Path, out_dir: Path) -> dict:
    """One side in a fresh interpreter; its JSON result, or {"error": ...} when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"checkpoint": str(checkpoint), "device": args.device, "threads": args.threads,
                "random_init": args.random_init, "quantize": args.quantize,
                "phases": [ph for ph in PHASES[1:] if args.only in (None, ph)],
                "image_size": args.image_size, "prefill_tokens": args.prefill_tokens,
                "new_tokens": args.new_tokens, "repeats": args.repeats, "profile": args.profile,
                "output_dir": str(out_dir), "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error"}
        log(f"running {side} (subprocess, {args.threads} threads)")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side,
                               "--spec", str(Path(tmp) / "spec.json")], env=env, check=False)
        result_file = Path(spec["result"])
        if proc.returncode != 0 or not result_file.is_file():
            return {"error": f"{side} worker exited with status {proc.returncode} (its stderr is above)"}
        return json.loads(result_file.read_text())


# How rounds merge: timings keep the best round, memory the worst; the decode figures come together
# from the round with the fastest decode (with the bandwidth measured around it); the rest from round 1.
_BEST_LOW = ("load_s", "ttft_s")
_BEST_HIGH = ("prefill_tok_s",)
_WORST_HIGH = ("rss_after_load", "rss_end")


def best_of(results: list[dict]) -> dict:
    """One side's results over rounds (see above); an error in any round is the side's error."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    merged = dict(results[0], rounds=len(results))
    for keys, pick in ((_BEST_LOW, min), (_BEST_HIGH, max), (_WORST_HIGH, max)):
        for key in keys:
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                merged[key] = pick(values)
    decoded = [r for r in results if r.get("decode_tok_s") is not None]
    if decoded:
        fastest = max(decoded, key=lambda r: r["decode_tok_s"])
        merged.update({k: v for k, v in fastest.items() if k.startswith("decode_")})
    return merged


def build_rows(config, ours: dict, ref: dict, bandwidth: float, weight_bytes: int,
               device: str = "cpu") -> list[dict]:
    """The table: one row per figure, with the ernie/reference ratio and the target check
    (TARGETS on a CPU, TARGETS_CUDA on a GPU)."""
    per_token = sum(decode_bytes_per_token(config).values())
    cuda = device == "cuda"
    targets = TARGETS_CUDA if cuda else TARGETS

    def bw_fraction(side: dict):
        if "decode_tok_s" not in side:
            return None
        return per_token * side["decode_tok_s"] / side.get("decode_bandwidth", bandwidth)

    def rss_ratio(side: dict):
        return side["rss_after_load"] / weight_bytes if "rss_after_load" in side else None

    def b8_over_b1(side: dict):
        return side["decode_b8_tok_s"] / side["decode_tok_s"] if side.get("decode_b8_tok_s") else None

    specs = [  # key, label, unit, ernie value, reference value, (target key, applies to "ratio" | "ernie") or None
        ("load_s", "load time" + (" (random weights built on the GPU)" if cuda else ""), "s",
         ours.get("load_s"), ref.get("load_s"), ("load_s", "ratio")),
        ("rss_after_load", "peak RSS after load", "GB", _gb(ours.get("rss_after_load")),
         _gb(ref.get("rss_after_load")), None),
        ("rss_over_weights", "peak RSS after load / weight bytes", "x", rss_ratio(ours), rss_ratio(ref),
         ("rss_over_weights", "ernie")),
        ("rss_end", "peak RSS at the end of the run", "GB", _gb(ours.get("rss_end")), _gb(ref.get("rss_end")), None),
        ("ttft_s", f"image TTFT ({_image_size(ours, ref)}, PIL -> first token)", "s", ours.get("ttft_s"),
         ref.get("ttft_s"), ("ttft_s", "ratio")),
        ("prefill_tok_s", f"prefill ({ours.get('prefill_tokens') or ref.get('prefill_tokens')}-token text)", "tok/s",
         ours.get("prefill_tok_s"), ref.get("prefill_tok_s"), ("prefill_tok_s", "ratio")),
        ("decode_tok_s", f"decode, batch 1 ({ours.get('decode_new_tokens') or ref.get('decode_new_tokens')} "
                         "new tokens)", "tok/s", ours.get("decode_tok_s"), ref.get("decode_tok_s"),
         ("decode_tok_s_abs", "ernie") if cuda else ("decode_tok_s", "ratio")),
        ("decode_ms_per_token", "decode time per token", "ms", ours.get("decode_ms_per_token"),
         ref.get("decode_ms_per_token"), None),
        ("decode_bw_fraction", "decode / memory-bandwidth limit", "fraction", bw_fraction(ours), bw_fraction(ref),
         ("decode_bw_fraction", "ernie")),
    ]
    if cuda:
        specs += [
            ("decode_b8_tok_s", f"decode, batch {B8} (tokens/s of all rows)", "tok/s", ours.get("decode_b8_tok_s"),
             ref.get("decode_b8_tok_s"), None),
            ("decode_b8_over_b1", f"decode batch {B8} / batch 1", "x", b8_over_b1(ours), b8_over_b1(ref),
             ("decode_b8_over_b1", "ernie")),
            ("gpu_peak", "peak GPU memory allocated", "GB", _gb(ours.get("gpu_peak_bytes")),
             _gb(ref.get("gpu_peak_bytes")), None),
        ]
    rows = []
    for key, label, unit, e, r, target in specs:
        ratio = e / r if e is not None and r else None
        row = {"metric": key, "label": label, "unit": unit, "ernie": e, "reference": r, "ratio": ratio,
               "target": None, "pass": None}
        if target and target[0] in targets:
            op, bound = targets[target[0]]
            applies = target[1]
            value = ratio if applies == "ratio" else e
            row["target"] = f"{'ratio' if applies == 'ratio' else 'ernie'} {op} {bound:.3g}"
            if value is not None:
                row["pass"] = value <= bound if op == "<=" else value >= bound
        rows.append(row)
    return rows


def _image_size(ours: dict, ref: dict) -> str:
    size = ours.get("ttft_image_size") or ref.get("ttft_image_size")
    return f"{size}x{size}" if size else "image"


def _gb(x):
    return x / 1e9 if x is not None else None


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def report_names(device: str) -> tuple[str, str]:
    """(json, markdown) file names: results.json / RESULTS.md, or results-cuda.json / RESULTS-cuda.md."""
    return ("results-cuda.json", "RESULTS-cuda.md") if device == "cuda" else ("results.json", "RESULTS.md")


def write_reports(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_name, md_name = report_names(report["machine"]["device"])
    (out_dir / json_name).write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / md_name).write_text(render_markdown(report))


def render_markdown(report: dict) -> str:
    m, c = report["machine"], report["checkpoint"]
    lines = [
        "# Benchmark results (latest run)", "",
        f"Made by `{report['command']}` on {m['date']}.", "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; load average at start {m['load_average_at_start']}.",
        f"- Software: torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}.",
        f"- Checkpoint: random bf16 weights, real ERNIE-4.5-VL-28B-A3B widths, {c['layers']} text layers "
        f"({c['moe_layers']} MoE), {c['vision_blocks']} vision blocks; {c['weight_bytes'] / 1e9:.2f} GB of weights"
        f" ({'built on the device' if c['random_init'] else 'Baidu layout on disk, loaded from the page cache'}).",
        f"- Memory bandwidth (copy, read+write): {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"weight bytes read per decoded token: {report['decode_bytes_per_token'] / 1e9:.3f} GB "
        f"(limit {report['bandwidth_bytes_per_s'] / report['decode_bytes_per_token']:.2f} tok/s).",
        *_rounds_line(report), "",
        "| figure | unit | ernie | reference | ernie/reference | target | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        verdict = {True: "PASS", False: "FAIL", None: "—" if r["target"] is None else "n/a"}[r["pass"]]
        lines.append(f"| {r['label']} | {r['unit']} | {_fmt(r['ernie'])} | {_fmt(r['reference'])} | "
                     f"{_fmt(r['ratio'])} | {r['target'] or ''} | {verdict} |")
    lines += ["", "Bytes read per decoded token (batch 1, text token; KV cache and vision weights not counted):", "",
              "`L*(2H + H*D*(2*Hq + 2*Hkv))*2 + n_dense*3*H*I_dense*2 + n_moe*(K*3*H*I_text*2 + 3*H*I_shared*2 + "
              "(E*H + E)*4) + H*2 (final norm) + H*2 (embedding row) + V*H*2 (tied lm_head)`", ""]
    lines += [f"- {k}: {v / 1e6:.1f} MB" for k, v in report["decode_bytes_breakdown"].items()]
    lines += ["", *consistency_lines(report["sides"])]
    errors = [f"- {side}: {res['error']}" for side, res in report["sides"].items() if "error" in res]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "Timings are wall-clock on a machine that may be shared; see benchmarks/README.md for the method.", ""]
    return "\n".join(lines)


def _rounds_line(report: dict) -> list[str]:
    n = len(report.get("rounds", []))
    if n <= 1:
        return []
    seen = ", ".join(f"{b / 1e9:.1f}" for b in report["bandwidth_rounds"])
    return [f"- {n} rounds, the sides alternating (ernie, reference, ernie, ...); each timing is the side's "
            "best round, each memory figure its worst. The bandwidth is measured before and after each side "
            f"(GB/s in order: {seen}); each side's decode fraction uses the faster copy around its fastest "
            "decode, the limit above the fastest copy of all. Every round is in results.json."]


def consistency_lines(sides: dict) -> list[str]:
    """Same checkpoint, same inputs: greedy ids and image prompt lengths should agree across sides."""
    ours, ref = sides.get("ernie", {}), sides.get("reference", {})
    lines = []
    if ours.get("decode_ids") and ref.get("decode_ids"):
        a, b = ours["decode_ids"], ref["decode_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lines.append(f"Sanity: the greedy decodes agree on their first {same} of {len(a)} tokens "
                     "(random weights in bf16: near-ties may flip a later token).")
    if ours.get("ttft_prompt_tokens") and ref.get("ttft_prompt_tokens"):
        lines.append(f"Sanity: image prompt length {ours['ttft_prompt_tokens']} tokens (ernie) vs "
                     f"{ref['ttft_prompt_tokens']} (reference).")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ernie vs transformers 5.23 on the same random-weight checkpoint")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=4, help="text layers (1 dense + the rest MoE); 28 = full size")
    p.add_argument("--vision-blocks", type=int, default=4, help="vision transformer blocks; 32 = full size")
    p.add_argument("--new-tokens", type=int, default=128, help="decode length (eos ignored)")
    p.add_argument("--prefill-tokens", type=int, default=1024, help="text prompt length for prefill")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions of TTFT and prefill (best kept)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run the sides alternately this many times (ernie, reference, ernie, ...) and keep "
                        "each side's best timings: on a shared machine speed drifts over minutes")
    p.add_argument("--only", choices=PHASES, default=None, help="one measurement (load is always done)")
    p.add_argument("--skip-reference", action="store_true", help="measure ernie only")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="ernie's weights quantized (as --quantize); e.g. --device cuda --skip-reference, "
                        "against a bf16 run, for the GPU decode target of issue 20")
    p.add_argument("--init", choices=("disk", "random"), default=None,
                   help="disk: cached checkpoint (CPU default; on CUDA it times loading the shards onto the GPU); "
                        "random: build weights on the device (CUDA default)")
    p.add_argument("--profile", action="store_true", help="also per-module timings and op tables (profile_*.txt)")
    p.add_argument("--bandwidth-mib", type=int, default=None, help="size of the bandwidth copy (default 512/2048)")
    p.add_argument("--output-dir", type=Path, default=HERE, help="where RESULTS.md and results.json go")
    p.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.random_init = (args.init or ("random" if args.device == "cuda" else "disk")) == "random"
    if args.new_tokens < 2 or args.prefill_tokens < 2 or min(args.repeats, args.threads, args.rounds) < 1:
        p.error("--new-tokens and --prefill-tokens must be >= 2, --repeats, --threads and --rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.spec)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here")
    torch.set_num_threads(args.threads)
    config = bench_config(args.layers, args.vision_blocks)
    log(f"checkpoint: {args.layers} text layers, {args.vision_blocks} vision blocks")
    ours_dir, ref_dir = ensure_checkpoints(config, args.random_init)
    size = (args.bandwidth_mib or (2048 if args.device == "cuda" else 512)) << 20
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rounds, bandwidths = [], []
    for r in range(args.rounds):
        rounds.append({})
        for side, directory in (("ernie", ours_dir), ("reference", ref_dir)):
            if side == "reference" and args.skip_reference:
                continue
            if not args.random_init:
                warm_page_cache(directory)
            before = measure_bandwidth(args.device, size)
            result = run_side(side, args, directory, args.output_dir)
            after = measure_bandwidth(args.device, size)  # decode is the side's last phase
            bandwidths += [before, after]
            log(f"round {r + 1}/{args.rounds}, {side}: memory bandwidth {before / 1e9:.1f} GB/s before, "
                f"{after / 1e9:.1f} after")
            # the decode fraction uses the faster of the copies around it (the stricter limit)
            rounds[-1][side] = dict(result, decode_bandwidth=max(before, after))
    bandwidth = max(bandwidths)
    sides = {side: best_of([rnd[side] for rnd in rounds]) for side in rounds[0]}
    weight_bytes = checkpoint_weight_bytes(config)
    breakdown = decode_bytes_per_token(config)
    report = {
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(args.device, args.threads),
        "checkpoint": {"layers": args.layers, "moe_layers": args.layers - 1, "vision_blocks": args.vision_blocks,
                       "weight_bytes": weight_bytes, "random_init": args.random_init, "path": str(ours_dir)},
        "bandwidth_bytes_per_s": bandwidth, "decode_bytes_per_token": sum(breakdown.values()),
        "decode_bytes_breakdown": breakdown,
        "sides": sides, "rounds": rounds, "bandwidth_rounds": bandwidths,
        "rows": build_rows(config, sides.get("ernie", {}), sides.get("reference", {}), bandwidth, weight_bytes,
                           args.device),
        "targets": {k: list(v) for k, v in (TARGETS_CUDA if args.device == "cuda" else TARGETS).items()},
    }
    write_reports(args.output_dir, report)
    print(render_markdown(report))
    return 0 if all("error" not in s for s in sides.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
