"""Continuous batching: many generations decoded together over one preallocated KV cache.

Requests arrive over time (``submit``, from any thread); each owns a row of the cache while it
decodes. ``step()`` (called from one thread) admits waiting requests into free rows, prefilling
their prompts together, then runs one decode step for every live row, and returns what happened:
``RequestStep(request, token_id, index)`` per new token and ``RequestDone(request, reason,
token_ids, stats)`` when a request ends ('stop' at eos, 'length' at max_new_tokens,
'interrupted' or a caller's reason after ``cancel``, 'error' when its prefill failed). A row
that ends is refilled at the next step with the next waiting request.

Design, per-row cache positions over a static cache:

* Row r of the cache holds one request's tokens from slot 0: its prompt at 0..P-1, then its new
  tokens. A decode step feeds every live row its last token at that row's own next slot
  (``cache_position`` (A, 1)), at its own 3D RoPE position, under a mask (A, 1, 1, S) that shows
  each row its own slots only (``model.attention``). Rows of different lengths, joined at
  different times, therefore decode together with no padding between their tokens.
* Live rows are kept at the front (rows 0..A-1), so a step computes A rows, never idle ones
  (on a MoE an idle row would still route to experts). A row that ends is refilled in place;
  when nothing is waiting, the last live row's slots are moved into the hole.
* A prefill runs the admitted prompts together, left-padded, into a temporary cache of their
  own, then copies each row's keys and values to slot 0 of its cache row. Keys carry RoPE by
  position, not by slot, so moved keys stay valid. Vision runs only here. Prompts admitted
  together whose lengths differ widely are prefilled in groups of similar length
  (``prefill_groups``), so that a long picture prompt does not pad short questions to its length.
* The cache has as many slots per row as the longest live request needs (its prompt plus its
  max_new_tokens, rounded up to CACHE_ROUND) and grows when a longer one is admitted. Under
  ``max_cache_tokens`` (rows x slots) a cache for long requests gets fewer rows: a request that
  would push it over the cap waits until enough rows have ended, and one that could not fit even
  alone is refused at ``submit`` with the context error. A burst of long requests therefore
  never allocates more than the cap.
* Sampling is per request (its own ``GenerationConfig``: temperature, top-p/k, min-p,
  repetition penalty, seed, eos, thinking budget); rows that decode greedily without a penalty
  share one argmax.

Greedy answers match ``stream_generate`` on the request alone: the same prompt positions,
slots, masks (the same visible keys) and token choice per row; a batch of rows differs from a
row alone only in the rounding of batched products.

Legend: A = live rows, B = cache rows (max_batch), P = prompt length, S = key slots, V = vocabulary.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from model.errors import ContextLengthError, ErnieError
from model.generation.generate import (GenerationConfig, _check_context, _peak_memory, _ThinkingBudget,
                                       default_config, prompt_positions)
from model.generation.kv_cache import StaticKVCache
from model.generation.sampling import is_greedy, make_generator, mark_seen, sample_next, seen_mask
from model.generation.stats import GenerationStats

PREFILL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids", "pixel_values",
                  "image_grid_thw", "pixel_values_videos", "video_grid_thw")
_PADDED = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids")  # (1, P) each
_STACKED = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")  # rows in prompt order
CACHE_ROUND = 256  # the cache grows in steps of this many slots
PREFILL_SPLIT_TOKENS = 256  # a prefill's fixed cost in padded prompt tokens (see prefill_groups)


@dataclass(eq=False)
class Request:
    """One submitted generation. ``cancel`` may be called from any thread."""

    id: int
    inputs: dict[str, torch.Tensor]
    config: GenerationConfig
    prompt_tokens: int
    submitted_at: float = field(default_factory=time.perf_counter)
    cancel_reason: str | None = None
    done: bool = False

    def cancel(self, reason: str = "interrupted") -> None:
        """End this request at the scheduler's next step (its row is freed); ``reason`` is reported."""
        if self.cancel_reason is None:
            self.cancel_reason = reason


@dataclass(frozen=True)
class RequestStep:
    request: Request
    token_id: int
    index: int  # 0 for the first new token


@dataclass(frozen=True)
class RequestDone:
    request: Request
    reason: str  # stop | length | interrupted (or the reason given to cancel) | error
    token_ids: list[int]  # the new tokens, eos included
    stats: GenerationStats | None
    error: BaseException | None = None


@dataclass(eq=False)
class _Row:
    """A live request in a cache row."""

    request: Request
    length: int  # filled slots: the next token goes to this slot
    position: torch.Tensor  # (3,) RoPE position of the next token fed
    budget: _ThinkingBudget
    seen: torch.Tensor | None  # (1, V) for the repetition penalty
    generator: torch.Generator | None
    admitted_at: float
    new: list[int] = field(default_factory=list)
    first_at: float | None = None

    @property
    def plain_greedy(self) -> bool:
        return is_greedy(self.request.config) and self.seen is None and self.budget.limit is None


class Scheduler:
    """Continuous batching of requests over one KV cache of ``max_batch`` rows (see module doc).

    ``max_prefill_tokens`` bounds one prefill (rows x padded prompt length; one request always
    fits). ``min_admit``: a prefill waits until it can take this many requests, so that one
    prefill serves several (throughput; a prefill of one costs about twice as much per request
    as one of eight); 1 admits at once (latency), except while ``expect()`` counts requests on
    their way (a server preparing the rest of a burst): then the waiting ones are held for them,
    at most ``max_hold_s``. Above 1 it waits for this many free rows while others decode, and
    for this many waiting requests, unless ``end_of_input()`` said that no more are coming or
    the oldest has waited ``max_hold_s``. The cache is allocated at the
    first admission and grows when a request needs more slots; ``max_cache_tokens`` (None: no
    cap) bounds its rows x slots (see the module docstring).
    """

    def __init__(self, model, max_batch: int = 8, max_prefill_tokens: int = 16384, min_admit: int = 1,
                 max_hold_s: float = 0.5, max_cache_tokens: int | None = None):
        if max_batch < 1 or min_admit < 1:
            raise ValueError(f"max_batch and min_admit must be >= 1, got {max_batch}, {min_admit}")
        if max_cache_tokens is not None and max_cache_tokens < 1:
            raise ValueError(f"max_cache_tokens must be >= 1 or None, got {max_cache_tokens}")
        self.model = model
        self.max_batch = max_batch
        self.min_admit = min(min_admit, max_batch)
        self.max_hold_s = max_hold_s
        self.max_prefill_tokens = max_prefill_tokens
        self.max_cache_tokens = max_cache_tokens
        self._more_coming = True
        self._expected = 0  # requests on their way (see expect)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.default_config = default_config(model)
        self._rows: list[_Row | None] = [None] * max_batch
        self._cache: StaticKVCache | None = None
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._woken = False  # wake() was called: wait_for_work returns
        self._ids = itertools.count()

    # --- from any thread ---------------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, Any], config: GenerationConfig | None = None,
               arrived: bool = False) -> Request:
        """Queue one prompt: the processor's tensors for ONE conversation (``input_ids`` (1, P), and
        pixels and grids when it has media). Raises ContextLengthError when P + max_new_tokens is
        over the model's context, or over ``max_cache_tokens``. ``arrived``: this is one of the
        requests ``expect`` counted as on their way (the count drops as it joins the queue)."""
        config = config or self.default_config
        tensors = {k: v for k, v in inputs.items() if k in PREFILL_INPUTS and v is not None}
        ids = tensors.get("input_ids")
        if ids is None or ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"submit takes one prompt: input_ids (1, P), got "
                             f"{None if ids is None else tuple(ids.shape)}")
        mask = tensors.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):  # a padded single row: keep its real tokens
            keep = mask[0].bool()
            for k in _PADDED[:1] + _PADDED[2:]:
                if k in tensors:
                    tensors[k] = tensors[k][:, keep]
        _check_context(self.model, tensors["input_ids"], config)
        P = tensors["input_ids"].shape[1]
        self._check_cache_cap(P, config.max_new_tokens)
        request = Request(next(self._ids), tensors, config, P)
        with self._lock:
            self._waiting.append(request)
            if arrived:
                self._expected = max(self._expected - 1, 0)
            self._lock.notify_all()
        return request

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until ``step`` has something to do: a live row, or waiting requests it may admit
        now (see ``min_admit``), or ``timeout`` passes, or ``wake()`` is called; True when there is
        work."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._lock:
            while True:
                hold = self._hold_left()
                if self.num_live or (self._waiting and hold <= 0):
                    return True
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                if self._woken:  # a wake() since the last return (maybe while ``step`` ran)
                    self._woken = False
                    return False
                waits = [t for t in (left, hold if self._waiting else None) if t is not None]
                self._lock.wait(min(waits) if waits else None)

    def wake(self) -> None:
        """Make a thread blocked in ``wait_for_work`` return at once (after a cancel, or to make it
        stop)."""
        with self._lock:
            self._woken = True
            self._lock.notify_all()

    def end_of_input(self, ended: bool = True) -> None:
        """No more requests are coming (for now): admit the last ones without waiting for
        ``min_admit`` of them. ``ended=False`` undoes it."""
        with self._lock:
            self._more_coming = not ended
            self._lock.notify_all()

    def expect(self, delta: int) -> None:
        """Requests on their way change by ``delta`` (+1 when a server accepts one, -1 once it is
        submitted or has failed): with ``min_admit`` 1, waiting requests are held for those on
        their way, at most ``max_hold_s``, so that a burst shares one prefill."""
        with self._lock:
            self._expected = max(self._expected + delta, 0)
            self._lock.notify_all()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_expected(self) -> int:
        """Requests ``expect`` counts as on their way."""
        return self._expected

    @property
    def num_live(self) -> int:
        return sum(r is not None for r in self._rows)

    # --- the scheduling thread ---------------------------------------------------------------------
    def step(self) -> list[RequestStep | RequestDone]:
        """Cancel what was cancelled, admit waiting requests into free rows (one prefill), then one
        decode step for all live rows. Returns the events in order."""
        events: list[RequestStep | RequestDone] = []
        self._drop_cancelled(events)
        self._admit(events)
        self._compact()
        if any(r is not None for r in self._rows):
            try:
                self._decode(events)
            except Exception as e:  # a failed step ends every live request; the scheduler goes on
                for i, row in enumerate(self._rows):
                    if row is not None:
                        events.append(self._end(i, "error", error=e))
        return events

    def cancel_all(self, reason: str = "interrupted") -> None:
        with self._lock:
            for request in list(self._waiting):
                request.cancel(reason)
        for row in self._rows:
            if row is not None:
                row.request.cancel(reason)

    # --- admission and prefill ----------------------------------------------------------------------
    def _drop_cancelled(self, events: list) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancel_reason is not None]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            request.done = True
            events.append(RequestDone(request, request.cancel_reason, [], None))
        for i, row in enumerate(self._rows):
            if row is not None and row.request.cancel_reason is not None:
                events.append(self._end(i, row.request.cancel_reason))

    def _hold_left(self) -> float:
        """Seconds the waiting requests are still held back for companions (0: admit them now).
        Called under the lock."""
        if not self._waiting or any(r.cancel_reason is not None for r in self._waiting):
            return 0.0  # (step drops cancelled ones)
        free = sum(r is None for r in self._rows)
        if self.min_admit == 1:
            if self._expected == 0 or len(self._waiting) >= free:
                return 0.0  # nothing on its way, or no row left for it
            return max(self._waiting[0].submitted_at + self.max_hold_s - time.perf_counter(), 0.0)
        if free < self.min_admit and free < self.max_batch:
            return self.max_hold_s  # rows are live: a decode step frees rows, not time
        if len(self._waiting) >= min(self.min_admit, free) or not self._more_coming:
            return 0.0
        return max(self._waiting[0].submitted_at + self.max_hold_s - time.perf_counter(), 0.0)

    def _admit(self, events: list) -> None:
        free = [i for i, r in enumerate(self._rows) if r is None]
        live = self.num_live
        need = max((_slots_needed(r.request) for r in self._rows if r is not None), default=0)
        group: list[Request] = []
        with self._lock:
            if self._hold_left() > 0:
                return  # let more rows free up and more requests arrive: one prefill serves several
            while self._waiting and len(group) < len(free):
                head = self._waiting[0]
                longest = max([head.prompt_tokens] + [r.prompt_tokens for r in group])
                if group and longest * (len(group) + 1) > self.max_prefill_tokens:
                    break
                if live + len(group) + 1 > self._rows_for(self._slots_for(max(need, _slots_needed(head)))):
                    break  # over max_cache_tokens: it waits (first in, first out) until rows end
                need = max(need, _slots_needed(head))
                group.append(self._waiting.popleft())
        if not group:
            return
        self._ensure_cache(need, live + len(group))
        free = [i for i, r in enumerate(self._rows) if r is None][:len(group)]  # all below the cache's rows
        for run in prefill_groups([r.prompt_tokens for r in group]):
            self._prefill_or_isolate([group[j] for j in run], [free[j] for j in run], events)

    def _prefill_or_isolate(self, group: list[Request], slots: list[int], events: list) -> None:
        """Prefill the group; when that fails, each request alone, so that only a culprit fails."""
        try:
            self._prefill(group, slots, events)
        except Exception as e:
            for slot in slots:
                self._rows[slot] = None
            if len(group) == 1:
                group[0].done = True
                events.append(RequestDone(group[0], "error", [], None, error=e))
                return
            for request, slot in zip(group, slots):
                try:
                    self._prefill([request], [slot], events)
                except Exception as e1:
                    self._rows[slot] = None
                    request.done = True
                    events.append(RequestDone(request, "error", [], None, error=e1))

    def _prefill(self, group: list[Request], slots: list[int], events: list) -> None:
        t0 = time.perf_counter()
        batch = _collate(group, self._pad_id())
        batch = {k: v.to(self.device, self.dtype if v.is_floating_point() else None) for k, v in batch.items()}
        ids, attn = batch["input_ids"], batch["attention_mask"]
        k, P = ids.shape
        positions = prompt_positions(self.model, ids, attn, batch.get("mm_token_type_ids"),
                                     batch.get("image_grid_thw"), batch.get("video_grid_thw"))
        scratch = StaticKVCache(self.model.config.text, k, P, self.dtype, self.device)
        with torch.no_grad():
            out = self.model(**batch, position_ids=positions, past_key_values=scratch,
                             cache_position=torch.arange(P, device=self.device), logits_to_keep=1)
        logits = out.logits[:, -1]  # (k, V)
        rows = []
        for j, (request, slot) in enumerate(zip(group, slots)):
            n = request.prompt_tokens
            for layer in range(scratch.num_layers):  # the row's real slots P-n..P-1 -> 0..n-1
                self._cache.keys[layer][slot, :, :n] = scratch.keys[layer][j, :, P - n:]
                self._cache.values[layer][slot, :, :n] = scratch.values[layer][j, :, P - n:]
            config = request.config
            seen = None
            if config.repetition_penalty != 1.0:
                seen = seen_mask(ids[j:j + 1, P - n:], self.model.config.text.vocab_size)
            generator = None if is_greedy(config) else make_generator(config.seed, "cpu")
            row = _Row(request, n, positions[:, j, -1] + 1, _ThinkingBudget(config, 1), seen, generator, t0)
            self._rows[slot] = row
            rows.append((slot, row))
        self._sample(logits, rows, events)

    def _ensure_cache(self, needed: int, rows: int) -> None:
        """A cache with at least ``needed`` slots and ``rows`` rows; a new one (live rows moved to
        its first rows) when the old one is too short or has too few rows."""
        old = self._cache
        if old is not None and old.max_len >= needed and old.batch_size >= rows:
            return
        slots = self._slots_for(needed)
        cache = StaticKVCache(self.model.config.text, self._rows_for(slots), slots, self.dtype, self.device)
        live = [(i, r) for i, r in enumerate(self._rows) if r is not None]
        if old is not None:
            for dst, (src, row) in enumerate(live):
                for layer in range(old.num_layers):
                    cache.keys[layer][dst, :, :row.length] = old.keys[layer][src, :, :row.length]
                    cache.values[layer][dst, :, :row.length] = old.values[layer][src, :, :row.length]
        self._rows = [r for _, r in live] + [None] * (self.max_batch - len(live))
        self._cache = cache

    def _slots_for(self, needed: int) -> int:
        """Slots per row of a cache for requests needing up to ``needed``: rounded up to
        CACHE_ROUND, within the context and max_cache_tokens."""
        bound = self.model.config.text.max_position_embeddings
        if self.max_cache_tokens is not None:
            bound = min(bound, self.max_cache_tokens)
        return max(min(-(-needed // CACHE_ROUND) * CACHE_ROUND, bound), needed)

    def _rows_for(self, slots: int) -> int:
        """Rows a cache of ``slots`` slots may have: max_batch, fewer under max_cache_tokens."""
        if self.max_cache_tokens is None:
            return self.max_batch
        return max(1, min(self.max_batch, self.max_cache_tokens // slots))

    def _check_cache_cap(self, prompt_tokens: int, max_new_tokens: int) -> None:
        cap = self.max_cache_tokens
        if cap is not None and prompt_tokens + max_new_tokens > cap:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were requested: "
                f"{prompt_tokens + max_new_tokens} in all, over the {cap} the batch's KV cache may hold",
                hint=f"lower max_new_tokens to at most {max(cap - prompt_tokens, 0)}, or shorten the prompt")

    def _pad_id(self) -> int:
        cfg = self.default_config
        return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or (0,))[0]

    # --- decoding -----------------------------------------------------------------------------------
    def _decode(self, events: list) -> None:
        live = [(i, r) for i, r in enumerate(self._rows) if r is not None]
        A = len(live)  # rows 0..A-1 after _compact
        tokens = torch.tensor([[r.new[-1]] for _, r in live], device=self.device)  # (A, 1)
        slots = torch.tensor([[r.length] for _, r in live], device=self.device)  # (A, 1)
        positions = torch.stack([r.position for _, r in live], 1)[:, :, None]  # (3, A, 1)
        with torch.no_grad():
            out = self.model(input_ids=tokens, position_ids=positions, past_key_values=self._cache.first_rows(A),
                             cache_position=slots, moe_mm_token_type_ids=torch.zeros_like(tokens),
                             logits_to_keep=1)
        for _, row in live:
            row.length += 1
            row.position = row.position + 1
        self._sample(out.logits[:, -1], live, events)

    def _sample(self, logits: torch.Tensor, rows: list[tuple[int, _Row]], events: list) -> None:
        """Choose each row's next token from its logits (k, V); emit steps; end finished rows."""
        plain = [j for j, (_, r) in enumerate(rows) if r.plain_greedy]
        chosen: dict[int, int] = {}
        if plain:
            picked = logits[plain].float().argmax(-1).tolist()
            chosen.update(zip(plain, picked))
        for j, (_, row) in enumerate(rows):
            if j in chosen:
                continue
            config = row.request.config
            tok = sample_next(logits[j:j + 1], config, row.generator, row.seen)
            tok = row.budget.apply(tok)
            if row.seen is not None:
                mark_seen(row.seen, tok)
            chosen[j] = int(tok[0])
        now = time.perf_counter()
        for j, (slot, row) in enumerate(rows):
            token = chosen[j]
            row.first_at = row.first_at or now
            row.new.append(token)
            events.append(RequestStep(row.request, token, len(row.new) - 1))
            config = row.request.config
            if token in config.eos_token_id:
                events.append(self._end(slot, "stop"))
            elif len(row.new) >= config.max_new_tokens:
                events.append(self._end(slot, "length"))

    def _end(self, slot: int, reason: str, error: BaseException | None = None) -> RequestDone:
        row = self._rows[slot]
        self._rows[slot] = None
        row.request.done = True
        now = time.perf_counter()
        ttft = (row.first_at or now) - row.admitted_at
        decoded = max(len(row.new) - 1, 0)
        decode_s = now - row.first_at if row.first_at is not None else 0.0
        stats = GenerationStats(
            prompt_tokens=row.request.prompt_tokens, completion_tokens=len(row.new), time_to_first_token_s=ttft,
            prefill_tokens_per_s=row.request.prompt_tokens / ttft if ttft > 0 else 0.0,
            decode_tokens_per_s=decoded / decode_s if decoded and decode_s > 0 else 0.0,
            peak_memory_bytes=_peak_memory(self.device), total_time_s=now - row.admitted_at)
        return RequestDone(row.request, reason, list(row.new), stats, error)

    def _compact(self) -> None:
        """Move live rows to the front: the last live row fills each hole before it."""
        while True:
            live = [i for i, r in enumerate(self._rows) if r is not None]
            holes = [i for i, r in enumerate(self._rows) if r is None]
            if not live or not holes or holes[0] > live[-1]:
                return
            src, dst = live[-1], holes[0]
            n = self._rows[src].length
            for layer in range(self._cache.num_layers):
                self._cache.keys[layer][dst, :, :n] = self._cache.keys[layer][src, :, :n]
                self._cache.values[layer][dst, :, :n] = self._cache.values[layer][src, :, :n]
            self._rows[dst], self._rows[src] = self._rows[src], None


def _slots_needed(request: Request) -> int:
    """Cache slots a request may fill: its prompt and every new token it may generate."""
    return request.prompt_tokens + request.config.max_new_tokens


def prefill_groups(lengths: list[int], split_tokens: int | None = None) -> list[list[int]]:
    """The admitted prompts (their lengths) split into prefills of similar length, as index lists.

    A prefill pads every prompt to its longest, and padding costs as much as prompt. Among the
    splits of the prompts sorted by length into runs, this takes the one with the least
    sum(run size x longest in the run) + ``split_tokens`` per run (a prefill's fixed cost, in
    padded tokens; PREFILL_SPLIT_TOKENS). One run per prefill, each in admission order, the run
    holding the earliest admitted first. A picture of 1,500 tokens among 15 text questions of 30
    is prefilled apart from them instead of padding them all to 1,500.
    """
    split = PREFILL_SPLIT_TOKENS if split_tokens is None else split_tokens
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))  # longest first
    best = [0] + [float("inf")] * n  # best[j]: the least cost of order[:j]
    start = [0] * (n + 1)  # where the last run of that split begins
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + split
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(sorted(order[start[j]:j]))
        j = start[j]
    return sorted(runs)


def _collate(group: list[Request], pad_id: int) -> dict[str, torch.Tensor]:
    """The group's prompts as one left-padded batch (k, P) with attention_mask; media rows stacked."""
    P = max(r.prompt_tokens for r in group)
    batch: dict[str, torch.Tensor] = {}
    names = {k for r in group for k in r.inputs}
    for name in _PADDED:
        if name == "attention_mask" or (name != "input_ids" and name not in names):
            continue
        fill = pad_id if name == "input_ids" else 0
        rows = []
        for r in group:
            t = r.inputs.get(name)
            if t is None:  # another request has token types and this one not: text only
                t = torch.zeros_like(r.inputs["input_ids"])
            rows.append(torch.nn.functional.pad(t, (P - t.shape[1], 0), value=fill))
        batch[name] = torch.cat(rows, 0)
    batch["attention_mask"] = torch.cat(
        [torch.nn.functional.pad(torch.ones(1, r.prompt_tokens, dtype=torch.long), (P - r.prompt_tokens, 0))
         for r in group], 0)
    for name in _STACKED:
        parts = [r.inputs[name] for r in group if name in r.inputs]
        if parts:
            batch[name] = torch.cat(parts, 0)
    return batch


def check_request_error(done: RequestDone) -> None:
    """Raise the error a request ended with (ErnieError as is, anything else wrapped)."""
    if done.error is None:
        return
    if isinstance(done.error, ErnieError):
        raise done.error
    raise ErnieError(f"generation failed: {type(done.error).__name__}: {done.error}") from done.error
