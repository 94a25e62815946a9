"""The decode loop on a GPU: the prefill eagerly, then one graph replay per token, sampling on the
device, and the new ids copied back one step behind so the host never stalls the device.

Legend: B = batch rows, P = prompt length (padded), N = max_new_tokens.

Per step i: sample token i from the logits on the device; start its copy into pinned host memory
(non-blocking) and record an event; launch step i + 1 (the token into the runner's static input,
replay); only then wait for the event, which the copy reaches before step i + 1 has run, and
yield token i while the device computes the next one. Stopping (eos, the limit, ``cancel``) is
decided on the host copy, so at most one step is computed that nobody reads. Finished rows get
the pad id on the device as well, so the tokens the device feeds back match what the host saw.
"""

from __future__ import annotations

from typing import Iterator

import torch

from model.backends.cuda.decode import runner_for
from model.backends.cuda.sampling import DeviceSampler
from model.kv_cache import StaticKVCache


def cuda_loop(model, run, config, vision: dict, cancel) -> Iterator:
    """``model.generate._loop`` for a model on a GPU (same events, same bookkeeping in ``run``)."""
    from model.generate import Step, _forward, prompt_positions

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

    positions = prompt_positions(model, ids, attn, vision["mm_token_type_ids"],
                                 vision["image_grid_thw"], vision["video_grid_thw"])
    out = _forward(model, input_ids=ids, attention_mask=attn, position_ids=positions,
                   past_key_values=cache, cache_position=torch.arange(P, device=device),
                   logits_to_keep=1, **vision)
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
        yield Step(tok_host, i)
        if bool(finished.all()) or (cancel is not None and cancel.is_set()):
            break
    cancelled = cancel is not None and cancel.is_set() and not bool(finished.all())
    yield run.finish("interrupted" if cancelled else "length")
