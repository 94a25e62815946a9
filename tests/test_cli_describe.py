"""`ernie describe` end to end on a tiny random checkpoint: the real executable against the library.

The expected answers come from the library in-process (load_pretrained + processor + greedy
`model.generation.generate.generate`), which test_generate_parity ties to transformers 5.23.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import ERNIE, TRACEBACK, assert_one_line_error, ernie_env, run_ernie
from tests.helpers.media import encode, make_image, make_video

torch = pytest.importorskip("torch")
ESC = "\x1b"
NEW = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint (Baidu layout + processor files), a picture and a clip, in one directory."""
    from model.config import tiny
    from tests.helpers.checkpoints import make_checkpoint_from_ours, random_state
    from tests.helpers.tokenizer import make_tiny_processor_dir

    root = tmp_path_factory.mktemp("cli")
    config = tiny()
    make_checkpoint_from_ours(root / "ckpt", random_state(config, seed=3), config, layout="baidu")
    make_tiny_processor_dir(root / "ckpt", image_kwargs=dict(max_pixels=28 * 28 * 16),
                            video_kwargs=dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, min_frames=2,
                                              max_frames=8))
    (root / "cat.png").write_bytes(encode(make_image("RGB", 64, 48), "PNG"))
    make_video(root / "clip.mp4", frames=10, fps=10)
    return root


@pytest.fixture(scope="module")
def greedy(world):
    return _library_answer(world, "What is in these?", [("image", "cat.png"), ("video", "clip.mp4")], fps=4)


def _library_answer(root: Path, prompt: str, media: list[tuple[str, str]], fps: float | None = None):
    """(prompt_tokens, text, inputs) for a greedy answer computed in-process."""
    from model.generation.generate import GenerationConfig, generate
    from model import load_pretrained
    from processing.detokenize import StreamDecoder
    from processing.processor import ErnieVLProcessor
    from processing.thinking import ThinkSplitter

    model = load_pretrained(str(root / "ckpt"), device="cpu")
    processor = ErnieVLProcessor.from_pretrained(root / "ckpt")
    content = [{"type": "text", "text": prompt}] + [{"type": k, "path": str(root / p)} for k, p in media]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], fps=fps)
    config = GenerationConfig.from_file(root / "ckpt").replace(max_new_tokens=NEW, temperature=0.0)
    names = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids", "pixel_values",
             "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    sequences = generate(model, config=config, **{k: v for k, v in inputs.items() if k in names})
    P = inputs["input_ids"].shape[1]
    decoder, splitter = StreamDecoder(processor.tokenizer), ThinkSplitter(start_in_thinking=False)
    pieces = splitter.feed(decoder.push_many(sequences[0, P:].tolist()) + decoder.finish()) + splitter.finish()
    return P, "".join(p.text for p in pieces if type(p).__name__ == "TextDelta"), inputs


def test_json_greedy_answer_matches_the_library(world, greedy):
    prompt = "What is in these?"
    proc = run_ernie(["describe", "cat.png", "clip.mp4", "--model", "ckpt", "--json", "--temperature", "0",
                      "-n", str(NEW), "--fps", "4"], world, input=prompt + "\n")  # prompt from piped stdin
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stderr_text == ""  # non-TTY, not verbose: nothing but the answer
    assert ESC not in proc.stdout_text
    obj = json.loads(proc.stdout_text)
    P, text, inputs = greedy
    assert obj["text"] == text
    assert obj["usage"]["prompt_tokens"] == P
    assert obj["usage"]["completion_tokens"] <= NEW and obj["finish_reason"] in ("stop", "length")
    assert obj["thinking"] is None and obj["model"] == "ckpt"
    image, video = obj["media"]
    assert image["kind"] == "image" and image["grid"] == inputs["image_grid_thw"][0].tolist()
    assert video["kind"] == "video" and video["grid"] == inputs["video_grid_thw"][0].tolist()
    assert video["timestamps"] == pytest.approx(inputs.video_timestamps[0])
    assert image["tokens"] == int((inputs["input_ids"] == 3).sum())  # the tiny tokenizer's image token
    assert set(obj["timings"]) == {"load_s", "preprocess_s", "time_to_first_token_s", "prefill_tokens_per_s",
                                   "decode_tokens_per_s"}
    assert all(v is not None and v >= 0 for v in obj["timings"].values())


def test_plain_pipe_streams_only_the_answer_and_stops_at_a_stop_string(world, greedy):
    text = greedy[1]
    assert len(text) >= 4, f"the random model's answer {text!r} is too short to cut"
    stop = text[2:4]
    expected = text[: text.index(stop)]
    proc = run_ernie(["describe", "cat.png", "clip.mp4", "--model", "ckpt", "--temperature", "0", "-n", str(NEW),
                      "--fps", "4", "--prompt", "What is in these?", "--stop", stop, "-v"], world)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == expected + "\n"
    assert ESC not in proc.stdout_text + proc.stderr_text
    assert proc.stderr_text.rstrip().endswith("stop")  # -v stats line: finish reason
    assert "prompt +" in proc.stderr_text and "prompt +" not in proc.stdout_text


def test_prompt_over_the_context(world):
    proc = run_ernie(["describe", "cat.png", "--model", "ckpt", "-n", "5000", "--device", "cpu"], world)
    assert_one_line_error(proc, "context")


def test_corrupt_shard(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world / "ckpt", bad)
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copy(world / "cat.png", tmp_path / "cat.png")
    assert_one_line_error(run_ernie(["describe", "cat.png", "--model", "bad", "--device", "cpu"], tmp_path),
                          "model.safetensors")


def test_not_enough_memory_fails_before_loading(world):
    proc = run_ernie(["describe", "cat.png", "--model", "ckpt", "--device", "cpu", "--dtype", "float32"], world,
                     ERNIE_FREE_MEMORY_BYTES="1000")
    assert_one_line_error(proc, "not enough memory", "cpu", "float32")
    assert "--dtype bfloat16" in proc.stderr_text  # the flag that helps


def test_closed_stdout_ends_quietly(world):
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([str(ERNIE), "describe", "cat.png", "--model", "ckpt", "-n", "4", "--temperature", "0"],
                              stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=world,
                              env=ernie_env(world), timeout=120)
    finally:
        os.close(write)
    err = proc.stderr.decode()
    assert TRACEBACK not in err and "Broken pipe" not in err and "error" not in err.lower(), err


@pytest.mark.parametrize("no_color", [False, True])
def test_terminal_run_renders_and_respects_no_color(world, no_color):
    pexpect = pytest.importorskip("pexpect")
    env = ernie_env(world, TERM="xterm", **({"NO_COLOR": "1"} if no_color else {"FORCE_COLOR": "1"}))
    child = pexpect.spawn(str(ERNIE), ["describe", "cat.png", "--model", "ckpt", "-n", "6", "--temperature", "0",
                                       "--prompt", "**bold** please"], cwd=str(world), env=env, timeout=120,
                          encoding="utf-8", codec_errors="replace", dimensions=(30, 100))
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 0, out
    assert TRACEBACK not in out
    sgr = re.findall(r"\x1b\[[0-9;]*m", out)
    assert (sgr == []) if no_color else sgr, out  # colour only when allowed


def test_thinking_goes_to_stderr_never_stdout(world):
    proc = run_ernie(["describe", "cat.png", "--model", "ckpt", "--temperature", "0", "-n", "10", "--think",
                      "--thinking-budget", "4", "--jsonl"], world)
    assert proc.returncode == 0, proc.stderr_text
    events = [json.loads(line) for line in proc.stdout_text.splitlines()]
    done = events[-1]
    assert done["type"] == "done" and done["thinking"]  # the budget closed the thought; an answer followed
    assert "".join(e["text"] for e in events if e["type"] == "thinking_delta") == done["thinking"]
    plain = run_ernie(["describe", "cat.png", "--model", "ckpt", "--temperature", "0", "-n", "10", "--think",
                       "--thinking-budget", "4"], world)
    assert plain.returncode == 0, plain.stderr_text
    assert plain.stdout_text == done["text"] + "\n"
    assert done["thinking"].strip() in plain.stderr_text  # (--hide-thinking: see test_cli_render)
