"""`ernie` as a process: --help/--version fast and torch-free, usage errors, env vars, the error boundary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers.cli import ERNIE, TRACEBACK, assert_one_line_error, ernie_env, run_ernie

DESCRIBE_FLAGS = ["--prompt", "--prompt-file", "--model", "--revision", "--device", "--dtype", "--offline",
                  "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty",
                  "--seed", "--stop", "--system", "--system-file", "--think", "--thinking-budget", "--hide-thinking",
                  "--fps", "--max-frames", "--no-timestamps", "--max-pixels", "--quiet", "--verbose", "--json",
                  "--jsonl"]


def _imported_modules(args: list[str], tmp_path) -> set[str]:
    code = f"import sys; sys.argv = ['ernie', *{args!r}]; from ernie_cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          env=ernie_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["describe", "--help"], ["chat", "--help"],
                                  ["serve", "--help"]])
def test_help_and_version_never_import_torch(args, tmp_path):
    modules = _imported_modules(args, tmp_path)
    assert "typer" in modules  # the measurement works
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "transformers", "numpy", "PIL", "av", "cv2",
                                                       "starlette", "uvicorn")}
    assert not heavy, sorted(heavy)[:10]


def test_help_and_version_are_fast(tmp_path):
    run_ernie(["--version"], tmp_path)  # warm the file cache
    start = time.perf_counter()
    proc = run_ernie(["--help"], tmp_path)
    assert time.perf_counter() - start < 1.5
    assert proc.returncode == 0 and "describe" in proc.stdout_text and "chat" in proc.stdout_text
    version = run_ernie(["--version"], tmp_path)
    assert version.returncode == 0 and re.fullmatch(r"ernie \d+\.\d+\.\d+\n", version.stdout_text)
    assert version.stderr == b""


def test_every_describe_flag_is_documented_with_its_env_var(tmp_path):
    proc = run_ernie(["describe", "--help"], tmp_path, COLUMNS="200")
    text = proc.stdout_text
    for flag in DESCRIBE_FLAGS:
        assert flag in text, flag
    for flag in DESCRIBE_FLAGS:
        env = "ERNIE_" + flag.lstrip("-").replace("-", "_").upper()
        assert env in text or flag == "--think", env
    assert "ERNIE_THINK" in text


@pytest.mark.parametrize("args", [
    ["describe"],  # no media
    ["describe", "x.png", "--temperature", "-1"],
    ["describe", "x.png", "--device", "tpu"],
    ["describe", "x.png", "--no-such-flag"],
    ["nosuchcommand"],
])
def test_usage_errors_exit_2_without_traceback(args, tmp_path):
    proc = run_ernie(args, tmp_path)
    assert proc.returncode == 2, proc.stderr_text
    assert TRACEBACK not in proc.stderr_text
    assert proc.stdout == b""


def test_env_var_reaches_the_flag(tmp_path):
    bad = run_ernie(["describe", "x.png"], tmp_path, ERNIE_TOP_P="2.5")  # outside [0, 1]: usage error
    assert bad.returncode == 2 and "ERNIE_TOP_P" in bad.stderr_text
    ok = run_ernie(["describe", "x.png"], tmp_path, ERNIE_TOP_P="0.5")  # valid: gets past parsing to the media check
    assert_one_line_error(ok, "x.png")


def test_model_env_var_picks_the_model(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    proc = run_ernie(["describe", "a.png"], tmp_path, ERNIE_MODEL="nosuchowner/nosuchmodel")
    assert_one_line_error(proc, "nosuchowner/nosuchmodel")


def test_debug_env_reraises_with_traceback(tmp_path):
    proc = run_ernie(["describe", "missing.png"], tmp_path, ERNIE_DEBUG="1")
    assert proc.returncode == 1
    assert TRACEBACK in proc.stderr_text and "MediaError" in proc.stderr_text


def test_broken_pipe_is_quiet(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before ernie writes: every write hits EPIPE
    try:
        proc = subprocess.run([str(ERNIE), "--help"], stdout=write, stderr=subprocess.PIPE, env=ernie_env(tmp_path),
                              stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr.decode() == "", proc.stderr.decode()
    assert proc.returncode in (0, 1, 141)


def test_completion_is_offered(tmp_path):
    proc = run_ernie(["--help"], tmp_path)
    assert "--install-completion" in proc.stdout_text


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()
