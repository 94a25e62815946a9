"""On an NVIDIA GPU (marked ``cuda``; skipped without one): the CUDA path computes what the CPU
path computes. fp32 logits of both tiny configs on every golden input (1e-4), greedy tokens of
every golden generation, a graph replay equal to the eager step step by step, seeded sampling
reproducible. Run with ``python -m pytest -m cuda`` (scripts/cuda_check.sh does, on the GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

from model.generation.generate import GenerationConfig, generate  # noqa: E402
from tests.helpers.reference import CASES, load_ours  # noqa: E402
from tests.test_generate_parity import PAIRS, _golden as _gen_golden, _ours_from_golden, gold  # noqa: E402
from tests.test_model_parity import ATOL, GOLDENS, _golden, _golden_inputs, _real  # noqa: E402

CUDA = torch.device("cuda")
_cuda_models: dict[str, torch.nn.Module] = {}


def _on_cuda(inputs: dict) -> dict:
    return {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_logits_match_goldens(name, case):
    if name not in _cuda_models:
        _cuda_models[name] = load_ours(GOLDENS / name, name).to(CUDA)
    model = _cuda_models[name]
    meta, tensors = _golden(name)
    inputs = _golden_inputs(tensors, case)
    with torch.no_grad():
        out = model(**_on_cuda(inputs), output_router_logits=True)
    real = _real(inputs)
    head, last = tensors[f"{case}.logits_head"], tensors[f"{case}.logits_last"]
    logits = out.logits.cpu()
    torch.testing.assert_close(logits[..., :head.shape[-1]][real], head[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, -1], last, atol=ATOL, rtol=0)
    assert out.loss.item() == pytest.approx(meta["cases"][case]["loss"], abs=1e-5)
    assert out.aux_loss.item() == pytest.approx(meta["cases"][case]["aux_loss"], abs=1e-5)


def _gen_model(config_name: str):
    key = f"gen-{config_name}"
    if key not in _cuda_models:
        _cuda_models[key] = _ours_from_golden(config_name).to(CUDA)
    return _cuda_models[key]


@pytest.mark.parametrize("graphs", ["1", "0"])
@pytest.mark.parametrize("config_name,case", PAIRS)
def test_cuda_greedy_tokens_equal_the_cpu_path(config_name, case, graphs, monkeypatch):
    """The goldens are the reference's tokens, which the CPU path reproduces (test_generate_parity)."""
    monkeypatch.setenv("ERNIE_CUDA_GRAPHS", graphs)
    model = _gen_model(config_name)
    model.__dict__.pop("_cuda_decode_runners", None)  # runners are made with the switch as it is now
    inputs = gold.case_inputs(case)
    out = generate(model, max_new_tokens=gold.MAX_NEW_TOKENS, do_sample=False, **_on_cuda(inputs))
    assert out.tolist() == _gen_golden(config_name)["cases"][case]["sequences"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_step(dtype):
    from model.backends.cuda.decode import DecodeRunner
    from model.generation.generate import _forward, prompt_positions
    from model.generation.kv_cache import StaticKVCache
    from model.rope import text_rope_tables

    model = _ours_from_golden("A").to(CUDA, dtype)
    for m in model.modules():  # routers stay fp32, as the loader keeps them
        if type(m).__name__ == "Router":
            m.float()
    inputs = _on_cuda(gold.case_inputs("batch"))
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    B, P = ids.shape
    text = model.config.text
    runners = [DecodeRunner(model, StaticKVCache(text, B, 256, dtype, CUDA), text_rope_tables(text), use_graph=g)
               for g in (True, False)]
    assert runners[0].graph is not None and runners[1].graph is None
    positions = prompt_positions(model, ids, attn)
    tokens = []
    for runner in runners:
        runner.start(attn)
        out = _forward(model, input_ids=ids, attention_mask=attn, position_ids=positions,
                       past_key_values=runner.cache, cache_position=torch.arange(P, device=CUDA), logits_to_keep=1)
        runner.positions.copy_(positions[:, :, -1] + 1)
        tok, steps = out.logits[:, -1].float().argmax(-1), []
        for i in range(12):
            runner.tokens.copy_(tok)
            if i:
                runner.positions.add_(1)
            runner.slot.fill_(P + i)
            logits = runner.step().clone()
            steps.append(logits)
            tok = logits.argmax(-1)
        tokens.append(steps)
    for i, (graphed, eager) in enumerate(zip(*tokens)):
        torch.testing.assert_close(graphed, eager, atol=0, rtol=0, msg=f"step {i}")


def test_seeded_sampling_is_reproducible():
    model = _gen_model("A")
    inputs = _on_cuda(gold.case_inputs("batch"))
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
                              min_p=0.01, repetition_penalty=1.2, seed=1234)
    runs = [generate(model, config=config, **inputs).tolist() for _ in range(2)]
    assert runs[0] == runs[1]
    other = generate(model, config=config.replace(seed=99), **inputs).tolist()
    assert other != runs[0]
