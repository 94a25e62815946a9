"""Next-token choice: pure functions on logits (B, V), applied in the reference's order.

Order: repetition penalty (also when greedy), then, when sampling, temperature, top-k, top-p,
min-p, and a draw from the remaining distribution. Filters never modify their input and always
keep at least one token per row. Removed entries become -inf.

Legend: B = batch rows, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """What ``sample_next`` reads. ``GenerationConfig`` carries the same field names."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off


def seen_mask(ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) bool: which ids already occur in each row of ``ids`` (B, T), padding excluded."""
    keep = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, keep) > 0  # (B, V)


def mark_seen(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set ``mask[b, ids[b]] = True`` in place for new ids (B,) and return the mask."""
    return mask.scatter_(1, ids[:, None], True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of seen ids by ``penalty`` (as the reference)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest top set whose probability reaches ``p`` (at least one token)."""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)  # (B, V), least likely first
    cum = ascending.softmax(-1).cumsum(-1)
    drop = cum <= (1.0 - p)  # the tail whose total mass is at most 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's largest probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    floor = min_p * probs.max(-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < floor, NEG_INF)  # the max itself is never below the floor


def is_greedy(params) -> bool:
    return not params.do_sample or params.temperature == 0


def process_logits(logits: torch.Tensor, params, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All filters in order; greedy settings skip the sampling-only ones."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if is_greedy(params):
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k or 0)
    logits = apply_top_p(logits, 1.0 if params.top_p is None else params.top_p)
    return apply_min_p(logits, params.min_p or 0.0)


def sample_next(logits: torch.Tensor, params, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one id per row of ``logits`` (B, V) -> (B,) LongTensor.

    Greedy (argmax, first index on ties) when ``do_sample`` is False or temperature is 0;
    otherwise a draw with ``generator`` (seed it for reproducible output).
    """
    logits = process_logits(logits, params, seen)
    if is_greedy(params):
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` (None: use torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


# --- on the device ------------------------------------------------------------------------------

def race_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``probs`` (B, V), drawn with probability p_i / sum(p) on the probs' device
    with no host synchronisation: argmax of p / q with q ~ Exp(1) i.i.d. (the exponential race).
    ``torch.multinomial`` draws the same distribution but checks its input on the host."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


class DeviceSampler:
    """``sample_next`` for the GPU decode loop (model/generation/device_loop.py), with nothing read
    back to the host: per generation the settings, a generator on the device seeded once (a seed
    gives the same tokens on every run on that device; not the CPU's, which draws differently),
    and the seen-token mask of the repetition penalty."""

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
        return race_draw(logits.softmax(-1), self.generator)  # filtered entries have p = 0

    def observe(self, ids: torch.Tensor) -> None:
        """Count ids (B,) as seen (for the repetition penalty of the next steps)."""
        if self.seen is not None:
            mark_seen(self.seen, ids)
