"""Run the real `ernie` executable in a subprocess, isolated from the user's caches and settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ERNIE = Path(sys.executable).with_name("ernie")
TRACEBACK = "Traceback (most recent call last)"


def ernie_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: private HF cache and ERNIE_HOME, offline, no colour forcing, no ERNIE_* leaks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ERNIE_", "HF_", "NO_COLOR", "FORCE_COLOR", "PYTEST_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), ERNIE_HOME=str(tmp_path / "ernie-home"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", COLUMNS="100")
    env.update(extra)
    return env


def run_ernie(args: list[str], tmp_path: Path, *, input: bytes | str | None = None, timeout: float = 120,
              env: dict[str, str] | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """`ernie ARGS` with stdin from `input` (or /dev/null); stdout/stderr captured as text."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run([str(ERNIE), *args], input=data, stdin=None if data is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=env or ernie_env(tmp_path, **extra_env),
                          cwd=tmp_path)
    proc.stdout_text = proc.stdout.decode("utf-8", errors="replace")
    proc.stderr_text = proc.stderr.decode("utf-8", errors="replace")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit `code`, `error: ...` naming every needle, at most a hint line after it, no traceback, empty stdout."""
    err = proc.stderr_text
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{err}"
    assert TRACEBACK not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    assert proc.stdout == b"", proc.stdout
    return errors[0]
