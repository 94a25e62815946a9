"""The decode loop on a GPU: the prefill eagerly, then one graph replay per token
(model/backends/cuda/decode.py), sampling on the device, and the new ids copied back one step
behind so the host never stalls the device. The same loop runs on a CPU in tests (eager steps,
Triton's interpreter, no pinned memory or events).

Legend: B = batch rows, P = prompt length (padded), N = max_new_tokens.

Per step i: sample token i from the logits on the device; start its copy into pinned host memory
(non-blocking) and record an event; launch step i + 1 (the token into the runner's static input,
replay); only then wait for the event, which the copy reaches before step i + 1 has run, and
yield token i while the device computes the next one. Stopping (eos, the limit, ``cancel``) is
decided on the host copy, so at most one step is computed that nobody reads. Finished rows get
the pad id on the device as well, so the tokens the device feeds back match what the host saw.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch

from model.backends.cuda.decode import DecodeRunner, capacity_for, graphs_enabled
from model.generation.kv_cache import StaticKVCache
from model.generation.sampling import DeviceSampler
from model.rope import text_rope_tables

MAX_RUNNERS = 4  # (batch, capacity) pairs kept per model, least recently used dropped first


def runner_for(model, batch: int, needed_slots: int) -> DecodeRunner:
    """The model's runner for this batch size and a capacity of at least ``needed_slots`` (made,
    and its graph captured, on first use; a runner up to 4x larger is reused)."""
    runners: OrderedDict = model.__dict__.setdefault("_cuda_decode_runners", OrderedDict())
    capacity = capacity_for(needed_slots)
    key = next((k for k in runners if k[0] == batch and capacity <= k[1] <= 4 * capacity), (batch, capacity))
    if key not in runners:
        while len(runners) >= MAX_RUNNERS:
            runners.popitem(last=False)
        text, weight = model.config.text, model.output_weight
        cache = StaticKVCache(text, batch, key[1], weight.dtype, weight.device)
        runners[key] = DecodeRunner(model, cache, text_rope_tables(text), use_graph=graphs_enabled())
    runners.move_to_end(key)
    return runners[key]


@torch.no_grad()
def device_loop(model, run, config, vision: dict, cancel, positions: torch.Tensor, step_event) -> Iterator:
    """``model.generation.generate._loop`` for a model on a GPU: the same events (``step_event``
    is its ``Step``) and the same bookkeeping in ``run``; ``positions`` (3, B, P) of the prompt."""
    ids, attn = run.input_ids, run.attention_mask
    B, P = ids.shape
    N = config.max_new_tokens
    device = ids.device
    # made (graph captured) on first use of this size; one new token needs no decode step
    runner = runner_for(model, B, P + N) if N > 1 else None
    cache = runner.cache if runner else StaticKVCache(model.config.text, B, P + N, model.output_weight.dtype, device)
    on_gpu = device.type == "cuda"  # (the same loop runs on a CPU in tests, without pinning or events)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    if runner:
        runner.start(attn)
    eos_host = torch.tensor(config.eos_token_id or (-1,))
    eos = eos_host.to(device)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or (0,))[0]
    sampler = DeviceSampler(config, ids, attn, model.config.text.vocab_size)
    finished_dev = torch.zeros(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool)
    run.reasons = [None] * B

    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                cache_position=torch.arange(P, device=device), logits_to_keep=1, **vision)
    logits = out.logits[:, -1]
    if runner:
        runner.positions.copy_(positions[:, :, -1] + 1)  # (3, B): the first new token's position
    host = torch.empty(2, B, dtype=torch.long, pin_memory=on_gpu)
    events = [torch.cuda.Event(), torch.cuda.Event()] if on_gpu else None
    for i in range(N):
        if cancel is not None and cancel.is_set():
            break
        tok = sampler(logits)
        tok = torch.where(finished_dev, torch.full_like(tok, pad), tok)  # (B,)
        sampler.observe(tok)
        finished_dev |= torch.isin(tok, eos)
        host[i % 2].copy_(tok, non_blocking=True)
        if on_gpu:
            events[i % 2].record()
        if i < N - 1:  # the next step runs while the host handles this token
            runner.tokens.copy_(tok)
            if i > 0:
                runner.positions.add_(1)
            runner.slot.fill_(P + i)
            logits = runner.step()
        if on_gpu:
            events[i % 2].synchronize()
        tok_host = host[i % 2].clone()
        finished = run.record(tok_host, finished, eos_host)
        yield step_event(tok_host, i)
        if bool(finished.all()) or (cancel is not None and cancel.is_set()):
            break
    cancelled = cancel is not None and cancel.is_set() and not bool(finished.all())
    yield run.finish("interrupted" if cancelled else "length")
