"""`ernie quantize`, `--quantize` / ERNIE_QUANTIZE, and quantized checkpoints through the real CLI:
the happy paths on ernie-tiny, and one-line errors for broken quantized checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ErnieVL
from model.errors import CheckpointError
from tests.helpers.cli import assert_one_line_error, run_ernie

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "shapes.png"
ANSWER = "A red circle, a blue square and a green triangle."


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[int, Path]:
    """ernie-tiny written as int8 and int4 by `ernie quantize` (shared by the tests below, read-only)."""
    base = tmp_path_factory.mktemp("quantized")
    out = {}
    for bits in (8, 4):
        proc = run_ernie(["quantize", "ernie-tiny", str(base / f"int{bits}"), "--bits", str(bits)], base)
        assert proc.returncode == 0, proc.stderr_text
        assert proc.stdout_text.strip() == str(base / f"int{bits}")
        assert f"wrote int{bits}" in proc.stderr_text
        assert "of weights (0." in proc.stderr_text and "x of the original's" in proc.stderr_text  # weights to weights
        out[bits] = base / f"int{bits}"
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _describe(model: str, tmp_path: Path, *extra: str, **env: str):
    return run_ernie(["describe", str(IMAGE), "--model", model, "-n", "16", *extra], tmp_path, **env)


def test_a_quantized_dir_answers_like_the_original(quantized, tmp_path):
    proc = _describe(str(quantized[4]), tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text.strip() == ANSWER
    for bits in (8, 4):
        config = json.loads((quantized[bits] / "config.json").read_text())
        assert config["quantization"]["bits"] == bits
        assert (quantized[bits] / "tokenizer.json").is_file() and (quantized[bits] / "preprocessor_config.json").is_file()


def test_quantize_environment_variable_on_describe(tmp_path):
    proc = _describe("ernie-tiny", tmp_path, ERNIE_QUANTIZE="int8")
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text.strip() == ANSWER


def test_describe_each_takes_quantize(tmp_path):
    proc = run_ernie(["describe", "--each", str(IMAGE), "--model", "ernie-tiny", "--quantize", "int4", "-n", "16",
                      "--jsonl", "-v"], tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    assert json.loads(proc.stdout_text.splitlines()[0])["text"].strip() == ANSWER


def test_chat_takes_quantize(tmp_path):
    proc = run_ernie(["chat", "--model", "ernie-tiny", "--quantize", "int4", "-n", "16", str(IMAGE)], tmp_path,
                     input="What is in the picture?\n")
    assert proc.returncode == 0, proc.stderr_text
    assert "circle" in proc.stdout_text


def test_serve_takes_quantize(tmp_path):
    """`ernie serve --quantize int4` answers a picture as describe --quantize int4 does, also for
    concurrent requests (decode steps of several rows through the sliced C product)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.server import Served, data_url, request, user

    server = Served(tmp_path, "--model", "ernie-tiny", "--quantize", "int4", "--max-batch", "12")
    try:
        body = {"model": "ernie-tiny", "max_tokens": 16, "temperature": 0,
                "messages": [user("Describe this image.", ("image", data_url(IMAGE, "image/png")))]}
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: request(server, "POST", "/v1/chat/completions", body), range(12)))
        assert all(status == 200 for status, _ in replies), replies
        assert {r["choices"][0]["message"]["content"].strip() for _, r in replies} == {ANSWER}
    finally:
        assert server.stop() == 0, "".join(server.log)


def test_info_and_models_show_format_and_size(quantized, tmp_path):
    proc = run_ernie(["info", str(quantized[4])], tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    assert "int4 (group 64)" in proc.stdout_text and "on disk" in proc.stdout_text
    info = json.loads(run_ernie(["info", str(quantized[8]), "--json"], tmp_path).stdout_text)
    assert info["quantization"]["bits"] == 8 and info["format"] == "int8 (group 128)"
    plain = json.loads(run_ernie(["info", "ernie-tiny", "--json"], tmp_path).stdout_text)
    assert plain["memory_bytes"]["int4"] < plain["memory_bytes"]["int8"] < plain["memory_bytes"]["bfloat16"]
    home = quantized[8].parent / "home"
    rows = json.loads(run_ernie(["models", "--json"], tmp_path, ERNIE_HOME=str(home)).stdout_text)
    assert {r["name"]: r["format"] for r in rows}["ernie-tiny"] == "float32"


def test_models_lists_what_quantize_wrote(tmp_path):
    home = tmp_path / "home"
    proc = run_ernie(["quantize", "ernie-tiny", str(tmp_path / "q8"), "--bits", "8", "-q"], tmp_path,
                     ERNIE_HOME=str(home))
    assert proc.returncode == 0 and proc.stderr_text == "", proc.stderr_text
    rows = json.loads(run_ernie(["models", "--json"], tmp_path, ERNIE_HOME=str(home)).stdout_text)
    local = [r for r in rows if r["source"] == "local"]
    assert [r["name"] for r in local] == [str(tmp_path / "q8")] and local[0]["format"] == "int8 (group 128)"
    table = run_ernie(["models"], tmp_path, ERNIE_HOME=str(home)).stdout_text
    assert "FORMAT" in table and "int8 (group 128)" in table


def test_quantize_refuses_a_non_empty_outdir_and_bad_bits(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    proc = run_ernie(["quantize", "ernie-tiny", str(tmp_path / "taken")], tmp_path)
    assert_one_line_error(proc, "already exists")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    proc = run_ernie(["quantize", "ernie-tiny", str(tmp_path / "x"), "--bits", "5"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    proc = run_ernie(["quantize", "ernie-tiny", str(tmp_path / "x"), "--group-size", "48"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantize_refuses_an_already_quantized_dir(quantized, tmp_path, bits):
    proc = run_ernie(["quantize", str(quantized[4]), str(tmp_path / "again"), "--bits", bits], tmp_path)
    assert_one_line_error(proc, "already quantized (int4)")
    assert "hint: quantize the original checkpoint" in proc.stderr_text and "--quantize" not in proc.stderr_text
    assert not (tmp_path / "again").exists()


def test_a_quantized_dir_cannot_be_loaded_at_other_bits(quantized, tmp_path):
    assert_one_line_error(_describe(str(quantized[4]), tmp_path, "--quantize", "int8"), "already quantized to int4")


# --- broken quantized checkpoints ------------------------------------------------------------------

def _edit_config(directory: Path, **block) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization"].update(block)
    path.write_text(json.dumps(raw))


def _edit_tensors(directory: Path, edit) -> None:
    (shard,) = directory.glob("*.safetensors")
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: shard.name for k in tensors}
    index.write_text(json.dumps(data))


def test_wrong_group_size_is_one_line(quantized, tmp_path):
    broken = _copy(quantized[4], tmp_path)
    _edit_config(broken, group_size=32)
    assert_one_line_error(_describe(str(broken), tmp_path), "scales", "group size 64, not 32")


def test_missing_scales_are_one_line(quantized, tmp_path):
    broken = _copy(quantized[8], tmp_path)
    _edit_tensors(broken, lambda t: t.pop("model.layers.0.self_attn.q_proj.scales"))
    assert_one_line_error(_describe(str(broken), tmp_path), "lacks 1 tensors", "q_proj.scales")


def test_bits_that_disagree_with_the_config_are_one_line(quantized, tmp_path):
    broken = _copy(quantized[4], tmp_path)
    _edit_config(broken, bits=8, group_size=64)
    assert_one_line_error(_describe(str(broken), tmp_path), "int8", "does not describe")  # int4 zeros are extra
    broken = _copy(quantized[8], tmp_path / "b")
    _edit_config(broken, bits=4, group_size=128)
    with pytest.raises(CheckpointError, match="lacks"):  # int4 needs zeros the int8 file lacks
        ErnieVL.from_pretrained(str(broken), device="cpu")


def test_codes_of_the_wrong_width_are_one_line(quantized, tmp_path):
    broken = _copy(quantized[4], tmp_path)

    def widen(t):
        name = "model.layers.0.self_attn.q_proj.qweight"
        t[name] = t[name].view(-1).repeat(2).view(t[name].shape[0], -1).view(dtype=torch.int8)
    _edit_tensors(broken, widen)
    with pytest.raises(CheckpointError, match=r"q_proj.qweight .* \(codes of 8 bits, not 4\)"):
        ErnieVL.from_pretrained(str(broken), device="cpu")


def test_an_unknown_quantization_format_is_one_line(quantized, tmp_path):
    broken = _copy(quantized[8], tmp_path)
    path = broken / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization"] = {"quant_method": "gptq", "bits": 4}
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'gptq'.*ernie-weight-only"):
        ErnieVL.from_pretrained(str(broken), device="cpu")


def test_memory_check_uses_the_quantized_size(quantized, tmp_path):
    from ernie_cli.memory import needed_bytes
    from model.config import ErnieVLConfig

    cfg = ErnieVLConfig.from_file(quantized[4] / "config.json")
    free = (needed_bytes(cfg, "float32", 4) + needed_bytes(cfg, "float32")) // 2  # between int4 and fp32
    proc = _describe("ernie-tiny", tmp_path, ERNIE_FREE_MEMORY_BYTES=str(free))
    assert_one_line_error(proc, "not enough memory")
    assert "--quantize int4" in proc.stderr_text
    proc = _describe("ernie-tiny", tmp_path, "--quantize", "int4", ERNIE_FREE_MEMORY_BYTES=str(free))
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text.strip() == ANSWER
