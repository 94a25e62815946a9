"""`ernie chat` in a real pseudo-terminal (pexpect) and with piped stdin, on a tiny random checkpoint."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.cli import ERNIE, TRACEBACK, ernie_env, run_ernie
from tests.helpers.media import encode, make_image

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("torch")
PROMPT = ">>> "
# an answer this long takes minutes even at thousands of tokens per second: still streaming when Ctrl-C comes
LONG_ANSWER = 100_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from model.config import tiny
    from tests.helpers.checkpoints import make_checkpoint_from_ours, random_state
    from tests.helpers.tokenizer import make_tiny_processor_dir

    root = tmp_path_factory.mktemp("chat")
    config = tiny(max_position_embeddings=LONG_ANSWER + 4096)  # room for LONG_ANSWER after the prompt
    make_checkpoint_from_ours(root / "ckpt", random_state(config, seed=5), config, layout="baidu")
    make_tiny_processor_dir(root / "ckpt", image_kwargs=dict(max_pixels=28 * 28 * 16))
    (root / "cat.png").write_bytes(encode(make_image("RGB", 64, 48), "PNG"))
    return root


def _spawn(world, *args):
    child = pexpect.spawn(str(ERNIE), ["chat", "--model", "ckpt", "--temperature", "0", *args], cwd=str(world),
                          env=ernie_env(world, TERM="xterm"), encoding="utf-8", codec_errors="replace", timeout=90,
                          dimensions=(40, 120))
    child.expect_exact(PROMPT)
    return child


def _command(child, line: str, needle: str) -> None:
    child.sendline(line)
    child.expect_exact(needle)
    child.expect_exact(PROMPT)


def test_repl_commands_interrupt_save_load(world):
    child = _spawn(world, "-n", "4")
    _command(child, "/help", "/regen")
    _command(child, "/image cat.png", "attached image")
    _command(child, "/image nothere.png", "no such file")  # an error keeps the session
    child.sendline("hello")
    child.expect_exact(PROMPT)
    _command(child, "/stats", "prompt +")
    # multi-line message
    child.sendline('"""')
    child.sendline("line one")
    child.sendline('line two"""')
    child.expect_exact(PROMPT)
    # a long answer, stopped with Ctrl-C: the session survives and keeps what was generated
    _command(child, f"/set max_new_tokens={LONG_ANSWER}", f"max_new_tokens={LONG_ANSWER}")
    child.sendline("tell me everything")
    child.expect_exact("tell me everything")  # the terminal's echo
    time.sleep(3)  # let the answer start
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    _command(child, "/save t.json", "saved 6 messages")
    saved = json.loads((world / "t.json").read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert saved["messages"][0]["content"][1] == {"type": "image", "image": str(world / "cat.png")}  # absolute
    assert saved["messages"][2]["content"][0]["text"] == "line one\nline two"
    assert saved["messages"][5]["content"][0]["text"] != ""  # the partial answer
    assert saved["settings"]["max_new_tokens"] == LONG_ANSWER
    _command(child, "/set max_new_tokens=4", "max_new_tokens=4")
    _command(child, "/undo", "removed the last exchange")
    child.sendline("/regen")
    child.expect_exact(PROMPT)
    _command(child, "/save t3.json", "saved 4 messages")
    regen = json.loads((world / "t3.json").read_text())["messages"]
    assert regen[:3] == saved["messages"][:3]  # same history; the last answer was made again
    _command(child, "/clear", "conversation cleared")
    _command(child, "/load t.json", "loaded 6 messages")
    _command(child, "/save t2.json", "saved 6 messages")
    assert json.loads((world / "t2.json").read_text())["messages"] == saved["messages"]
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert TRACEBACK not in child.before
    history = (world / "ernie-home" / "history").read_text()
    assert "hello" in history and "/save t.json" in history


def test_ctrl_c_twice_at_the_prompt_exits_130(world):
    child = _spawn(world, "-n", "2")
    child.sendintr()
    child.expect_exact("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, (child.exitstatus, child.signalstatus)
    assert TRACEBACK not in (child.before or "")


def test_piped_chat_answers_one_line_at_a_time(world):
    proc = run_ernie(["chat", "--model", "ckpt", "--temperature", "0", "-n", "3"], world,
                     input="hello\n/set top_k=5\n\nagain\n")
    assert proc.returncode == 0, proc.stderr_text
    assert "\x1b" not in proc.stdout_text
    assert len(proc.stdout_text.splitlines()) >= 2  # two answers, each newline-terminated
    assert proc.stdout_text.endswith("\n")
    assert "top_k=5" in proc.stderr_text and "top_k=5" not in proc.stdout_text
