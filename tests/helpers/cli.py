"""Run the real `ernie` executable in a subprocess, isolated from the user's caches and settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

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
    """Exit `code`, `error: ...` naming every needle, then one `hint: ...` line (README's promise for a runtime
    error, exit 1), no traceback, empty stdout."""
    err = proc.stderr_text
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{err}"
    assert TRACEBACK not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), err
    if code == 1:
        assert [line.split(":")[0] for line in lines] == ["error", "hint"], err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    assert proc.stdout == b"", proc.stdout
    return errors[0]


@dataclass
class Measured:
    """A finished child: exit code, output, wall time and its peak resident memory (wait4's ru_maxrss)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    peak_rss_mib: float

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


# Runs argv as its child and writes the child's peak RSS (KiB) to argv[1]: measured from a small
# parent, since a child of the test process would count the pytest process's own pages
# (fork copies the parent's high-water mark and exec keeps it).
_MEASURE = """import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def run_measured(argv: list[str], tmp_path: Path, *, stdin=subprocess.DEVNULL,
                 feed: Callable[[BinaryIO], None] | None = None, timeout: float = 60,
                 env: dict[str, str] | None = None, **extra_env: str) -> Measured:
    """Run argv (e.g. [str(ERNIE), ...] or ["bash", "-c", ...]) and measure it; `feed` writes its stdin
    from a thread (closing it when done). The peak RSS covers the child and the children it waited for."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        rss_file = os.path.join(scratch, "rss")
        proc = subprocess.Popen([sys.executable, "-c", _MEASURE, rss_file, *argv], stdin=subprocess.PIPE if feed else stdin,
                                stdout=out, stderr=err, cwd=tmp_path, env=env or ernie_env(tmp_path, **extra_env),
                                start_new_session=True)
        if feed:
            threading.Thread(target=_feed, args=(feed, proc.stdin), daemon=True).start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{argv} still running after {timeout} s") from None
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        with open(rss_file) as f:
            peak_kib = int(f.read())
        return Measured(proc.returncode, out.read(), err.read(), seconds, peak_kib / 1024)


def _feed(feed: Callable[[BinaryIO], None], pipe: BinaryIO) -> None:
    try:
        feed(pipe)
    except (BrokenPipeError, OSError, ValueError):  # the child stopped reading: that is the point
        pass
    finally:
        try:
            pipe.close()
        except (BrokenPipeError, OSError):
            pass
