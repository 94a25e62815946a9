"""A measured lower bound for the image time-to-first-token on this machine.

    .venv/bin/python benchmarks/ttft_floor.py                  # the bench.py checkpoint's widths
    .venv/bin/python benchmarks/ttft_floor.py --rounds 5 --json /tmp/floor.json

Lists every matrix product that the first token of bench.py's image prompt needs (448x448
picture, 287 tokens: 256 picture tokens and 31 text tokens; 4 vision blocks, 4 text layers of which
3 are MoE, the last layer kept to one row), and times each shape on its own in bfloat16, best of
``--rounds``: products through torch (oneDNN on the CPU) on M rows or M padded to a multiple of 16,
attention through the fastest of SDPA, ernie's flash kernel and the bare batched products.
Products whose weights cannot stay in cache from one use to the next are charged at least their
weight bytes over the fastest large read of this run. Vision experts are charged at the even
split (1536 slots over 64 experts), text experts at the number of distinct experts that 31 tokens
pick under an even routing.

Two totals: "timed" adds each shape's own best time; "at peak" charges every FLOP at the fastest
rate any shape reached (still with the memory charges), which no implementation of the same
arithmetic on this machine can beat. Everything else (norms, activations, rotary embeddings,
routing, the processor, Python) is left out of both. bench.py's image TTFT target for ernie (the
reference's TTFT / 1.5) can be set against them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # model/, tests/ (bench.py's tiny tokenizer ids)
sys.path.insert(0, str(HERE))  # bench.py, when imported rather than run

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import bench_config  # noqa: E402

READ_BYTES = 1 << 30  # the large read that sets the bandwidth charge


def products(config, patches: int, text_tokens: int, images: int = 1, self_paired: bool = False) -> list[dict]:
    """(stage, name, M, K, N, count, streamed) for each product of an image prompt's first token:
    ``patches`` vision patches in all, ``text_tokens`` prompt tokens that are not picture tokens
    (the start and end marks of each of ``images`` pictures among them). ``self_paired``: the
    resampler's temporal fc1 takes each picture row once (an fp32 model's images, see
    model/resampler.py); bf16, as timed here, pairs the row with itself.

    streamed: the weight is read from memory once per use (it does not fit in cache next to the
    rest), so its time is at least its bytes over the read bandwidth.
    """
    t, v = config.text, config.vision
    merge = v.spatial_merge_size ** 2
    image_tokens = patches // merge
    T = image_tokens + text_tokens
    vision_routed = image_tokens + 2 * images
    text_routed = text_tokens - 2 * images
    H, D, Hq, Hkv = t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    E, K = t.moe_num_experts, t.moe_k
    I_text, I_vis = t.moe_intermediate_size
    I_shared = t.shared_intermediate_size
    V, Vi = v.hidden_size, v.intermediate_size
    rows: list[dict] = []

    def add(stage, name, M, Kd, N, count=1, streamed=False):
        rows.append(dict(stage=stage, name=name, M=M, K=Kd, N=N, count=count, streamed=streamed))

    add("vision", "patch embed", patches, v.patch_dim, V)
    for name, Kd, N in (("qkv", V, 3 * V), ("proj", V, V), ("fc1", V, Vi), ("fc2", Vi, V)):
        add("vision", name, patches, Kd, N, v.depth)
    spatial = V * merge
    add("resampler", "spatial fc1", image_tokens, spatial, spatial)
    add("resampler", "spatial fc2", image_tokens, spatial, spatial)
    add("resampler", "temporal fc1", image_tokens, spatial * (1 if self_paired else v.temporal_merge_size), spatial)
    add("resampler", "temporal fc2", image_tokens, spatial, spatial)
    add("resampler", "to text width", image_tokens, spatial, H)

    full_layers = t.num_hidden_layers - 1  # the last layer keeps one row after its keys and values
    add("decoder", "qkv", T, H, D * (Hq + 2 * Hkv), full_layers)
    add("decoder", "o", T, Hq * D, H, full_layers)
    n_dense = sum(1 for i in range(full_layers) if not t.is_moe_layer(i))
    n_moe = full_layers - n_dense
    if n_dense:
        add("decoder", "dense gate/up", T, H, 2 * t.intermediate_size, n_dense, True)
        add("decoder", "dense down", T, t.intermediate_size, H, n_dense, True)
    if n_moe:
        if I_shared:
            add("decoder", "shared gate/up", T, H, 2 * I_shared, n_moe, True)
            add("decoder", "shared down", T, I_shared, H, n_moe, True)
        # the start and end tokens around each picture go to the vision experts too
        for bank, tokens, width, distinct in (
                ("vision", vision_routed, I_vis, E),
                ("text", text_routed, I_text, round(E * (1 - (1 - K / E) ** text_routed)))):
            for rows_each, experts in _even_split(tokens * K, distinct):
                add("decoder", f"{bank} expert gate/up", rows_each, H, 2 * width, n_moe * experts, True)
                add("decoder", f"{bank} expert down", rows_each, width, H, n_moe * experts, True)
    add("decoder", "last layer kv", T, H, 2 * Hkv * D, 1)
    add("decoder", "last layer q", 1, H, Hq * D, 1, True)
    add("decoder", "last layer o", 1, Hq * D, H, 1, True)
    if t.is_moe_layer(t.num_hidden_layers - 1):  # the kept row is a text token
        add("decoder", "last layer text experts", 1, H, 3 * I_text * K, 1, True)
        if I_shared:
            add("decoder", "last layer shared", 1, H, 3 * I_shared, 1, True)
    else:
        add("decoder", "last layer dense", 1, H, 3 * t.intermediate_size, 1, True)
    add("decoder", "lm head", 1, H, t.vocab_size, 1, True)
    return rows


def _even_split(slots: int, experts: int) -> list[tuple[int, int]]:
    """slots spread over experts as evenly as they go: [(rows each, how many experts)]."""
    experts = max(1, min(experts, slots))
    low, extra = divmod(slots, experts)
    return [(n, k) for n, k in ((low + 1, extra), (low, experts - extra)) if n and k]


def attention_shapes(config, patches: int, text_tokens: int) -> list[dict]:
    """The attention of each vision block and each full text layer: (stage, heads, kv heads, T, D, count, causal)."""
    t, v = config.text, config.vision
    T = patches // v.spatial_merge_size ** 2 + text_tokens
    return [dict(stage="vision", name="attention", Hq=v.num_heads, Hkv=v.num_heads, T=patches,
                 D=v.hidden_size // v.num_heads, count=v.depth, causal=False),
            dict(stage="decoder", name="attention", Hq=t.num_attention_heads, Hkv=t.num_key_value_heads, T=T,
                 D=t.head_dim, count=t.num_hidden_layers - 1, causal=True)]


def best_time(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(rounds: int) -> float:
    """Bytes per second of the fastest of a few large reads (a sum and a max over 1 GiB)."""
    x = torch.ones(READ_BYTES // 4)
    return max(READ_BYTES / best_time(x.sum, rounds), READ_BYTES / best_time(x.amax, rounds))


def time_product(row: dict, rounds: int) -> float:
    """The faster of torch's product on M rows and on M zero-padded to a multiple of 16 (oneDNN's
    blocking is poor for some row counts; model/backends/cpu/linear.py pads the same way)."""
    w = torch.randn(row["N"], row["K"]).to(torch.bfloat16)
    best = float("inf")
    for M in {row["M"], -(-row["M"] // 16) * 16 if row["M"] > 16 else row["M"]}:
        x = torch.randn(M, row["K"]).to(torch.bfloat16)
        best = min(best, best_time(lambda: F.linear(x, w), rounds))
    return best


def time_attention(row: dict, rounds: int) -> tuple[float, str]:
    """The fastest of SDPA, the two batched products alone (no softmax) and, where it applies,
    ernie's flash kernel; a causal product is charged half (a causal kernel skips half the blocks)."""
    from model.backends.cpu import kernels

    q = torch.randn(1, row["Hq"], row["T"], row["D"]).to(torch.bfloat16)
    k = torch.randn(1, row["Hkv"], row["T"], row["D"]).to(torch.bfloat16)
    v = torch.randn_like(k)
    causal = row["causal"]
    ways = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)}
    group = row["Hq"] // row["Hkv"]
    kt = k.repeat_interleave(group, 1)[0].transpose(1, 2).contiguous()  # (Hq, D, T)
    vv = v.repeat_interleave(group, 1)[0].contiguous()  # (Hq, T, D)
    p = torch.randn(row["Hq"], row["T"], row["T"]).to(torch.bfloat16)
    ways["bmm"] = lambda: (torch.bmm(q[0], kt), torch.bmm(p, vv))
    if kernels.flash_attn_applies(q, k, v):
        ways["flash"] = lambda: kernels.flash_attn(q, k, v, causal=causal)
    times = {}
    for name, fn in ways.items():
        seconds = best_time(fn, rounds)
        times[name] = seconds / 2 if causal and name == "bmm" else seconds
    name = min(times, key=times.get)
    return times[name], name


def measure(config, patches: int, text_tokens: int, rounds: int) -> dict:
    bandwidth = read_bandwidth(rounds)
    out = []
    for row in products(config, patches, text_tokens):
        compute = time_product(row, rounds)
        flops = 2 * row["M"] * row["K"] * row["N"]
        memory = row["N"] * row["K"] * 2 / bandwidth if row["streamed"] else 0.0
        out.append({**row, "flops": flops, "compute_s": compute, "memory_s": memory, "via": "linear"})
    for row in attention_shapes(config, patches, text_tokens):
        compute, via = time_attention(row, rounds)
        flops = 4 * row["Hq"] * row["T"] * row["T"] * row["D"] * (0.5 if row["causal"] else 1.0)
        out.append({**row, "M": row["T"], "K": row["D"], "N": row["T"], "flops": flops, "compute_s": compute,
                    "memory_s": 0.0, "via": via})
    peak = max(r["flops"] / r["compute_s"] for r in out)
    stages: dict[str, dict[str, float]] = {}
    for r in out:
        r["gflop_s"] = r["flops"] / r["compute_s"] / 1e9
        r["timed_s"] = max(r["compute_s"], r["memory_s"]) * r["count"]
        r["at_peak_s"] = max(r["flops"] / peak, r["memory_s"]) * r["count"]
        stage = stages.setdefault(r["stage"], {"timed_s": 0.0, "at_peak_s": 0.0})
        stage["timed_s"] += r["timed_s"]
        stage["at_peak_s"] += r["at_peak_s"]
    return {"read_bandwidth_bytes_s": bandwidth, "peak_flop_s": peak, "rows": out, "stages": stages,
            "timed_s": sum(s["timed_s"] for s in stages.values()),
            "at_peak_s": sum(s["at_peak_s"] for s in stages.values()),
            "gflop": sum(r["flops"] * r["count"] for r in out) / 1e9}


def report(result: dict) -> str:
    lines = [f"read bandwidth (best large read): {result['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s; "
             f"fastest product: {result['peak_flop_s'] / 1e9:.0f} GFLOP/s", "",
             f"{'stage':<10}{'product':<26}{'M':>6}{'K':>7}{'N':>7}{'x':>5}{'via':>7}{'GFLOP/s':>9}"
             f"{'timed ms':>10}{'at peak':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['stage']:<10}{r['name']:<26}{r['M']:>6}{r['K']:>7}{r['N']:>7}{r['count']:>5}"
                     f"{r['via']:>7}{r['gflop_s']:>9.0f}{r['timed_s'] * 1e3:>10.1f}{r['at_peak_s'] * 1e3:>9.1f}")
    lines.append("")
    for stage, s in result["stages"].items():
        lines.append(f"{stage:<10}{s['timed_s'] * 1e3:9.1f} ms timed {s['at_peak_s'] * 1e3:9.1f} ms at peak")
    lines.append(f"{'total':<10}{result['timed_s'] * 1e3:9.1f} ms timed {result['at_peak_s'] * 1e3:9.1f} ms at peak"
                 f"  ({result['gflop']:.0f} GFLOP)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-blocks", type=int, default=4)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text-tokens", type=int, default=31, help="text tokens of the prompt around the picture")
    p.add_argument("--rounds", type=int, default=3, help="timings per shape, the best kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args.layers, args.vision_blocks)
    patches = (args.image_size // config.vision.patch_size) ** 2
    result = measure(config, patches, args.text_tokens, args.rounds)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
