"""A GPU check of continuous batching (the scheduler behind `ernie describe --each`), a few minutes.

    python scripts/each_cuda_check.py [--scenes 24] [--batch-size 8] [--out DIR]

1. ernie-tiny on cuda through the engine: every scene described alone (``engine.generate``, the
   path of ``ernie describe FILE``, its GPU decode loop) and all together through ``BatchRunner``
   (continuous batching); the greedy answers must be identical; files/s of both.
2. The tiny random test model (tests/test_generate.py) on cuda, fp32 and bf16: every request of
   a mixed batch (text, image, video prompts) through ``Scheduler`` against ``stream_generate``
   alone; reports how many are token-for-token equal (fp32 must all be).
Prints one JSON object (also written to DIR/each_cuda_check.json); exit 1 when a must fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from shapes import random_scene, render  # noqa: E402


def engine_check(n: int, batch: int, folder: Path, device: str) -> dict:
    from ernie_cli.batch import BatchRunner
    from ernie_cli.engine import TorchEngine
    from ernie_cli.media import check_file
    from ernie_cli.settings import GenerationSettings, LoadOptions, MediaOptions, user_message
    from processing.events import Finished

    rng = random.Random(0)
    media = []
    for i in range(n):
        render(random_scene(rng)).save(folder / f"s{i}.png")
        media.append(check_file(folder / f"s{i}.png", f"s{i}.png"))
    engine = TorchEngine()
    engine.load(LoadOptions("ernie-tiny", device=device), MediaOptions())
    conversations = [[user_message("Describe this image.", [m])] for m in media]
    settings = GenerationSettings()
    list(engine.generate(conversations[0], settings))  # warm-up (kernels, graphs)
    start = time.perf_counter()
    alone = [[e for e in engine.generate(c, settings) if isinstance(e, Finished)][0].text for c in conversations]
    alone_s = time.perf_counter() - start
    with BatchRunner(engine, batch) as runner:
        runner.submit(engine.prepare(conversations[0], settings)).result()  # warm-up
        start = time.perf_counter()
        requests = [runner.submit(engine.prepare(c, settings)) for c in conversations]
        batched = [r.result(timeout=600).text for r in requests]
        batched_s = time.perf_counter() - start
    same = [a == b for a, b in zip(alone, batched)]
    return {"scenes": n, "batch_size": batch, "identical": sum(same), "alone_files_per_s": round(n / alone_s, 2),
            "batched_files_per_s": round(n / batched_s, 2), "examples": list(zip(alone, batched))[:3],
            "different": [(a, b) for a, b in zip(alone, batched) if a != b][:5]}


def scheduler_check(dtype: torch.dtype, device: str) -> dict:
    from model.config import ErnieVLConfig
    from model.ernie_vl import ErnieVL
    from model.generation.generate import GenerationConfig, stream_generate
    from model.generation.scheduler import RequestDone, Scheduler
    from tests.test_generate import PROMPTS
    from tests.tiny_configs import CONFIG_A

    torch.manual_seed(0)
    model = ErnieVL(ErnieVLConfig.from_dict(CONFIG_A)).eval()
    model.init_weights(std=0.3)
    model = model.to(device, dtype)
    jobs = [(PROMPTS[name], GenerationConfig(max_new_tokens=n, eos_token_id=(2,), pad_token_id=0))
            for name, n in zip(list(PROMPTS) * 2, [9, 3, 6, 2, 7, 4, 8, 5, 3, 6])]
    scheduler = Scheduler(model, max_batch=3)
    handles = [scheduler.submit(inputs, config) for inputs, config in jobs]
    done = {}
    while scheduler.has_work:
        for event in scheduler.step():
            if isinstance(event, RequestDone):
                done[event.request.id] = event
    equal = 0
    for handle, (inputs, config) in zip(handles, jobs):
        ids = inputs["input_ids"]
        *_, single = stream_generate(model, ids, config=config, **{k: v for k, v in inputs.items() if k != "input_ids"})
        equal += single.sequences[0, ids.shape[1]:].tolist() == done[handle.id].token_ids
    return {"dtype": str(dtype), "requests": len(jobs), "token_for_token_equal": equal,
            "errors": [str(d.error) for d in done.values() if d.error is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        result["ernie_tiny"] = engine_check(args.scenes, args.batch_size, Path(tmp), args.device)
    result["scheduler"] = [scheduler_check(torch.float32, args.device),
                           scheduler_check(torch.bfloat16, args.device)]
    ok = (result["ernie_tiny"]["identical"] == args.scenes
          and result["scheduler"][0]["token_for_token_equal"] == result["scheduler"][0]["requests"]
          and not any(s["errors"] for s in result["scheduler"]))
    result["pass"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "each_cuda_check.json").write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
