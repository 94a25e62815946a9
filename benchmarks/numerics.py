"""How accurate are ernie's and the reference's bf16 logits? Both against an fp32 ground truth.

    .venv/bin/python benchmarks/numerics.py                      # 2 text layers, 1 vision block, 32 tokens
    .venv/bin/python benchmarks/numerics.py --layers 3 --new-tokens 48 --json /tmp/numerics.json

Why: on random weights the greedy decodes of ernie and the reference (benchmarks/bench.py)
can part after a token or two. That is expected when the top two logits are nearly tied and the
two bf16 implementations round differently; it would be a bug if ernie's bf16 arithmetic were
less accurate than the reference's. This script measures which.

What it does:
1. makes (once, cached by bench.py's own code under benchmarks/.cache/ernie-vl-random-L{N}-V{M}/)
   a random bf16 checkpoint with the real ERNIE-4.5-VL widths and few layers (1 dense + N-1 MoE);
2. loads ernie in fp32 from it (the same bf16 weights, exact in fp32): the ground truth. It
   decodes ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` random text prompt (the
   truth sequence, and the fp32 logits of every step), and runs prompt + truth through one
   forward (the fp32 teacher-forced logits);
3. then, one model at a time, each bf16 side: ernie as the CLI loads it (with the compiled
   CPU kernels of model/backends/cpu/kernels.py where they run, and again with them all disabled as
   ``ERNIE_NO_KERNELS=1`` does), and
   the transformers 5.23 reference as bench.py loads it. Each one
   - teacher-forced, one forward: prompt + truth (the prefill route, many rows per matmul);
   - teacher-forced decode: its own decode loop with its KV cache, each step fed the truth token
     (the decode route, one row per matmul), its raw logits recorded;
   - free greedy decode: how many tokens agree with the truth before the first difference;
4. per position and in summary: relative error max|bf16 - fp32| / max|fp32|, mean |bf16 - fp32|,
   whether the argmax is fp32's, the fp32 top-1 minus top-2 margin (near-ties), and, where the
   argmax differs, the fp32 "regret" (fp32 logit of fp32's choice minus fp32 logit of bf16's
   choice). A floor row rounds the fp32 logits themselves to bf16 (the output rounding alone).

Same input, same weights: the only difference between the rows is arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from unittest import mock

# benchmarks/ is on sys.path when this file is run; bench puts the repository root there too
import _ours
import _reference
import bench
import torch

VARIANTS = ("ernie-bf16", "ernie-bf16-nokernels", "reference-bf16")


def log(msg: str) -> None:
    print(f"[numerics {time.strftime('%H:%M:%S')}] {msg} (max RSS {_rss_gb():.1f} GB)", file=sys.stderr, flush=True)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --- ernie ------------------------------------------------------------------------------------

def ernie_forward(net, ids: torch.Tensor) -> torch.Tensor:
    """(T, V) fp32 logits of one forward over ids (1, T)."""
    with torch.no_grad():
        return net(input_ids=ids).logits[0].float()


def ernie_decode(net, prompt: torch.Tensor, n: int, forced: torch.Tensor | None = None):
    """ernie's own decode loop (``stream_generate``), greedy or fed ``forced`` tokens.

    Returns (the n chosen ids, the (n, V) fp32 logits each step saw). The loop is untouched; only
    its token choice (``model.generation.generate.sample_next``) is wrapped to record the logits."""
    import model.generation.generate as gen

    real, seen_logits = gen.sample_next, []

    def choose(logits, params, generator=None, seen=None):
        seen_logits.append(logits[0].float().clone())
        if forced is None:
            return real(logits, params, generator, seen)
        return forced[len(seen_logits) - 1].view(1).to(logits.device)

    config = gen.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=())
    ids = []
    with mock.patch.object(gen, "sample_next", choose):
        for event in gen.stream_generate(net, prompt, config=config):
            if isinstance(event, gen.Step):
                ids.append(int(event.token_ids[0]))
    return torch.tensor(ids), torch.stack(seen_logits)


def set_kernels(enabled: bool) -> None:
    """What ``ERNIE_NO_KERNELS=1`` does at start-up, switched within this process."""
    from model.backends.cpu import kernels

    if enabled:
        os.environ.pop("ERNIE_NO_KERNELS", None)
    else:
        os.environ["ERNIE_NO_KERNELS"] = "1"
    for library in (kernels._library, kernels._ops_library, kernels._amx_library, kernels._flash_library):
        library.cache_clear()  # every compiled library decides again, under the new setting
    kernels.gemv_available()


# --- the reference ----------------------------------------------------------------------------

def reference_forward(net, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()


def reference_decode(net, prompt: torch.Tensor, n: int, forced: torch.Tensor | None = None):
    """The reference's own ``generate`` (greedy), optionally made to pick ``forced`` tokens by a
    logits processor; its raw logits come from ``output_logits``."""
    from transformers import LogitsProcessor, LogitsProcessorList

    P = prompt.shape[1]

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            out[:, int(forced[input_ids.shape[1] - P])] = 0.0
            return out

    processors = LogitsProcessorList([Force()] if forced is not None else [])
    with torch.inference_mode():
        out = net.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                           logits_processor=processors, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, P:].clone(), torch.stack([s[0].float() for s in out.logits])


# --- comparison -------------------------------------------------------------------------------

def compare(test: torch.Tensor, truth: torch.Tensor) -> dict[str, list]:
    """Per row of (N, V) logits against fp32 truth logits."""
    err = (test - truth).abs()
    pick, best = test.argmax(-1), truth.argmax(-1)
    regret = truth.gather(-1, best[:, None]) - truth.gather(-1, pick[:, None])
    return {"rel_max": (err.max(-1).values / truth.abs().max(-1).values).tolist(),
            "mean_abs": err.mean(-1).tolist(),
            "match": (pick == best).tolist(),
            "regret": regret[:, 0].tolist()}


def margins(truth: torch.Tensor) -> list[float]:
    top = truth.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def agreement(ids: torch.Tensor, truth: torch.Tensor) -> int:
    """Tokens equal to the truth before the first difference."""
    diff = (ids != truth).nonzero()
    return int(diff[0, 0]) if len(diff) else len(truth)


def summarise(c: dict) -> dict:
    rel, mae = torch.tensor(c["rel_max"]), torch.tensor(c["mean_abs"])
    regrets = [r for r, ok in zip(c["regret"], c["match"]) if not ok]
    return {"rel_max_median": float(rel.median()), "rel_max_max": float(rel.max()),
            "mean_abs_median": float(mae.median()), "argmax_agree": sum(c["match"]), "positions": len(c["match"]),
            "max_regret": max(regrets) if regrets else 0.0}


# --- driver -----------------------------------------------------------------------------------

def run(args) -> dict:
    torch.manual_seed(0)
    config = bench.bench_config(args.layers, args.vision_blocks)
    ours_dir, ref_dir = bench.ensure_checkpoints(config, random_init=False)
    log(f"checkpoint {ours_dir}")
    prompt = bench.prompt_ids(args.prompt_tokens, seed=args.seed)
    P, N = prompt.shape[1], args.new_tokens
    report: dict = {"layers": args.layers, "vision_blocks": args.vision_blocks, "prompt_tokens": P,
                    "new_tokens": N, "threads": torch.get_num_threads(), "seconds": {}, "variants": {}}

    from model import load_pretrained

    start = time.perf_counter()
    net = load_pretrained(str(ours_dir), dtype="float32", device="cpu")
    log(f"fp32 loaded in {time.perf_counter() - start:.0f} s")
    truth, truth_step = ernie_decode(net, prompt, N)  # greedy fp32: the truth sequence
    full = torch.cat([prompt, truth[None]], 1)
    truth_tf = ernie_forward(net, full)[P - 1:P - 1 + N]  # the logits that predict each truth token
    report["seconds"]["fp32"] = time.perf_counter() - start
    del net
    gc.collect()
    report["truth_ids"] = truth.tolist()
    report["margins"] = margins(truth_step)
    report["fp32_forward_vs_fp32_decode"] = summarise(compare(truth_tf, truth_step))
    floor = compare(truth_step.bfloat16().float(), truth_step)
    report["variants"]["fp32-rounded-to-bf16"] = {"forward": floor, "decode": floor}
    log("fp32 truth done")

    for name in VARIANTS:
        if name.startswith("reference") and args.skip_reference:
            continue
        start = time.perf_counter()
        if name.startswith("ernie"):
            set_kernels(name == "ernie-bf16")
            side = _ours.Side(ours_dir, "cpu")
            forward, decode = ernie_forward, ernie_decode
        else:
            side = _reference.Side(ref_dir, "cpu")
            forward, decode = reference_forward, reference_decode
        side.load()
        log(f"{name} loaded in {time.perf_counter() - start:.0f} s")
        tf = forward(side.model, full)[P - 1:P - 1 + N]
        _, forced_logits = decode(side.model, prompt, N, forced=truth)
        ids, _ = decode(side.model, prompt, N)
        report["variants"][name] = {"forward": compare(tf, truth_tf), "decode": compare(forced_logits, truth_step),
                                    "free_decode_agree": agreement(ids, truth), "free_decode_ids": ids.tolist()}
        report["seconds"][name] = time.perf_counter() - start
        del side
        gc.collect()
        log(f"{name} done in {report['seconds'][name]:.0f} s")
    set_kernels(True)
    report["max_rss_gb"] = _rss_gb()
    return report


def render(report: dict) -> str:
    N, variants = report["new_tokens"], report["variants"]
    names = [v for v in variants if v != "fp32-rounded-to-bf16"]
    m = torch.tensor(report["margins"])
    tf_check = report["fp32_forward_vs_fp32_decode"]
    lines = [(f"# bf16 logits vs fp32 truth: {report['layers']} text layers (1 dense), "
              f"prompt {report['prompt_tokens']} random tokens, {N} greedy tokens, {report['threads']} thread(s)"), "",
             (f"fp32 top-1 minus top-2 margin over the {N} truth steps: median {float(m.median()):.3f}, "
              f"min {float(m.min()):.4f}, {int((m < 0.05).sum())} below 0.05, {int((m < 0.01).sum())} below 0.01."),
             (f"fp32 single forward vs fp32 decode: rel err {tf_check['rel_max_max']:.1e}, "
              f"argmax agree {tf_check['argmax_agree']}/{N}."), "",
             ("| variant | route | rel max err (median / max) | mean abs err (median) | argmax = fp32 | "
              "max fp32 regret where not | free greedy decode = truth for |"),
             "|---|---|---|---|---|---|---|"]
    for name in ["fp32-rounded-to-bf16", *names]:
        for route in ("forward", "decode"):
            if route == "decode" and name == "fp32-rounded-to-bf16":
                continue
            s = summarise(variants[name][route])
            free_run = variants[name].get("free_decode_agree")
            route_label = ("output rounding only" if name == "fp32-rounded-to-bf16" else
                           "teacher-forced forward" if route == "forward" else "teacher-forced decode (KV cache)")
            lines.append(f"| {name} | {route_label} | {s['rel_max_median']:.2e} / {s['rel_max_max']:.2e} | "
                         f"{s['mean_abs_median']:.2e} | {s['argmax_agree']}/{s['positions']} | {s['max_regret']:.4f} | "
                         f"{f'{free_run}/{N}' if route == 'decode' and free_run is not None else ''} |")
    if "ernie-bf16" in variants and "reference-bf16" in variants:
        same = agreement(torch.tensor(variants["ernie-bf16"]["free_decode_ids"]),
                         torch.tensor(variants["reference-bf16"]["free_decode_ids"]))
        lines += ["", f"ernie-bf16 and reference-bf16 free greedy decodes agree with each other for {same}/{N}."]
    for route in ("forward", "decode"):
        title = "teacher-forced single forward" if route == "forward" else "teacher-forced decode"
        lines += ["", f"Per position, {title} (rel max err, x where the argmax differs from fp32's):", "",
                  "| pos | fp32 margin | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for i in range(N):
            cells = [f"{variants[n][route]['rel_max'][i]:.2e}{'' if variants[n][route]['match'][i] else ' x'}"
                     for n in names]
            lines.append(f"| {i} | {report['margins'][i]:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())
              + f"; max RSS {report['max_rss_gb']:.1f} GB.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="bf16 logits of ernie and the reference against an fp32 ground truth")
    p.add_argument("--layers", type=int, default=2, help="text layers (1 dense + the rest MoE)")
    p.add_argument("--vision-blocks", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64, help="BOS + random ordinary ids")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=4, help="seed of the random prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", type=Path, help="also write the full report (per position) here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.new_tokens < 1 or args.prompt_tokens < 2:
        p.error("--layers and --new-tokens must be >= 1, --prompt-tokens >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = time.perf_counter()
    report = run(args)
    report["seconds"]["total"] = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
