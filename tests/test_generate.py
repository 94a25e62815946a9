"""The decode loop: bookkeeping on a scripted fake model, then exactness on a tiny random ErnieVL.

Fake model: the next token is always (last fed id + 1) % V, so every expected sequence below is
computed by hand. It also writes to the cache and records what it was fed.
"""

import json
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model.config import tiny
from model.errors import CheckpointError, ContextLengthError, ErnieError
from model.generation.generate import Done, GenerationConfig, Step, generate, stream_generate

V = 1024


class CountingModel(nn.Module):
    """Greedy output = last id + 1. Records every forward's keyword arguments."""

    def __init__(self, **text_overrides):
        super().__init__()
        self.config = tiny(**text_overrides)
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                cache_position=None, logits_to_keep=0, **kw):
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache_position=cache_position, **kw))
        cache = past_key_values
        B, T = input_ids.shape
        shape = (B, cache.keys[0].shape[1], T, cache.keys[0].shape[3])
        for layer in range(cache.num_layers):
            cache.update(layer, torch.zeros(shape), torch.zeros(shape), cache_position)
        logits = torch.full((B, T, V), -10.0)
        logits.scatter_(2, ((input_ids + 1) % V)[..., None], 10.0)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def get_rope_index(self, ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask):
        # a made-up layout whose last prompt position (7) is far below its last slot (9)
        B, P = ids.shape
        pos = torch.tensor([0, 1, 2, 2, 2, 2, 4, 5, 6, 7])[-P:]
        return pos[None, None].expand(3, B, P).clone(), None


def run(model, ids, attn=None, **cfg):
    events = list(stream_generate(model, ids, attn, config=GenerationConfig(**cfg)))
    assert all(isinstance(e, Step) for e in events[:-1]) and isinstance(events[-1], Done)
    return events[:-1], events[-1]


def test_length_stop_and_exact_tokens():
    model = CountingModel()
    steps, done = run(model, torch.tensor([[1, 9, 10]]), max_new_tokens=4)
    assert [s.token_ids.tolist() for s in steps] == [[11], [12], [13], [14]]
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert done.sequences.tolist() == [[1, 9, 10, 11, 12, 13, 14]]
    assert done.finish_reasons == ["length"]
    assert len(model.calls) == 4  # one prefill + three decode steps: no wasted forward


def test_eos_stops_and_several_eos_ids():
    steps, done = run(CountingModel(), torch.tensor([[10]]), max_new_tokens=50, eos_token_id=(99, 13))
    assert done.sequences.tolist() == [[10, 11, 12, 13]] and done.finish_reasons == ["stop"]


def test_decode_feeds_slots_text_expert_ids_and_growing_mask():
    model = CountingModel()
    run(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    prefill, *decode = model.calls
    assert prefill["cache_position"].tolist() == [0, 1, 2]
    assert [c["cache_position"].tolist() for c in decode] == [[3], [4]]
    assert [c["attention_mask"].shape[1] for c in decode] == [4, 5]
    assert all(c["moe_mm_token_type_ids"].tolist() == [[0]] for c in decode)
    assert [c["position_ids"][:, 0, 0].tolist() for c in decode] == [[3, 3, 3], [4, 4, 4]]


def test_decode_positions_continue_from_rope_index_not_from_slots():
    model = CountingModel()
    ids = torch.arange(10, 20)[None]
    mm = torch.zeros_like(ids)
    list(stream_generate(model, ids, config=GenerationConfig(max_new_tokens=3), mm_token_type_ids=mm,
                         image_grid_thw=torch.tensor([[1, 2, 2]])))
    decode = model.calls[1:]
    assert [c["cache_position"].tolist() for c in decode] == [[10], [11]]
    assert [c["position_ids"][:, 0, 0].tolist() for c in decode] == [[8, 8, 8], [9, 9, 9]]


def test_left_padded_batch_rows_finish_independently_and_pad():
    model = CountingModel()
    ids = torch.tensor([[0, 0, 10], [5, 6, 20]])
    attn = torch.tensor([[0, 0, 1], [1, 1, 1]])
    steps, done = run(model, ids, attn, max_new_tokens=4, eos_token_id=(12,), pad_token_id=0)
    assert done.sequences.tolist() == [[0, 0, 10, 11, 12, 0, 0], [5, 6, 20, 21, 22, 23, 24]]
    assert done.finish_reasons == ["stop", "length"]
    assert model.calls[0]["position_ids"][0].tolist() == [[0, 0, 0], [0, 1, 2]]  # padding does not count
    assert model.calls[1]["position_ids"][:, :, 0].tolist() == [[1, 3]] * 3
    assert done.stats.prompt_tokens == 4 and done.stats.completion_tokens == 2 + 4


def test_pad_defaults_to_first_eos():
    _, done = run(CountingModel(), torch.tensor([[10], [30]]), max_new_tokens=3, eos_token_id=(11, 7))
    assert done.sequences[0].tolist() == [10, 11, 11, 11]


def test_cancel_event_keeps_tokens_so_far():
    model = CountingModel()
    cancel = threading.Event()
    events = []
    for e in stream_generate(model, torch.tensor([[10]]), config=GenerationConfig(max_new_tokens=20), cancel=cancel):
        events.append(e)
        if isinstance(e, Step) and e.index == 1:
            cancel.set()
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reasons == ["interrupted"]
    assert done.sequences.tolist() == [[10, 11, 12]] and done.stats.completion_tokens == 2
    assert len(model.calls) == 2  # no forward after the cancellation


def test_closing_the_stream_interrupts_with_tokens_so_far():
    stream = stream_generate(CountingModel(), torch.tensor([[10]]), config=GenerationConfig(max_new_tokens=20))
    assert next(stream).index == 0 and next(stream).index == 1
    stream.close()
    assert stream.done.finish_reasons == ["interrupted"]
    assert stream.done.sequences.tolist() == [[10, 11, 12]]
    with pytest.raises(StopIteration):
        next(stream)


def test_context_length_error_names_the_numbers():
    model = CountingModel(max_position_embeddings=64)
    with pytest.raises(ContextLengthError, match=r"60 tokens.*10 new.*70 in all.*context of 64") as err:
        stream_generate(model, torch.ones(1, 60, dtype=torch.long), config=GenerationConfig(max_new_tokens=10))
    assert "at most 4" in err.value.hint
    run(model, torch.ones(1, 60, dtype=torch.long), max_new_tokens=4)  # exactly at the limit is fine


def test_stats_are_exact_and_positive():
    _, done = run(CountingModel(), torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=6, eos_token_id=(9,))
    s = done.stats
    assert (s.prompt_tokens, s.completion_tokens) == (5, 4)
    assert s.time_to_first_token_s > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert s.total_time_s >= s.time_to_first_token_s and s.peak_memory_bytes > 1 << 20


def test_thinking_budget_forces_end_of_thought():
    # think_end_ids: '</think>' = 50, newlines 60 61. Budget 2 from 47: 48 49 then forced 50 60 61.
    steps, done = run(CountingModel(), torch.tensor([[47]]), max_new_tokens=7, max_thinking_tokens=2,
                      think_end_ids=(50, 60, 61))
    assert done.sequences.tolist() == [[47, 48, 49, 50, 60, 61, 62, 63]]


def test_thinking_budget_leaves_a_closed_thought_alone():
    # the model emits 50 itself at its 3rd token, within the budget of 5: nothing is forced
    _, done = run(CountingModel(), torch.tensor([[47]]), max_new_tokens=8, max_thinking_tokens=5,
                  think_end_ids=(50, 60, 61))
    assert done.sequences.tolist() == [[47] + list(range(48, 56))]


def test_thinking_budget_per_row_and_zero_budget():
    ids = torch.tensor([[47], [100]])
    _, done = run(CountingModel(), ids, max_new_tokens=5, max_thinking_tokens=0, think_end_ids=(50, 60))
    assert done.sequences.tolist() == [[47, 50, 60, 61, 62, 63], [100, 50, 60, 61, 62, 63]]
    _, done = run(CountingModel(), ids, max_new_tokens=5, max_thinking_tokens=3, think_end_ids=(50, 60))
    assert done.sequences.tolist() == [[47, 48, 49, 50, 51, 52], [100, 101, 102, 103, 50, 60]]


def test_generate_returns_prompt_plus_new_and_keeps_model_defaults():
    model = CountingModel(eos_token_id=(12,))
    assert generate(model, torch.tensor([[10]]), max_new_tokens=5).tolist() == [[10, 11, 12]]
    assert generate(model, torch.tensor([[10]]), max_new_tokens=3, eos_token_id=99).tolist() == [[10, 11, 12, 13]]


def test_seeded_sampling_reproducible_through_the_loop():
    class Noisy(CountingModel):
        def forward(self, input_ids, **kw):
            out = super().forward(input_ids, **kw)
            return SimpleNamespace(logits=torch.zeros_like(out.logits))  # uniform over V

    ids = torch.tensor([[1, 2]])
    a = generate(Noisy(), ids, max_new_tokens=8, do_sample=True, seed=3)
    b = generate(Noisy(), ids, max_new_tokens=8, do_sample=True, seed=3)
    c = generate(Noisy(), ids, max_new_tokens=8, do_sample=True, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- GenerationConfig -----------------------------------------------------------------------------

def test_config_from_file_several_eos_and_replace_keeps_on_none(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_p": 0.8, "temperature": 0.2, "eos_token_id": [2, 100272],
         "pad_token_id": 0, "transformers_version": "5.23.0"}))
    cfg = GenerationConfig.from_file(tmp_path)
    assert cfg.eos_token_id == (2, 100272) and cfg.top_p == 0.8 and cfg.do_sample and cfg.pad_token_id == 0
    new = cfg.replace(temperature=None, top_p=0.5, eos_token_id=7)
    assert (new.temperature, new.top_p, new.eos_token_id, new.do_sample) == (0.2, 0.5, (7,), True)
    assert GenerationConfig.from_file(tmp_path / "nowhere") == GenerationConfig()


def test_config_errors_are_typed(tmp_path):
    bad = tmp_path / "generation_config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a usable generation config"):
        GenerationConfig.from_file(bad)
    with pytest.raises(ErnieError, match="top_p must be in"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ErnieError, match="needs think_end_ids"):
        GenerationConfig(max_thinking_tokens=10)


# --- a tiny random ErnieVL: cached decode is exact ------------------------------------------------

IMG, IMG_S, IMG_E, VID, VID_S, VID_E = 3, 4, 5, 8, 6, 7


@pytest.fixture(scope="module")
def ernie():
    ernie_vl = pytest.importorskip("model.ernie_vl")
    from model.config import ErnieVLConfig
    from tests.tiny_configs import CONFIG_A
    torch.manual_seed(0)
    model = ernie_vl.ErnieVL(ErnieVLConfig.from_dict(CONFIG_A)).eval()
    model.init_weights(std=0.3)  # larger than usual so greedy tokens vary
    return model


class Recorder:
    """Duck-typed wrapper that keeps the logits of every forward the loop makes."""

    def __init__(self, model):
        self.model, self.config, self.logits = model, model.config, []

    def parameters(self):
        return self.model.parameters()

    def get_rope_index(self, *args):
        return self.model.get_rope_index(*args)

    def __call__(self, **kw):
        out = self.model(**kw)
        self.logits.append(out.logits[:, -1].clone())
        return out


def mm_inputs(ids, image_grids=(), video_grids=()):
    """Token types and random pixels for a prompt whose placeholders already match the grids."""
    ids = torch.tensor([ids])
    g = torch.Generator().manual_seed(1)
    mm = torch.zeros_like(ids)
    mm[ids == IMG], mm[ids == VID] = 1, 2
    moe = mm.clone()
    moe[(ids == IMG_S) | (ids == IMG_E)], moe[(ids == VID_S) | (ids == VID_E)] = 1, 2
    inputs = dict(input_ids=ids, mm_token_type_ids=mm, moe_mm_token_type_ids=moe)
    if image_grids:
        grid = torch.tensor(image_grids)
        inputs.update(image_grid_thw=grid, pixel_values=torch.randn(int(grid.prod(-1).sum()), 588, generator=g))
    if video_grids:
        grid = torch.tensor(video_grids)
        inputs.update(video_grid_thw=grid, pixel_values_videos=torch.randn(int(grid.prod(-1).sum()), 588, generator=g))
    return inputs


PROMPTS = {
    "text": mm_inputs([1, 40, 41, 42, 43, 44]),
    "image": mm_inputs([1, 40, IMG_S] + [IMG] * 4 + [IMG_E, 41, 42], image_grids=[[1, 4, 4]]),
    "wide image": mm_inputs([1, IMG_S] + [IMG] * 8 + [IMG_E, 41], image_grids=[[1, 4, 8]]),
    "video": mm_inputs([1, 40, VID_S] + [VID] * 4 + [VID_E, 41], video_grids=[[2, 4, 4]]),
    "image+video": mm_inputs([1, IMG_S] + [IMG] * 4 + [IMG_E, 40, VID_S] + [VID] * 4 + [VID_E, 41],
                             image_grids=[[1, 4, 4]], video_grids=[[2, 4, 4]]),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_cached_decode_equals_full_forward_at_every_step(ernie, name):
    inputs = PROMPTS[name]
    rec = Recorder(ernie)
    ids = inputs["input_ids"]
    *_, done = stream_generate(rec, ids, config=GenerationConfig(max_new_tokens=6),
                               **{k: v for k, v in inputs.items() if k != "input_ids"})
    seq, P = done.sequences, ids.shape[1]
    assert len(set(seq[0, P:].tolist())) > 1, "tokens should vary for a meaningful check"
    vision = {k: v for k, v in inputs.items() if k.startswith(("pixel", "image", "video"))}
    for i, cached in enumerate(rec.logits):
        n = P + i
        pad = torch.zeros(1, i, dtype=torch.long)
        with torch.no_grad():
            full = ernie(input_ids=seq[:, :n], mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], pad], 1),
                         moe_mm_token_type_ids=torch.cat([inputs["moe_mm_token_type_ids"], pad], 1),
                         **vision).logits[:, -1]
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4, msg=f"step {i}")


def test_left_padded_batch_equals_each_prompt_alone(ernie):
    a, b = [1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51]
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=(2,), pad_token_id=0)
    alone = [generate(ernie, torch.tensor([p]), config=cfg)[0, len(p):] for p in (a, b)]
    ids = torch.tensor([a, [0] * 5 + b])
    attn = torch.tensor([[1] * 8, [0] * 5 + [1] * 3])
    batch = generate(ernie, ids, attn, config=cfg)[:, 8:]
    for row, single in zip(batch, alone):
        assert row[: len(single)].tolist() == single.tolist()
    assert alone[0].tolist() != alone[1].tolist()


def test_left_padded_image_batch_equals_alone(ernie):
    img = PROMPTS["image"]
    txt = [1, 60, 61]
    cfg = GenerationConfig(max_new_tokens=6)
    P = img["input_ids"].shape[1]
    alone = generate(ernie, config=cfg, **img)[0, P:]
    ids = torch.cat([img["input_ids"], torch.tensor([[0] * (P - 3) + txt])])
    attn = torch.cat([torch.ones(1, P, dtype=torch.long), torch.tensor([[0] * (P - 3) + [1] * 3])])
    pad = lambda t: torch.cat([t, torch.zeros(1, P, dtype=t.dtype)])  # noqa: E731
    batch = generate(ernie, ids, attn, config=cfg, mm_token_type_ids=pad(img["mm_token_type_ids"]),
                     moe_mm_token_type_ids=pad(img["moe_mm_token_type_ids"]),
                     pixel_values=img["pixel_values"], image_grid_thw=img["image_grid_thw"])
    assert batch[0, P:].tolist() == alone.tolist()
    assert batch[1, P:].tolist() == generate(ernie, torch.tensor([txt]), config=cfg)[0, 3:].tolist()


def test_an_error_inside_the_model_still_leaves_a_done_with_tokens_so_far():
    class Failing(CountingModel):
        def forward(self, input_ids, **kw):
            if len(self.calls) == 3:
                raise KeyboardInterrupt
            return super().forward(input_ids, **kw)

    stream = stream_generate(Failing(), torch.tensor([[10]]), config=GenerationConfig(max_new_tokens=20))
    got = []
    with pytest.raises(KeyboardInterrupt):
        for e in stream:
            got.append(e.token_ids.item())
    stream.close()
    assert got == [11, 12, 13] and stream.done.sequences.tolist() == [[10, 11, 12, 13]]
    assert stream.done.finish_reasons == ["interrupted"] and stream.done.stats.completion_tokens == 3
