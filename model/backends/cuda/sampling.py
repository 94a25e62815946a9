"""Next-token choice on the device, with no host synchronisation.

Legend: B = batch rows, V = vocabulary.

The filters are those of model/sampling.py (repetition penalty, temperature, top-k, top-p,
min-p, in the reference's order: pure tensor functions, already free of host reads). What differs
is the draw: ``torch.multinomial`` checks its input on the host (one synchronisation per call),
so the draw here is the exponential race instead: argmax of p / q with q ~ Exp(1) i.i.d. picks
index i with probability p_i / sum(p), the same distribution, as two kernels on the device. The
generator lives on the device and is seeded once per generation, so a seed gives the same tokens
on every run on that device (not the CPU's tokens: the two draw differently).
"""

from __future__ import annotations

import torch

from model.sampling import is_greedy, mark_seen, process_logits, seen_mask


class DeviceSampler:
    """Per generation: the settings, the seeded device generator and the seen-token mask."""

    def __init__(self, config, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int):
        self.config = config
        self.greedy = is_greedy(config)
        self.generator = None
        if not self.greedy and config.seed is not None:
            self.generator = torch.Generator(device=prompt_ids.device).manual_seed(int(config.seed))
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = seen_mask(prompt_ids, vocab_size, attention_mask)  # (B, V) bool

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> ids (B,) long, on the logits' device."""
        logits = process_logits(logits, self.config, self.seen)
        if self.greedy:
            return logits.argmax(-1)
        probs = logits.softmax(-1)  # (B, V); filtered entries are exactly 0
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / race).argmax(-1)

    def observe(self, ids: torch.Tensor) -> None:
        """Count ids (B,) as seen (for the repetition penalty of the next steps)."""
        if self.seen is not None:
            mark_seen(self.seen, ids)
