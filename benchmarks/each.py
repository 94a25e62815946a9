"""`ernie describe --each` throughput: batched (continuous batching) vs --batch-size 1, in one run.

    .venv/bin/python benchmarks/each.py                      # 64 scenes, 3 rounds, ernie-tiny
    .venv/bin/python benchmarks/each.py --scenes 16 --rounds 1 --output-dir /tmp/each

Writes ``--scenes`` generated pictures (scripts/shapes.py, seed 0) into a temporary folder, then
runs the real command ``ernie describe --each FILES --model ernie-tiny --jsonl -v`` once per
configuration per round, alternating which goes first, so that both see the same machine load.
Each run is pinned to ``--cores`` CPU cores (sched_setaffinity; ernie-tiny itself runs one intra-op thread
and uses the second core for preprocessing and a prefill's second part of pictures). Figures per run:
files/s over the generation (what -v reports: answers / time from the first input to the last
answer, model load excluded) and over the whole command (wall time, start-up and load
included). The answers of every run must be identical to those of the first ``--batch-size 1``
run (greedy). Writes ``each_results.json`` and ``EACH.md`` into ``--output-dir`` (default:
benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from shapes import random_scene, render  # noqa: E402

from _machine import cpu_name, load_average  # noqa: E402  (benchmarks/ is this script's folder)

ERNIE = Path(sys.executable).with_name("ernie")
RATE = re.compile(r"(\d+) answers in ([\d.]+) s \(([\d.]+) files/s, ([\d.]+) tokens/s\) · batch size (\d+)")


def make_scenes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = folder / f"scene{i:03d}.png"
        render(random_scene(rng)).save(path)
        paths.append(path)
    return paths


def run_each(command: list[str], files: list[Path], batch_size: int | None, cores: set[int], cwd: Path) -> dict:
    cmd = [*command, "describe", "--each", *[p.name for p in files], "--model", "ernie-tiny", "--jsonl", "-v"]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=3600,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({proc.returncode}):\n{proc.stderr}")
    found = RATE.search(proc.stderr)
    if not found:
        raise SystemExit(f"no rate line in stderr:\n{proc.stderr}")
    answers = {obj["path"]: obj["text"] for obj in map(json.loads, proc.stdout.splitlines())}
    return {"batch_size": int(found.group(5)), "files": int(found.group(1)), "generation_s": float(found.group(2)),
            "files_per_s": float(found.group(3)), "tokens_per_s": float(found.group(4)), "wall_s": round(wall, 3),
            "wall_files_per_s": round(len(files) / wall, 3), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", default="0,1", help="CPUs the command may run on (default: 0,1)")
    parser.add_argument("--command", default=str(ERNIE), help="how to run ernie (default: the venv's ernie; "
                                                                "e.g. 'python3 -m ernie_cli.app')")
    parser.add_argument("--batch-size", type=int, default=None, help="the batched run's size (default: ernie's)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()

    cores = {int(c) for c in args.cores.split(",")}
    configs = [("batch-size 1", 1), ("batched", args.batch_size)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="ernie-each-bench-") as tmp:
        files = make_scenes(Path(tmp), args.scenes)
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]  # alternate which goes first
            for name, size in order:
                result = run_each(args.command.split(), files, size, cores, Path(tmp))
                runs[name].append(result)
                print(f"round {r + 1} {name:>13}: {result['files_per_s']:.2f} files/s "
                      f"(wall {result['wall_s']:.1f} s, batch {result['batch_size']})", flush=True)
            loads.append(load_average())
    reference = runs["batch-size 1"][0]["answers"]
    identical = all(run["answers"] == reference for rs in runs.values() for run in rs)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"files_per_s_median": statistics.median(r["files_per_s"] for r in rs),
                         "wall_files_per_s_median": statistics.median(r["wall_files_per_s"] for r in rs),
                         "batch_size": rs[0]["batch_size"]}
    ratio = summary["batched"]["files_per_s_median"] / summary["batch-size 1"]["files_per_s_median"]
    wall_ratio = summary["batched"]["wall_files_per_s_median"] / summary["batch-size 1"]["wall_files_per_s_median"]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
        "cores": args.cores, "machine_cores": os.cpu_count(), "scenes": args.scenes, "rounds": args.rounds,
        "load_average_1_5_15_before_and_after_each_round": loads, "identical_answers": identical,
        "speedup_files_per_s": round(ratio, 2), "speedup_wall": round(wall_ratio, 2), "target": 3.0,
        "pass": identical and ratio >= 3.0, "summary": summary,
        "runs": {name: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for name, rs in runs.items()},
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "each_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / "EACH.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    s1, sb = r["summary"]["batch-size 1"], r["summary"]["batched"]
    lines = [
        "# `ernie describe --each`: batched vs --batch-size 1",
        "",
        f"{r['date']} · {r['cpu']} · pinned to cores {r['cores']} of {r['machine_cores']} · ernie-tiny, "
        f"{r['scenes']} generated scenes, {r['rounds']} rounds alternating the two configurations · load "
        f"average (1/5/15 min) before and after each round: {r['load_average_1_5_15_before_and_after_each_round']}",
        "",
        "| configuration | batch size | files/s (generation, median) | files/s (whole command, median) |",
        "|---|---|---|---|",
        f"| --batch-size 1 | 1 | {s1['files_per_s_median']:.2f} | {s1['wall_files_per_s_median']:.2f} |",
        f"| default | {sb['batch_size']} | {sb['files_per_s_median']:.2f} | {sb['wall_files_per_s_median']:.2f} |",
        "",
        f"Speed-up: **{r['speedup_files_per_s']:.2f}x** files/s over the generation "
        f"({r['speedup_wall']:.2f}x over the whole command, start-up and model load included); "
        f"target 3x: {'PASS' if r['pass'] else 'FAIL'}. Identical answers in every run: {r['identical_answers']}.",
        "",
        "Per run (files/s over the generation):",
        "",
    ]
    for name, rs in r["runs"].items():
        lines.append(f"- {name}: " + ", ".join(f"{x['files_per_s']:.2f}" for x in rs))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
