"""The ernie side of the benchmark: our loader, our processor, our decode loop (``stream_generate``).

Every side module exposes the same small surface, driven by ``bench.run_worker``:
``Side(checkpoint_dir, device)`` with ``load()``, ``build_random(config_dir)``, ``weight_bytes()``,
``image_first_token(image, prompt) -> (seconds, prompt_tokens)`` and
``generate_timed(input_ids, new_tokens) -> (seconds from start to each new token, the new ids)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

NAME = "ernie"


class Side:
    quantize = None  # "int8" / "int4": weight-only quantized (bench.py --quantize)

    def __init__(self, checkpoint: Path, device: str):
        self.checkpoint, self.device = Path(checkpoint), torch.device(device)
        self.model = self.processor = None

    def load(self) -> None:
        """Weights through ``load_pretrained`` with its defaults (bf16 as stored), then the processor."""
        from model import load_pretrained
        from processing.processor import ErnieVLProcessor

        self.model = load_pretrained(str(self.checkpoint), dtype="bfloat16", device=str(self.device),
                                     quantize=self.quantize)
        self.processor = ErnieVLProcessor.from_pretrained(self.checkpoint)

    def build_random(self) -> None:
        """Random bf16 weights built straight on the device (no checkpoint on disk, no fp32 detour)."""
        from model.config import ErnieVLConfig
        from model.ernie_vl import ErnieVL
        from processing.processor import ErnieVLProcessor

        config = ErnieVLConfig.from_file(self.checkpoint / "config.json")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(self.device):
                self.model = ErnieVL(config).eval()  # init_weights runs on the device, N(0, 0.02)
        finally:
            torch.set_default_dtype(previous)
        if self.quantize:  # quantized in place on the device (the bf16 weights are dropped module by module)
            from model.quantize import QuantSpec, quantize_model

            quantize_model(self.model, QuantSpec.parse(self.quantize))
        elif self.device.type == "cpu":  # what load_pretrained does on CPU: packed only where it pays
            from model.backends.cpu.packing import pack_for_cpu, packing_pays
            if packing_pays():
                pack_for_cpu(self.model)
        self.processor = ErnieVLProcessor.from_pretrained(self.checkpoint)

    def weight_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def image_first_token(self, image, prompt: str) -> tuple[float, int]:
        """Seconds from the PIL image to the first generated token, and the prompt length."""
        from model.generation.generate import GenerationConfig, Step, stream_generate

        start = time.perf_counter()
        inputs = self.processor(text=prompt, images=[image]).to(self.device, torch.bfloat16)
        stream = stream_generate(self.model, **inputs, config=GenerationConfig(max_new_tokens=1))
        for event in stream:
            if isinstance(event, Step):
                _sync(self.device)
                return time.perf_counter() - start, int(inputs["input_ids"].shape[1])
        raise RuntimeError("stream_generate produced no token")

    def generate_timed(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[float], list[int]]:
        """Greedy, eos ignored (no eos ids configured): exactly ``new_tokens`` timestamps and ids."""
        from model.generation.generate import GenerationConfig, Step, stream_generate

        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=())
        times, ids = [], []
        start = time.perf_counter()
        for event in stream_generate(self.model, input_ids.to(self.device), config=config):
            if isinstance(event, Step):  # its ids are on the host: the step that made them has finished
                times.append(time.perf_counter() - start)
                ids.append(int(event.token_ids[0]))
        return times, ids

    def profile_target(self):
        """The module whose children a per-module timing breakdown walks."""
        return self.model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
