"""The reference side: transformers 5.23 ``Ernie4_5_VLMoeForConditionalGeneration`` and its processor.

Same surface as ``_ours.Side`` (see that module). Generation goes through the reference's own
``generate`` (greedy, ``min_new_tokens == max_new_tokens`` so eos cannot end it early); a
streamer records when each new token arrives.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

NAME = "reference"


class _TimingStreamer:
    """``generate`` hands the prompt to ``put`` first, then each new token: stamp the new ones."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.times, self.ids = device, time.perf_counter(), [], []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)
        self.ids.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


class Side:
    def __init__(self, checkpoint: Path, device: str):
        self.checkpoint, self.device = Path(checkpoint), torch.device(device)
        self.model = self.processor = None

    def load(self) -> None:
        from transformers import AutoProcessor, Ernie4_5_VLMoeForConditionalGeneration

        model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(self.checkpoint, dtype=torch.bfloat16)
        self.model = model.to(self.device).eval()  # device_map would need accelerate
        self.processor = AutoProcessor.from_pretrained(self.checkpoint)

    def build_random(self) -> None:
        """Random bf16 weights built straight on the device with the reference's own initialisation."""
        from transformers import AutoConfig, AutoProcessor, Ernie4_5_VLMoeForConditionalGeneration

        config = AutoConfig.from_pretrained(self.checkpoint)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(self.device):
                self.model = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
        self.processor = AutoProcessor.from_pretrained(self.checkpoint)

    def weight_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def image_first_token(self, image, prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt").to(self.device)
        streamer = _TimingStreamer(self.device)
        streamer.start = start
        self._generate(inputs, 1, streamer)
        return streamer.times[0], int(inputs["input_ids"].shape[1])

    def generate_timed(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[float], list[int]]:
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": torch.ones_like(input_ids, device=self.device)}
        streamer = _TimingStreamer(self.device)
        self._generate(inputs, new_tokens, streamer)
        return streamer.times, streamer.ids

    def _generate(self, inputs, new_tokens: int, streamer: _TimingStreamer) -> None:
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None, streamer=streamer)

    def profile_target(self):
        return self.model
