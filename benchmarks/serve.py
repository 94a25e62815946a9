"""`ernie serve` on ernie-tiny: 16 concurrent greedy requests against the same 16 one after another,
and the HTTP layer's share of a request.

    python benchmarks/serve.py [--rounds 3] [--workload all] [--max-tokens N] [--out benchmarks/serve-results.json]

It starts the real server (`ernie serve --model ernie-tiny --port 0`) as a subprocess and talks to
it over HTTP from this process, as a client would. Each round times the 16 one after another and
the 16 at once (all started together from 16 threads), alternating which goes first, and checks
that the two give identical answers. Targets (issue 22): concurrent at least 3x faster than
sequential. Workloads:

* chat: 16 text conversations (some with an earlier exchange);
* describe: the examples/ picture and two clips, sent again and again with four prompts, by a
  server with its defaults: after the first requests their preprocessing comes from the media
  cache, on both sides alike (as when a chat client resends a conversation's pictures);
* fresh: 16 different pictures and clips of the examples' sizes (made here with
  scripts/shapes.py), by a second server with the media cache off (ERNIE_MEDIA_CACHE_MB=0): every
  request decodes, stamps and patches its media, and batching shares only the model's work.

The HTTP layer's share: for every sequential request, the client's wall time minus the time the
server reports in its `Server-Timing` header for building the prompt (`prepare`: decoding the
data: URLs, media checks, chat template, tokenizing) and for the answer (`engine`: queue and
decoding). What is left is connection, body transfer and JSON parsing, validation, the hop
between the event loop and the decode thread, and serialising the answer. Target: at most 5 ms
at the median.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from _machine import cpu_name  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROMPTS = {"image": ["Describe this image.", "What shapes are there?"],
           "video": ["Describe this video.", "Which way does it move?"]}


QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Which shape is blue?",
             "Is the triangle green?", "Where does the square go?", "Name a red shape.", "What moves left to right?",
             "Describe a blue square moving down."]


def chat_bodies(max_tokens: int | None) -> list[dict]:
    """16 text conversations: a question, some after an earlier exchange."""
    out = []
    for i in range(16):
        messages = [{"role": "user", "content": QUESTIONS[i % 8]}]
        if i >= 8:
            messages = [{"role": "user", "content": QUESTIONS[(i + 3) % 8]},
                        {"role": "assistant", "content": "A red circle."}] + messages
        body = {"model": "ernie-tiny", "messages": messages, "temperature": 0}
        if max_tokens:
            body["max_tokens"] = max_tokens
        out.append(body)
    return out


def describe_bodies(max_tokens: int | None, fresh_dir: Path | None = None) -> list[dict]:
    """16 requests with a picture or a clip: the examples' three in turn, or with ``fresh_dir``,
    16 different ones made there (fresh_media)."""
    media = [("image", "image/png", EXAMPLES / "shapes.png"),
             ("video", "video/mp4", EXAMPLES / "red-circle-left-to-right.mp4"),
             ("video", "video/mp4", EXAMPLES / "blue-square-top-to-bottom.mp4")]
    if fresh_dir is not None:
        media = fresh_media(fresh_dir)
    out = []
    for i in range(16):
        kind, mime, path = media[i % len(media)]
        url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        content = [{"type": "text", "text": PROMPTS[kind][i % 2]}, {"type": f"{kind}_url", f"{kind}_url": {"url": url}}]
        body = {"model": "ernie-tiny", "messages": [{"role": "user", "content": content}], "temperature": 0}
        if max_tokens:
            body["max_tokens"] = max_tokens
        out.append(body)
    return out


def fresh_media(out_dir: Path) -> list[tuple[str, str, Path]]:
    """16 different pictures (224x160, three shapes) and clips (160x128, 3 s at 10 fps): the
    examples' formats and sizes, other shapes, colours and directions. In the examples' order:
    a picture, then two clips."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import shapes

    out_dir.mkdir(parents=True, exist_ok=True)
    colours, media = list(shapes.COLOURS), []
    for i in range(16):
        if i % 3 == 0:
            trio = [colours[(i + k) % len(colours)] for k in range(3)]  # the example scene, recoloured
            scene = replace(shapes.EXAMPLE_SCENE, shapes=tuple(
                replace(shape, colour=colour, rgb=shapes.COLOURS[colour])
                for shape, colour in zip(shapes.EXAMPLE_SCENE.shapes, trio)))
            media.append(("image", "image/png", shapes.save_image(scene, out_dir / f"scene{i}.png")))
        else:
            clip = shapes.example_clip(shapes.KINDS[i % 3], colours[i % len(colours)],
                                       shapes.DIRECTIONS[i % len(shapes.DIRECTIONS)])
            media.append(("video", "video/mp4", shapes.save_video(clip, out_dir / f"clip{i}.mp4")))
    return media


class Server:
    def __init__(self, extra: list[str], env: dict[str, str] | None = None):
        ernie = Path(sys.executable).with_name("ernie")
        self.proc = subprocess.Popen([str(ernie), "serve", "--model", "ernie-tiny", "--port", "0", *extra],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.port = None
        for raw in self.proc.stderr:
            line = raw.decode()
            if line.startswith("ernie serve: ") and " at http://" in line:
                self.port = int(line.split(" at http://", 1)[1].split("/")[0].rsplit(":", 1)[1])
                break
        if self.port is None:
            raise SystemExit("ernie serve did not start (is the serve extra installed? pip install -e '.[serve]')")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def post(self, body: dict) -> tuple[str, float, dict[str, float]]:
        """(answer, client seconds, server timings in seconds)."""
        data = json.dumps(body)
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        elapsed = time.perf_counter() - start
        conn.close()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {raw[:300]!r}")
        timings = {}
        for item in (response.getheader("Server-Timing") or "").split(","):
            name, _, dur = item.strip().partition(";dur=")
            if dur:
                timings[name] = float(dur) / 1000
        return json.loads(raw)["choices"][0]["message"]["content"], elapsed, timings

    def cpu_s(self) -> float:
        """The server process's CPU time so far (user + system, all threads): load on the machine from
        other processes barely moves it, unlike wall time."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def sequential(server: Server, work: list[dict]):
    start = time.perf_counter()
    results = [server.post(b) for b in work]
    return time.perf_counter() - start, results


def concurrent(server: Server, work: list[dict]):
    barrier = threading.Barrier(len(work))

    def one(body):
        barrier.wait()
        return server.post(body)

    with ThreadPoolExecutor(len(work)) as pool:
        start = time.perf_counter()
        results = list(pool.map(one, work))
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length (default: the checkpoint's)")
    parser.add_argument("--workload", choices=("describe", "chat", "fresh", "all"), default="all",
                        help="describe: the examples' picture and clips again and again (prefill-heavy); chat: text "
                             "conversations; fresh: 16 different pictures and clips, media cache off (see above)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    workloads = ["describe", "chat", "fresh"] if args.workload == "all" else [args.workload]
    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_before": os.getloadavg(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                          "ernie_media_cache_mb": os.environ.get("ERNIE_MEDIA_CACHE_MB")},
              "requests": 16, "rounds": args.rounds, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as scratch:
        server = Server([]) if {"describe", "chat"} & set(workloads) else None
        try:
            for name in ("describe", "chat"):
                if name in workloads:
                    work = (describe_bodies if name == "describe" else chat_bodies)(args.max_tokens)
                    report[name] = measure(server, work, args.rounds, name)
        finally:
            if server is not None:
                server.stop()
        if "fresh" in workloads:
            work = describe_bodies(args.max_tokens, fresh_dir=Path(scratch))
            server = Server([], env={"ERNIE_MEDIA_CACHE_MB": "0"})
            try:
                report["fresh"] = measure(server, work, args.rounds, "fresh")
            finally:
                server.stop()
    report["machine"]["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def measure(server: Server, work: list[dict], rounds: int, name: str) -> dict:
    """Alternating rounds of the 16 one after another and all at once; answers must not differ."""
    for body in work[:3]:
        server.post(body)  # warm-up: first-use costs (kernels, caches) out of the figures
    concurrent(server, work)
    seq_times, conc_times, overheads, answers = [], [], [], None
    cpu = {"sequential": [], "concurrent": []}
    for r in range(rounds):
        order = (sequential, concurrent) if r % 2 == 0 else (concurrent, sequential)
        for run in order:
            cpu0 = server.cpu_s()
            wall, results = run(server, work)
            cpu[run.__name__].append(server.cpu_s() - cpu0)
            texts = [t for t, _, _ in results]
            if answers is None:
                answers = texts
            if texts != answers:
                raise SystemExit(f"{name} round {r}: {run.__name__} answers differ from the first run's")
            if run is sequential:
                seq_times.append(wall)
                overheads += [e - timing.get("prepare", 0) - timing.get("engine", 0) for _, e, timing in results]
            else:
                conc_times.append(wall)
            print(f"{name} round {r}: {run.__name__:10s} {wall:7.3f} s", file=sys.stderr)
    seq, conc = statistics.median(seq_times), statistics.median(conc_times)
    pairs = [a / b for a, b in zip(seq_times, conc_times)]
    overhead_ms = statistics.median(overheads) * 1000
    cpu_seq, cpu_conc = statistics.median(cpu["sequential"]), statistics.median(cpu["concurrent"])
    print(f"{name}: server CPU time 16 sequential {cpu_seq:.2f} s, 16 concurrent {cpu_conc:.2f} s "
          f"({cpu_seq / max(cpu_conc, 1e-9):.2f}x less work)")
    print(f"{name}: 16 sequential {seq:.3f} s, 16 concurrent {conc:.3f} s (medians): {seq / conc:.2f}x "
          f"({'PASS' if seq / conc >= 3 else 'FAIL'} >= 3x; per-round ratios {', '.join(f'{p:.2f}' for p in pairs)}); "
          f"HTTP layer {overhead_ms:.2f} ms median per request ({'PASS' if overhead_ms <= 5 else 'FAIL'} <= 5 ms)")
    return {"sequential_s": seq_times, "concurrent_s": conc_times, "speedup": round(seq / conc, 2),
            "server_cpu_s": cpu, "cpu_ratio": round(cpu_seq / max(cpu_conc, 1e-9), 2),
            "speedup_per_round": [round(p, 2) for p in pairs], "speedup_target": 3.0,
            "http_overhead_ms_median": round(overhead_ms, 2), "http_overhead_target_ms": 5.0,
            "answers_identical": True, "answers": answers[:4]}


if __name__ == "__main__":
    main()
