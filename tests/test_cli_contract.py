"""The CLI's promises to scripts and hurried hands, each checked on the real `ernie` (issue 24).

Pipes that close early, `ernie rm`'s confirmation, a prompt on stdin in shell loops, ERNIE_* variables
(stop strings, booleans), one set of range bounds, conflicting flags, chat through a pipe, and the hints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cli import ERNIE, TRACEBACK, assert_one_line_error, ernie_env, run_ernie
from tests.helpers.media import encode, make_image

torch = pytest.importorskip("torch")
SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
TINY_ANSWER = "A red circle, a blue square and a green triangle."  # ernie-tiny on examples/shapes.png
ENDLESS = 100_000  # new tokens: far more than arrive before the reader leaves


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint with room for ENDLESS new tokens, and a picture, in one directory."""
    from model.config import tiny
    from tests.helpers.checkpoints import make_checkpoint_from_ours, random_state
    from tests.helpers.tokenizer import make_tiny_processor_dir

    root = tmp_path_factory.mktemp("contract")
    config = tiny(max_position_embeddings=ENDLESS + 4096)
    make_checkpoint_from_ours(root / "ckpt", random_state(config, seed=7), config, layout="baidu")
    make_tiny_processor_dir(root / "ckpt", image_kwargs=dict(max_pixels=28 * 28 * 16))
    (root / "cat.png").write_bytes(encode(make_image("RGB", 64, 48), "PNG"))
    return root


def _shell(script: str, cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """`bash -c script` with `ernie` on PATH; stdout/stderr as text."""
    full = ernie_env(cwd, **env)
    full["PATH"] = f"{ERNIE.parent}{os.pathsep}{full.get('PATH', '')}"
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=full, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    proc.stdout_text, proc.stderr_text = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def _quiet_end(proc, rc: int) -> None:
    assert rc == 0, f"exit {rc}; stderr:\n{proc.stderr_text}"
    for bad in ("terminate called", TRACEBACK, "Broken pipe", "BrokenPipe", "error"):
        assert bad.lower() not in proc.stderr_text.lower(), proc.stderr_text


# --- 1. pipes that close early ----------------------------------------------------------------------

ENDLESS_ARGS = f"--model ckpt --temperature 0 -n {ENDLESS}"


@pytest.mark.parametrize("pipeline", [
    f"ernie describe cat.png {ENDLESS_ARGS} --jsonl | head -1",
    f"ernie describe cat.png {ENDLESS_ARGS} | head -c 5",
    f"ernie describe cat.png {ENDLESS_ARGS} | true",
    f"ernie describe cat.png {ENDLESS_ARGS} --jsonl | true",
    f"printf 'hello\\nagain\\n' | ernie chat {ENDLESS_ARGS} | head -c 5",
])
def test_a_reader_that_leaves_early_ends_ernie_quietly_with_exit_0(world, pipeline):
    """README: `ernie ... | head -1` ends quietly. The answer is still streaming when the reader goes."""
    proc = _shell(f'{pipeline}; echo "rc=${{PIPESTATUS[0]}}" >&2', world)
    rc = int(re.search(r"rc=(\d+)", proc.stderr_text).group(1))
    proc.stderr_text = proc.stderr_text.replace(f"rc={rc}", "")
    _quiet_end(proc, rc)
    if "head -1" in pipeline:
        assert json.loads(proc.stdout_text)["type"] == "delta"


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--jsonl"]])
def test_stdout_closed_before_the_answer_ends_quietly(fmt):
    """`ernie-tiny ... --json | true`: the reader is gone before the one JSON object is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([str(ERNIE), "describe", str(SHAPES), "--model", "ernie-tiny", *fmt], stdout=write,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ernie_env(SHAPES.parent),
                              timeout=120)
    finally:
        os.close(write)
    proc.stderr_text = proc.stderr.decode(errors="replace")
    _quiet_end(proc, proc.returncode)


# --- 2. ernie rm asks, and a no is a no --------------------------------------------------------------

def _cached(tmp_path: Path, repo: str = "acme/tiny") -> Path:
    from tests.test_cli_models import _fake_cached_repo

    return _fake_cached_repo(tmp_path / "hf", repo, {"config.json": b"{}", "model.safetensors": b"x" * 1000})


@pytest.mark.parametrize("answer", ["n\n", "no\n", "whatever\n", "\n"])
def test_rm_keeps_the_model_on_a_piped_no(tmp_path, answer):
    root = _cached(tmp_path)
    proc = run_ernie(["rm", "acme/tiny"], tmp_path, input=answer)
    assert proc.returncode == 1, proc.stderr_text
    assert "nothing was removed" in proc.stderr_text and "removed acme/tiny" not in proc.stderr_text
    assert root.exists()


def test_rm_without_an_answer_removes_nothing(tmp_path):
    root = _cached(tmp_path)
    proc = run_ernie(["rm", "acme/tiny"], tmp_path)  # stdin is /dev/null: no answer
    assert proc.returncode == 1 and root.exists()
    assert "error: " in proc.stderr_text and "hint: " in proc.stderr_text and "--yes" in proc.stderr_text


@pytest.mark.parametrize("how", [dict(input="y\n"), dict(input="YES\n"), dict(args=["--yes"]), dict(args=["-y"])])
def test_rm_removes_on_yes(tmp_path, how):
    root = _cached(tmp_path)
    proc = run_ernie(["rm", "acme/tiny", *how.get("args", [])], tmp_path, input=how.get("input"))
    assert proc.returncode == 0, proc.stderr_text
    assert "removed acme/tiny" in proc.stderr_text and not root.exists()


def test_rm_in_a_terminal_says_nothing_was_removed_on_n(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    root = _cached(tmp_path)
    child = pexpect.spawn(str(ERNIE), ["rm", "acme/tiny"], cwd=str(tmp_path), env=ernie_env(tmp_path, TERM="xterm"),
                          encoding="utf-8", timeout=60)
    child.expect_exact("[y/N]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "nothing was removed" in child.before and root.exists()


# --- 3. a device that is not there ---------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_missing_device_is_one_error_with_a_hint(device):
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    proc = run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny", "--device", device], SHAPES.parent)
    assert_one_line_error(proc, device)


# --- 4. chat through a pipe: slash commands as in the REPL -------------------------------------------

@pytest.mark.parametrize("leave", ["/exit", "/QUIT"])
def test_piped_chat_stops_at_exit(leave):
    proc = run_ernie(["chat", str(SHAPES), "--model", "ernie-tiny"], SHAPES.parent,
                     input=f"{leave}\nDescribe this image.\n")
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == ""


def test_piped_chat_takes_multi_line_blocks_and_commands(tmp_path):
    script = '/image {img}\n"""\nDescribe\nthis image.\n"""\n/save {out}\n/exit\nnever sent\n'
    proc = run_ernie(["chat", "--model", "ernie-tiny"], tmp_path,
                     input=script.format(img=SHAPES, out=tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == TINY_ANSWER + "\n"
    messages = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["text"] == "Describe\nthis image."


# --- 5. a prompt on stdin, and shell loops -----------------------------------------------------------

def test_a_while_read_loop_over_a_file_runs_once_per_line(tmp_path):
    (tmp_path / "list.txt").write_text(f"{SHAPES}\n{SHAPES}\n{SHAPES}\n")
    proc = _shell('while read f; do ernie describe "$f" --model ernie-tiny --json; done < list.txt', tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    answers = [json.loads(line)["text"] for line in proc.stdout_text.splitlines()]
    assert answers == [TINY_ANSWER] * 3  # the first call did not eat the list (nor take it as its prompt)


def test_a_prompt_from_a_pipe_or_a_whole_file_is_used(tmp_path):
    question = "What colour is the circle on the left?"
    (tmp_path / "q.txt").write_text(question + "\n")
    base = f"ernie describe {shlex.quote(str(SHAPES))} --model ernie-tiny --json"
    piped = _shell(f"echo '{question}' | {base}", tmp_path)
    from_file = _shell(f"{base} < q.txt", tmp_path)
    default = _shell(f"{base} < /dev/null", tmp_path)
    tokens = lambda p: json.loads(p.stdout_text)["usage"]["prompt_tokens"]
    assert all(p.returncode == 0 for p in (piped, default, from_file)), piped.stderr_text + from_file.stderr_text
    assert tokens(piped) == tokens(from_file) > tokens(default)  # both read the question; /dev/null: the default


def test_a_silent_pipe_is_not_a_silent_wait(tmp_path):
    start = time.monotonic()
    proc = _shell(f"sleep 4 | ernie describe {shlex.quote(str(SHAPES))} --model ernie-tiny", tmp_path)
    assert proc.returncode == 0, proc.stderr_text
    assert "waiting for the prompt on stdin" in proc.stderr_text and "-p" in proc.stderr_text
    assert proc.stdout_text == TINY_ANSWER + "\n"  # nothing came: the default prompt
    assert time.monotonic() - start >= 4


# --- 6. stop strings with spaces through the environment ---------------------------------------------

def test_ernie_stop_holds_one_stop_string_per_line():
    run = lambda stop: run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny"], SHAPES.parent, ERNIE_STOP=stop)
    assert run("a green").stdout_text == "A red circle, a blue square and \n"  # not cut at "a"
    assert run("green triangle\nblue").stdout_text == "A red circle, a \n"  # two strings: the first one met
    assert run_ernie(["describe", "--help"], SHAPES.parent, COLUMNS="200").stdout_text.count("one stop string per line")


# --- 7. one set of bounds, checked before anything loads ---------------------------------------------

@pytest.mark.parametrize("flag,value", [("--fps", "0"), ("--repetition-penalty", "0"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--temperature", "-0.1"), ("--max-new-tokens", "0"),
                                        ("--thinking-budget", "0"), ("--min-p", "2"), ("--top-k", "-1"),
                                        ("--max-frames", "1"), ("--max-pixels", "10"), ("--temperature", "nan")])
def test_out_of_range_flags_are_usage_errors_before_loading(tmp_path, flag, value):
    proc = run_ernie(["describe", "missing.png", "--model", "nosuch/model", flag, value], tmp_path)
    assert proc.returncode == 2, proc.stderr_text  # not 1 from the missing file or model: nothing was looked at
    assert flag in proc.stderr_text and TRACEBACK not in proc.stderr_text


def test_out_of_range_env_vars_are_usage_errors(tmp_path):
    proc = run_ernie(["describe", "missing.png"], tmp_path, ERNIE_FPS="0")
    assert proc.returncode == 2 and "ERNIE_FPS" in proc.stderr_text


def test_chat_set_refuses_out_of_range_values_and_keeps_the_old_ones():
    lines = ["/set top_p=5", "/set temperature=-1", "/set max_new_tokens=0", "/set thinking_budget=0",
             "/set repetition_penalty=0 top_k=2", "Describe this image."]
    proc = run_ernie(["chat", str(SHAPES), "--model", "ernie-tiny"], SHAPES.parent, input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == TINY_ANSWER + "\n"  # the message after the refusals is answered as before
    assert proc.stderr_text.count("settings unchanged") == 5
    for needle in ("top_p must be in (0, 1], got 5", "temperature must be at least 0", "max_new_tokens must be at "
                   "least 1", "thinking_budget must be at least 1", "repetition_penalty must be greater than 0"):
        assert needle in proc.stderr_text


# --- 8 and 9. chat: a failed turn keeps its picture; /save stores absolute paths --------------------

def test_a_failed_turn_keeps_the_attachment_for_the_retry(world):
    script = "/image cat.png\nfirst try\n/set max_new_tokens=2\nsecond try\n/save t.json\n"
    proc = run_ernie(["chat", "--model", "ckpt", "--temperature", "0", "-n", str(ENDLESS + 4096)], world,
                     input=script)
    assert proc.returncode == 0, proc.stderr_text
    assert "context" in proc.stderr_text  # the first try was over the context
    messages = json.loads((world / "t.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["text"] == "second try"
    assert messages[0]["content"][1] == {"type": "image", "image": str(world / "cat.png")}


def test_a_saved_chat_loads_from_another_directory(world, tmp_path):
    saved = tmp_path / "t.json"
    first = run_ernie(["chat", "--model", str(world / "ckpt"), "-n", "2"], world,
                      input=f"/image cat.png\nhello\n/save {saved}\n")
    assert first.returncode == 0, first.stderr_text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    second = run_ernie(["chat", "--model", str(world / "ckpt"), "-n", "2"], elsewhere,
                       input=f"/load {saved}\nagain\n")
    assert second.returncode == 0, second.stderr_text
    assert "loaded 2 messages" in second.stderr_text and "error" not in second.stderr_text


# --- 10. conflicting flags: one rule -----------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--prompt-file", "q.txt", "-p", "x"], "--prompt and --prompt-file"),
    (["--system-file", "q.txt", "--system", "x"], "--system and --system-file"),
    (["--json", "--jsonl"], "--json and --jsonl"),
    (["-q", "-v"], "--quiet and --verbose"),
])
def test_conflicting_flags_are_usage_errors(tmp_path, args, needle):
    (tmp_path / "q.txt").write_text("hi")
    proc = run_ernie(["describe", "missing.png", *args], tmp_path)
    assert proc.returncode == 2, proc.stderr_text
    assert needle in proc.stderr_text and "cannot be used together" in proc.stderr_text


def test_chat_refuses_conflicting_flags_too(tmp_path):
    proc = run_ernie(["chat", "-q", "--verbose"], tmp_path)
    assert proc.returncode == 2 and "--quiet and --verbose" in proc.stderr_text


def test_the_command_line_wins_over_a_conflicting_env_var(tmp_path):
    proc = run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny", "--json"], tmp_path, ERNIE_JSONL="1",
                     ERNIE_VERBOSE="1")
    assert proc.returncode == 0, proc.stderr_text
    assert json.loads(proc.stdout_text)["text"] == TINY_ANSWER  # one JSON object, not JSON lines
    both = run_ernie(["describe", "missing.png"], tmp_path, ERNIE_JSON="1", ERNIE_JSONL="1")
    assert both.returncode == 2 and "ERNIE_JSON" in both.stderr_text


# --- 11. boolean env vars: 0 means off -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "off", ""])
def test_skip_memory_check_set_to_off_still_checks(value):
    proc = run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny", "--device", "cpu"], SHAPES.parent,
                     ERNIE_SKIP_MEMORY_CHECK=value, ERNIE_FREE_MEMORY_BYTES="1000")
    assert_one_line_error(proc, "not enough memory")


def test_skip_memory_check_set_to_on_skips_it():
    proc = run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny", "--device", "cpu"], SHAPES.parent,
                     ERNIE_SKIP_MEMORY_CHECK="yes", ERNIE_FREE_MEMORY_BYTES="1000")
    assert proc.returncode == 0 and proc.stdout_text == TINY_ANSWER + "\n", proc.stderr_text


@pytest.mark.parametrize("env,coloured", [({"FORCE_COLOR": "0"}, False), ({"FORCE_COLOR": "1"}, True),
                                          ({"NO_COLOR": "1"}, False), ({"NO_COLOR": "false"}, True)])
def test_colour_variables_read_as_booleans(tmp_path, env, coloured):
    """Colour goes to a terminal's stderr (the `error:` line is red) as FORCE_COLOR / NO_COLOR say."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(str(ERNIE), ["chat", "--model", "ernie-tiny"], cwd=str(tmp_path),
                          env=ernie_env(tmp_path, TERM="xterm", **env), encoding="utf-8", timeout=60)
    child.expect_exact(">>> ")
    child.sendline("/nosuchcommand")
    child.expect_exact(">>> ")
    out = child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert "unknown command" in out
    assert bool(re.search(r"\x1b\[[0-9;]*m", out)) == coloured, repr(out)


# --- 12 and 13. hints: every runtime error has one, offline hints fit the situation -----------------

def test_a_directory_without_config_json_has_a_hint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cat.png").write_bytes(encode(make_image("RGB", 32, 32), "PNG"))
    for args in (["describe", "cat.png", "--model", "empty"], ["info", "empty"]):
        assert_one_line_error(run_ernie(args, tmp_path), "config.json")  # (it requires the hint line)


def test_offline_hints_name_what_is_actually_offline(tmp_path):
    closed = dict(HF_HUB_OFFLINE="", HF_ENDPOINT="http://127.0.0.1:9")  # online, but nothing answers
    pull = run_ernie(["pull", "acme/nothing"], tmp_path, **closed)
    assert_one_line_error(pull, "acme/nothing")
    assert "HF_HUB_OFFLINE" not in pull.stderr_text
    info = run_ernie(["info", "acme/nothing", "--offline"], tmp_path, **closed)
    assert_one_line_error(info, "acme/nothing")
    assert "HF_HUB_OFFLINE" not in info.stderr_text and "--offline" in info.stderr_text.split("hint:")[1]
    load = run_ernie(["describe", str(SHAPES), "--model", "acme/nothing", "--offline"], tmp_path, **closed)
    assert_one_line_error(load, "acme/nothing")
    assert "HF_HUB_OFFLINE" not in load.stderr_text and "--offline" in load.stderr_text.split("hint:")[1]
    env_off = run_ernie(["pull", "acme/nothing"], tmp_path, HF_HUB_OFFLINE="1")
    assert "unset HF_HUB_OFFLINE" in env_off.stderr_text.split("hint:")[1]


# --- 14. what the docs say about ernie-tiny ----------------------------------------------------------

def test_ernie_tiny_docs_match_its_config_and_a_real_run():
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "ernie-tiny.md").read_text()
    assets = root / "ernie_cli" / "assets" / "ernie-tiny"
    image = json.loads((assets / "preprocessor_config.json").read_text())["size"]
    video = json.loads((assets / "video_preprocessor_config.json").read_text())["size"]
    bullets = " ".join(doc.split()).split(" - ")  # markdown list items, each on one line
    line = next(b for b in bullets if b.startswith("images:"))
    assert f"both {image['shortest_edge']:,} pixels" in line and image["shortest_edge"] == image["longest_edge"], line
    vline = next(b for b in bullets if b.startswith("videos:"))
    assert f"both {video['shortest_edge']:,} pixels" in vline and video["shortest_edge"] == video["longest_edge"], vline
    proc = run_ernie(["describe", str(SHAPES), "--model", "ernie-tiny", "--json"], root)
    shapes = json.loads(proc.stdout_text)["media"][0]
    t, h, w = shapes["grid"]
    assert f"becomes {w * 14}x{h * 14} pixels, {shapes['tokens']} tokens" in line, line

    models = json.loads(run_ernie(["models", "--json"], root).stdout_text)
    from ernie_cli.modelinfo import human_bytes

    size = human_bytes(next(r for r in models if r["name"] == "ernie-tiny")["size_bytes"])
    assert f"`ernie-tiny` ({size}" in (root / "README.md").read_text()
