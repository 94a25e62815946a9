"""The decode loop: prefill once, then one token per step from a preallocated KV cache.

``stream_generate`` yields ``Step`` per new token and ends with ``Done``. Vision runs only in the
prefill. Positions follow the reference: the prompt's 3D RoPE positions come from
``model.get_rope_index`` (text-only prompts: the count of real tokens before each one, so left
padding does not shift them), and every new token sits one past the previous position on all
three axes. The cache slot of a new token is the token count instead (see ``model.generation.kv_cache``).

Legend: B = batch rows, P = prompt length (padded), N = max_new_tokens, V = vocabulary.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace as dc_replace
from pathlib import Path
from typing import Any, Iterator

import torch

from model.errors import CheckpointError, ContextLengthError, ErnieError
from model.generation.kv_cache import StaticKVCache
from model.generation.sampling import is_greedy, make_generator, mark_seen, sample_next, seen_mask
from model.generation.stats import GenerationStats


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``from_file`` reads a checkpoint's generation_config.json."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None
    max_thinking_tokens: int | None = None  # None: no budget
    think_end_ids: tuple[int, ...] = ()  # "</think>" then the newlines the chat format adds

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            problems.append(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            problems.append(f"max_thinking_tokens must be >= 0, got {self.max_thinking_tokens}")
        if self.max_thinking_tokens is not None and not self.think_end_ids:
            problems.append("max_thinking_tokens needs think_end_ids (the token ids of '</think>' and its newlines)")
        if problems:
            raise ErnieError("invalid generation settings: " + "; ".join(problems),
                             hint="fix the listed settings")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GenerationConfig":
        """Known keys of a generation_config.json; others (max_length, transformers_version...) ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names and v is not None}
        if "eos_token_id" in kw:
            eos = kw["eos_token_id"]
            kw["eos_token_id"] = tuple(int(x) for x in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        if "think_end_ids" in kw:
            kw["think_end_ids"] = tuple(int(x) for x in kw["think_end_ids"])
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        """Read ``path`` (the json file or the checkpoint folder). A missing file gives defaults."""
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise TypeError(f"holds a JSON {type(raw).__name__}, expected an object")
            return cls.from_dict(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a usable generation config ({e})",
                                  hint="fix or delete the file to use the default settings") from None

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A copy with ``overrides`` applied; an override of None keeps this config's value."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown generation settings: {sorted(unknown)}")
        kw = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(kw.get("eos_token_id"), int):
            kw["eos_token_id"] = (kw["eos_token_id"],)
        for k in ("eos_token_id", "think_end_ids"):
            if k in kw:
                kw[k] = tuple(int(x) for x in kw[k])
        return dc_replace(self, **kw)


@dataclass(frozen=True)
class Step:
    """One new token per row (rows already finished carry the pad id). ``index`` counts from 0."""

    token_ids: torch.Tensor  # (B,) long
    index: int


@dataclass(frozen=True)
class Done:
    """The end of a generation: prompt + new ids (B, P + n), one reason per row, statistics."""

    sequences: torch.Tensor
    finish_reasons: list[str]
    stats: GenerationStats


@dataclass
class _Run:
    """Mutable bookkeeping of one generation, so that ``Done`` can be built on any exit."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    device: torch.device
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    new: list[torch.Tensor] = field(default_factory=list)  # one (B,) tensor per step
    reasons: list[str | None] = field(default_factory=list)
    counted: int = 0  # new tokens up to and including each row's eos
    done: Done | None = None

    def record(self, tok: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Keep one step's ids (B,); count live rows; rows that just hit eos stop. New finished mask."""
        self.t_first = self.t_first or time.perf_counter()
        self.new.append(tok)
        self.counted += int((~finished).sum())
        hit = ~finished & torch.isin(tok, eos)
        for b in hit.nonzero().flatten().tolist():
            self.reasons[b] = "stop"
        return finished | hit

    def finish(self, default_reason: str) -> Done:
        if self.done is None:
            reasons = [r or default_reason for r in self.reasons]
            new = torch.stack(self.new, 1) if self.new else self.input_ids[:, :0]
            self.done = Done(torch.cat([self.input_ids, new.to(self.input_ids.device)], 1), reasons, self._stats())
        return self.done

    def _stats(self) -> GenerationStats:
        now = time.perf_counter()
        B = self.input_ids.shape[0]
        prompt = int(self.attention_mask.sum())
        ttft = (self.t_first or now) - self.t_start
        decode_s = now - self.t_first if self.t_first is not None else 0.0
        decoded = max(self.counted - B, 0)  # tokens after each row's first one
        return GenerationStats(
            prompt_tokens=prompt, completion_tokens=self.counted, time_to_first_token_s=ttft,
            prefill_tokens_per_s=prompt / ttft if ttft > 0 else 0.0,
            decode_tokens_per_s=decoded / decode_s if decoded and decode_s > 0 else 0.0,
            peak_memory_bytes=_peak_memory(self.device), total_time_s=now - self.t_start)


class GenerationStream:
    """Iterate for ``Step``s then one ``Done``. ``close()`` (or the ``cancel`` event) interrupts.

    After the stream ends, however it ends (including ``close()`` or an exception such as
    KeyboardInterrupt inside the model), ``done`` holds the final ``Done`` with the tokens so far.
    """

    def __init__(self, gen: Iterator, run: _Run):
        self._gen, self._run = gen, run

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> Step | Done:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._run.finish("interrupted")

    @property
    def done(self) -> Done | None:
        return self._run.done

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    config: GenerationConfig, mm_token_type_ids=None, moe_mm_token_type_ids=None,
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    cancel: threading.Event | None = None) -> GenerationStream:
    """Generate from ``input_ids`` (B, P), left-padded when ``attention_mask`` has zeros.

    Inputs are moved to the model's device. Nothing runs until the first ``next()``.

    Yields ``Step(token_ids (B,), index)`` per new token, then ``Done(sequences, finish_reasons,
    stats)``; reasons are 'stop' (eos), 'length' (max_new_tokens) or 'interrupted'.

    Thinking budget: when ``config.max_thinking_tokens`` is set, the caller asserts that the
    prompt ends inside a thought (after ``<think>``). A row that has generated that many tokens
    without ``think_end_ids[0]`` gets ``think_end_ids`` fed as its next tokens, then continues
    with its answer. Forced tokens count as new tokens.
    """
    _check_context(model, input_ids, config)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    run = _Run(input_ids, attention_mask, device)
    vision = dict(mm_token_type_ids=mm_token_type_ids, moe_mm_token_type_ids=moe_mm_token_type_ids,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    vision = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}
    return GenerationStream(_loop(model, run, config, vision, cancel), run)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id: int | tuple[int, ...] | None = None,
             pad_token_id: int | None = None, seed: int | None = None,
             config: GenerationConfig | None = None, **inputs) -> torch.Tensor:
    """Prompt + new ids (B, P + n), like the reference's ``generate``. Unset options keep the
    model's defaults (its ``generation_config`` if it has one, else eos/pad from its config)."""
    base = config or default_config(model)
    config = base.replace(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
    stream = stream_generate(model, input_ids, attention_mask, config=config, **inputs)
    for event in stream:
        if isinstance(event, Done):
            return event.sequences
    raise RuntimeError("generation ended without a Done event")  # unreachable: _loop always ends with Done


def default_config(model) -> GenerationConfig:
    own = getattr(model, "generation_config", None)
    if isinstance(own, GenerationConfig):
        return own
    text = model.config.text
    return GenerationConfig(eos_token_id=tuple(text.eos_token_id), pad_token_id=text.pad_token_id)


# --- the loop -----------------------------------------------------------------------------------

def _loop(model, run: _Run, config: GenerationConfig, vision: dict, cancel) -> Iterator[Step | Done]:
    run.t_start = time.perf_counter()
    if run.device.type == "cuda" and config.max_thinking_tokens is None:
        # static cache, a CUDA graph per step, sampling on the device, ids copied back one step behind
        from model.generation.device_loop import device_loop
        positions = prompt_positions(model, run.input_ids, run.attention_mask, vision["mm_token_type_ids"],
                                     vision["image_grid_thw"], vision["video_grid_thw"])
        yield from device_loop(model, run, config, vision, cancel, positions, Step)
        return
    ids, attn = run.input_ids, run.attention_mask
    B, P = ids.shape
    param = next(model.parameters())
    cache = StaticKVCache(model.config.text, B, P + config.max_new_tokens, param.dtype, param.device)
    if param.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(param.device)
    eos = torch.tensor(config.eos_token_id or (-1,), device=ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or (0,))[0]
    generator = None if is_greedy(config) else make_generator(config.seed, "cpu")
    seen = seen_mask(ids, model.config.text.vocab_size, attn) if config.repetition_penalty != 1.0 else None
    budget = _ThinkingBudget(config, B)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    run.reasons = [None] * B

    positions = prompt_positions(model, ids, attn, vision["mm_token_type_ids"],
                                 vision["image_grid_thw"], vision["video_grid_thw"])
    out = _forward(model, input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                   cache_position=torch.arange(P, device=ids.device), logits_to_keep=1, **vision)
    next_pos = positions[:, :, -1] + 1  # (3, B): one past the last prompt position, per axis
    for i in range(config.max_new_tokens):
        if cancel is not None and cancel.is_set():
            break
        tok = sample_next(out.logits[:, -1], config, generator, seen)
        tok = budget.apply(tok)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        if seen is not None:
            mark_seen(seen, tok)
        finished = run.record(tok, finished, eos)
        yield Step(tok, i)
        if bool(finished.all()) or i == config.max_new_tokens - 1 or (cancel is not None and cancel.is_set()):
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], 1)
        out = _forward(model, input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, :, None],
                       moe_mm_token_type_ids=torch.zeros_like(tok)[:, None], past_key_values=cache,
                       cache_position=torch.tensor([P + i], device=ids.device), logits_to_keep=1)
        next_pos = next_pos + 1
    cancelled = cancel is not None and cancel.is_set() and not bool(finished.all())
    yield run.finish("interrupted" if cancelled else "length")


@torch.no_grad()
def _forward(model, **inputs):
    return model(**inputs)


def prompt_positions(model, ids, attn, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None):
    """3D RoPE positions (3, B, P) of the prompt.

    With images or videos: the model's ``get_rope_index``. Text only: each token's count of real
    tokens before it (padding gets 0), identical on the three axes, as the reference does.
    """
    if image_grid_thw is not None or video_grid_thw is not None:
        if mm_token_type_ids is None:
            raise ValueError("image_grid_thw/video_grid_thw given without mm_token_type_ids")
        positions, _ = model.get_rope_index(ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attn)
        return positions
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # (B, P)
    return pos[None].expand(3, -1, -1)


class _ThinkingBudget:
    """Per row: after ``max_thinking_tokens`` new tokens without '</think>', force ``think_end_ids``."""

    def __init__(self, config: GenerationConfig, B: int):
        self.limit = config.max_thinking_tokens
        self.end = list(config.think_end_ids)
        self.thinking = [self.limit is not None] * B
        self.count = [0] * B
        self.queue: list[list[int]] = [[] for _ in range(B)]

    def apply(self, tok: torch.Tensor) -> torch.Tensor:
        if self.limit is None or not any(self.thinking) and not any(self.queue):
            return tok
        ids = tok.tolist()
        for b in range(len(ids)):
            if self.thinking[b] and self.count[b] >= self.limit:
                self.thinking[b], self.queue[b] = False, list(self.end)
            if self.queue[b]:
                ids[b] = self.queue[b].pop(0)
            elif self.thinking[b] and ids[b] == self.end[0]:
                self.thinking[b] = False  # the model closed its thought itself
            self.count[b] += 1
        return torch.tensor(ids, dtype=tok.dtype, device=tok.device)


def _check_context(model, input_ids: torch.Tensor, config: GenerationConfig) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length > 0, got {tuple(input_ids.shape)}")
    limit = model.config.text.max_position_embeddings
    P = input_ids.shape[1]
    if P + config.max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {P} tokens and {config.max_new_tokens} new tokens were requested: "
            f"{P + config.max_new_tokens} in all, over the model's context of {limit}",
            hint=f"lower max_new_tokens to at most {max(limit - P, 0)}, or shorten the prompt "
                 "(fewer or smaller images, fewer video frames)")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
