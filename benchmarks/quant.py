"""Weight-only int8 / int4 against bf16 on the bench checkpoint (real widths), in one run.

    .venv/bin/python benchmarks/quant.py                        # 2 rounds, 4 text layers, 4 vision blocks
    .venv/bin/python benchmarks/quant.py --rounds 3 --new-tokens 128 --output-dir /tmp/q

What it does (figures and targets in RESULTS-quant.md):
1. makes (or reuses) bench.py's random bf16 checkpoint under benchmarks/.cache/, then writes the
   int8 and int4 copies with the same code as `ernie quantize`, each in its own process: its time
   and peak RSS are those of `--quantize` (quantized while loading, layer by layer);
2. group sizes: on real-width weights of the checkpoint, the relative RMS error of each group size
   and the time of the decode product (one row, in-process, the sizes alternating);
3. rounds of three subprocesses, bf16 / int8 / int4 alternating: resident memory added by the load
   (RSS after minus before), the bytes of tensors the model holds, batch-1 greedy decode speed,
   the last-position logits of a fixed prompt (cosine similarity to bf16's) and greedy agreement
   over 64 tokens (free-running: tokens equal to bf16's before the first difference; teacher-forced
   on bf16's sequence: positions whose top-1 equals bf16's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import bench  # noqa: E402  (the checkpoint, the prompts, the bandwidth, machine info)

VARIANTS = ("bf16", "int8", "int4")
TARGETS = {"resident_ratio": {"int8": 0.56, "int4": 0.32}, "decode_speedup": {"int8": 1.6, "int4": 2.5}}
AGREE_TOKENS = 64


def log(msg: str) -> None:
    print(f"[quant {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """Current resident set (not the peak): /proc/self/statm's second field."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quantized_dir(source: Path, bits: int) -> Path:
    return source.parent / f"{source.name}-int{bits}"


# --- workers (subprocesses) ------------------------------------------------------------------------

def worker_quantize(source: Path, bits: int, out: Path) -> dict:
    from model import load_pretrained
    from model.checkpoint.quantized import save_quantized

    start = time.perf_counter()
    model = load_pretrained(str(source), device="cpu", quantize=f"int{bits}")
    load_s = time.perf_counter() - start
    peak_load = bench.max_rss_bytes()
    save_quantized(model, source, out, force=True)
    return {"quantize_load_s": load_s, "peak_rss_quantize_load": peak_load, "total_s": time.perf_counter() - start,
            "peak_rss_total": bench.max_rss_bytes(),
            "size_on_disk": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def worker_run(checkpoint: Path, new_tokens: int, reference_ids: list[int] | None) -> dict:
    from model import load_pretrained
    from model.generation.generate import GenerationConfig, Step, stream_generate

    before = rss_bytes()
    start = time.perf_counter()
    model = load_pretrained(str(checkpoint), dtype="bfloat16", device="cpu")
    out = {"load_s": time.perf_counter() - start, "resident_added": rss_bytes() - before,
           "held_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                             if t.device.type != "meta")}
    prompt = bench.prompt_ids(32, seed=4)

    def greedy(ids, n):
        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=())
        times, cpu, new = [], [], []
        t0, c0 = time.perf_counter(), time.process_time()
        for event in stream_generate(model, ids, config=config):
            if isinstance(event, Step):
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                new.append(int(event.token_ids[0]))
        return times, cpu, new

    # warm-up as long as the timed run: the weights are mapped from the checkpoint, and a routed
    # expert's pages are faulted in on its first use, so a short warm-up leaves the timed run paying
    # for the first touch of most experts (more of them, and more pages, in bf16)
    greedy(bench.prompt_ids(32, seed=3), max(new_tokens, AGREE_TOKENS))
    times, cpu, ids = greedy(prompt, max(new_tokens, AGREE_TOKENS))
    per_token = (times[new_tokens - 1] - times[0]) / (new_tokens - 1)
    cpu_per_token = (cpu[new_tokens - 1] - cpu[0]) / (new_tokens - 1)
    # CPU seconds per token: on a machine other processes share, the cost of a token apart from
    # the time spent waiting for a core (with one thread; with more, OpenMP's spin-waits count too)
    out.update(decode_cpu_tok_s=1 / cpu_per_token, decode_cpu_ms_per_token=1000 * cpu_per_token)
    out.update(decode_tok_s=1 / per_token, decode_ms_per_token=1000 * per_token,
               decode_median_ms=1000 * statistics.median(b - a for a, b in zip(times, times[1:new_tokens])),
               greedy_ids=ids[:AGREE_TOKENS])
    with torch.no_grad():
        last = model(input_ids=prompt).logits[0, -1].float()
        out["last_logits"] = last.tolist()
        if reference_ids is not None:
            seq = torch.cat([prompt, torch.tensor([reference_ids])], dim=1)
            logits = model(input_ids=seq).logits[0, prompt.shape[1] - 1:-1]  # predictions of the 64 reference tokens
            out["teacher_forced_top1"] = logits.argmax(-1).tolist()
    return out


def worker_groups(source: Path) -> dict:
    """Relative RMS error and one-row product time per group size, on real-width weights."""
    from model.backends.cpu import kernels, qkernels
    from model.backends.qformat import QuantizedWeight
    from model.checkpoint.loading import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint.open(source)
    names = [n for n in ckpt if n.endswith(("experts.0.up_proj.weight", "experts.0.down_proj.weight",
                                            "self_attn.q_proj.weight", "shared_experts.up_proj.weight"))][:8]
    weights = [ckpt[n].clone() for n in names]
    out = {"weights": names, "error": {}, "gemv_ms": {}}
    for bits, groups in ((8, (32, 64, 128, 256)), (4, (32, 64, 128))):
        for G in groups:
            qws = [QuantizedWeight.quantize(w, bits, G) for w in weights]
            num = sum(float((q.dequantize() - w.float()).pow(2).sum()) for q, w in zip(qws, weights))
            den = sum(float(w.float().pow(2).sum()) for w in weights)
            key = f"int{bits}-g{G}"
            out["error"][key] = (num / den) ** 0.5
            out["bits_per_weight"] = out.get("bits_per_weight", {})
            out["bits_per_weight"][key] = 8 * qws[0].nbytes / weights[0].numel()
            x = torch.randn(1, weights[0].shape[1]).bfloat16()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for q, w in zip(qws, weights):
                    if q.shape[1] == x.shape[1]:
                        qkernels.gemv(x, q)
                times.append(time.perf_counter() - t0)
            out["gemv_ms"][key] = 1000 * min(times)
    x = torch.randn(1, weights[0].shape[1]).bfloat16()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for w in weights:
            if w.shape[1] == x.shape[1]:
                kernels.bf16_gemv(x, w)
        times.append(time.perf_counter() - t0)
    out["gemv_ms"]["bf16"] = 1000 * min(times)
    out["build"] = qkernels.build_in_use()
    return out


def run_worker(argv: list[str]) -> None:
    kind, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if kind == "quantize":
        out = worker_quantize(Path(spec["source"]), spec["bits"], Path(spec["out"]))
    elif kind == "groups":
        out = worker_groups(Path(spec["source"]))
    else:
        out = worker_run(Path(spec["checkpoint"]), spec["new_tokens"], spec.get("reference_ids"))
    Path(spec["result"]).write_text(json.dumps(out))


def subprocess_worker(kind: str, spec: dict, tmp: Path) -> dict:
    spec_path, result = tmp / f"{kind}-spec.json", tmp / f"{kind}-result.json"
    spec["result"] = str(result)
    spec_path.write_text(json.dumps(spec))
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    subprocess.run([sys.executable, __file__, "--worker", kind, str(spec_path)], check=True, env=env)
    return json.loads(result.read_text())


# --- the run -----------------------------------------------------------------------------------------

def cosine(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-blocks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--requantize", action="store_true", help="write the int8/int4 copies again")
    p.add_argument("--output-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    config = bench.bench_config(args.layers, args.vision_blocks)
    source, _ = bench.ensure_checkpoints(config, random_init=False)
    tmp = bench.CACHE / "quant-work"
    tmp.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "args": vars(args) | {"output_dir": str(args.output_dir)},
              "machine": bench.machine_info("cpu", args.threads), "load_average": os.getloadavg(),
              "source_bytes": sum(f.stat().st_size for f in source.glob("*.safetensors")), "quantize": {}, "rounds": []}
    for bits in (8, 4):
        out = quantized_dir(source, bits)
        if args.requantize or not (out / "config.json").is_file():
            log(f"writing the int{bits} copy (quantized while loading, as --quantize does)")
            report["quantize"][f"int{bits}"] = subprocess_worker(
                "quantize", {"source": str(source), "bits": bits, "out": str(out), "threads": args.threads}, tmp)
    bench.warm_page_cache(source)
    for bits in (8, 4):
        bench.warm_page_cache(quantized_dir(source, bits))
    log("group sizes")
    report["groups"] = subprocess_worker("groups", {"source": str(source), "threads": args.threads}, tmp)
    report["bandwidth"] = [bench.measure_bandwidth("cpu", 1 << 30)]
    reference_ids = None
    for r in range(args.rounds):
        row = {}
        for variant in VARIANTS:
            checkpoint = source if variant == "bf16" else quantized_dir(source, int(variant[3:]))
            log(f"round {r + 1}: {variant}")
            row[variant] = subprocess_worker("run", {"checkpoint": str(checkpoint), "new_tokens": args.new_tokens,
                                                     "threads": args.threads, "reference_ids": reference_ids}, tmp)
            if variant == "bf16" and reference_ids is None:
                reference_ids = row[variant]["greedy_ids"]
                row[variant] = subprocess_worker("run", {"checkpoint": str(checkpoint), "new_tokens": args.new_tokens,
                                                         "threads": args.threads, "reference_ids": reference_ids}, tmp)
            log(f"round {r + 1}: {variant} {row[variant]['decode_tok_s']:.1f} tok/s, "
                f"+{row[variant]['resident_added'] / 1e9:.2f} GB resident")
        report["rounds"].append(row)
        report["bandwidth"].append(bench.measure_bandwidth("cpu", 1 << 30))
    summarise(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(report))
    for row in slim["rounds"]:
        for v in row.values():
            v.pop("last_logits", None)
    (args.output_dir / "results-quant.json").write_text(json.dumps(slim, indent=1))
    (args.output_dir / "RESULTS-quant.md").write_text(render(report))
    print(render(report))
    return 0


def summarise(report: dict) -> None:
    """Per variant: best decode, worst resident memory, accuracy against the bf16 of the same round."""
    rows, s = report["rounds"], {}
    for v in VARIANTS:
        runs = [row[v] for row in rows]
        s[v] = {"decode_tok_s": max(x["decode_tok_s"] for x in runs), "decode_runs": [x["decode_tok_s"] for x in runs],
                "decode_cpu_tok_s": max(x.get("decode_cpu_tok_s", 0) for x in runs) or None,
                "resident_added": max(x["resident_added"] for x in runs), "held_bytes": runs[0]["held_bytes"],
                "load_s": min(x["load_s"] for x in runs)}
    bf16 = s["bf16"]
    for v in VARIANTS[1:]:
        runs = [row[v] for row in rows]
        s[v]["resident_ratio"] = s[v]["resident_added"] / bf16["resident_added"]
        s[v]["held_ratio"] = s[v]["held_bytes"] / bf16["held_bytes"]
        s[v]["decode_speedup"] = s[v]["decode_tok_s"] / bf16["decode_tok_s"]
        if s[v]["decode_cpu_tok_s"] and bf16["decode_cpu_tok_s"]:
            s[v]["decode_cpu_speedup"] = s[v]["decode_cpu_tok_s"] / bf16["decode_cpu_tok_s"]
        s[v]["decode_speedup_per_round"] = [row[v]["decode_tok_s"] / row["bf16"]["decode_tok_s"] for row in rows]
        s[v]["cosine_last_logits"] = min(cosine(row[v]["last_logits"], row["bf16"]["last_logits"]) for row in rows)
        ref = rows[0]["bf16"]["greedy_ids"]
        s[v]["greedy_same_prefix"] = min(first_difference(x["greedy_ids"], ref) for x in runs)
        s[v]["teacher_forced_agreement"] = min(
            sum(a == b for a, b in zip(x["teacher_forced_top1"], ref)) / len(ref) for x in runs)
    report["summary"] = s


def render(report: dict) -> str:
    s, a, q, g = report["summary"], report["args"], report["quantize"], report["groups"]
    m = report["machine"]
    gb = lambda b: f"{b / 1e9:.2f} GB"
    lines = [
        "# Weight-only quantization: results (latest run)", "",
        f"Made by `python benchmarks/quant.py --rounds {a['rounds']} --new-tokens {a['new_tokens']}` on {report['date']}.", "",
        f"- Machine: {m.get('cpu', 'CPU')}, {a['threads']} torch threads; load average at start "
        f"{[round(x, 2) for x in report['load_average']]} (the machine is shared: the variants alternate, each "
        "timing is its best round, each memory figure its worst).",
        f"- Checkpoint: bench.py's random bf16 weights at ERNIE-4.5-VL-28B-A3B widths, {a['layers']} text layers, "
        f"{a['vision_blocks']} vision blocks ({gb(report['source_bytes'])}); the quantized copies written by the "
        "code of `ernie quantize`. CPU kernel build: " + str(g.get("build")) + ".",
        f"- Memory bandwidth (copy): {', '.join(f'{b / 1e9:.1f}' for b in report['bandwidth'])} GB/s.", "",
        "| figure | bf16 | int8 | int4 | target | pass |", "|---|---|---|---|---|---|",
    ]
    def row(name, fmt, key, target=None):
        vals = [fmt(s[v][key]) if key in s[v] else "—" for v in VARIANTS]
        if target:
            tgt = f"int8 {TARGETS[target]['int8']}, int4 {TARGETS[target]['int4']}"
            cmp = (lambda v: s[v][key] <= TARGETS[target][v]) if target == "resident_ratio" else \
                (lambda v: s[v][key] >= TARGETS[target][v])
            ok = "PASS" if all(cmp(v) for v in VARIANTS[1:]) else "FAIL"
            lines.append(f"| {name} | {' | '.join(vals)} | {('<= ' if target == 'resident_ratio' else '>= ') + tgt} | {ok} |")
        else:
            lines.append(f"| {name} | {' | '.join(vals)} | | |")
    row("resident memory added by the load", gb, "resident_added")
    row("resident memory / bf16's", lambda x: f"{x:.3f}", "resident_ratio", "resident_ratio")
    row("tensor bytes the model holds", gb, "held_bytes")
    row("tensor bytes / bf16's", lambda x: f"{x:.3f}", "held_ratio")
    row("load time (s)", lambda x: f"{x:.2f}", "load_s")
    row("decode, batch 1 (tok/s, best round)", lambda x: f"{x:.1f}", "decode_tok_s")
    row("decode speed-up over bf16", lambda x: f"{x:.2f}", "decode_speedup", "decode_speedup")
    if all(s[v].get("decode_cpu_tok_s") for v in VARIANTS):
        row("decode, CPU time per token (tok per CPU-second, best round)", lambda x: f"{x:.1f}", "decode_cpu_tok_s")
        row("decode speed-up over bf16 in CPU time", lambda x: f"{x:.2f}", "decode_cpu_speedup", "decode_speedup")
    row("cosine of last-position logits to bf16's (worst round)", lambda x: f"{x:.5f}", "cosine_last_logits")
    row(f"greedy tokens equal to bf16's before the first difference (of {AGREE_TOKENS})", str, "greedy_same_prefix")
    row(f"teacher-forced top-1 agreement with bf16 over {AGREE_TOKENS} tokens", lambda x: f"{x:.3f}",
        "teacher_forced_agreement")
    lines += ["", "Decode tok/s per round: " + "; ".join(f"{v} {', '.join(f'{x:.1f}' for x in s[v]['decode_runs'])}"
                                                        for v in VARIANTS)]
    if q:
        lines += ["", "Quantizing while loading (the `--quantize` path, and `ernie quantize` before it writes):", ""]
        for name, r in q.items():
            lines.append(f"- {name}: loaded and quantized in {r['quantize_load_s']:.1f} s, peak RSS "
                         f"{gb(r['peak_rss_quantize_load'])} ({r['peak_rss_quantize_load'] / report['source_bytes']:.2f}x "
                         f"of the bf16 checkpoint); written in {r['total_s']:.1f} s in all, {gb(r['size_on_disk'])} on disk.")
    lines += ["", "Group sizes, on " + f"{len(g['weights'])} real-width weights of the checkpoint (random N(0, 0.02)): "
              "relative RMS error of the dequantized weight, bits per weight (scales and zeros included), and one "
              "row times each weight through the C kernel (ms, best of 5; bf16 through its GEMV):", "",
              "| format | rel. RMS error | bits/weight | one-row products (ms) |", "|---|---|---|---|"]
    for key in g["error"]:
        lines.append(f"| {key} | {g['error'][key]:.4f} | {g['bits_per_weight'][key]:.3f} | {g['gemv_ms'][key]:.2f} |")
    lines.append(f"| bf16 | 0 | 16 | {g['gemv_ms']['bf16']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2:])
    else:
        sys.exit(main())
