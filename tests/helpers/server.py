"""A real `ernie serve` process on 127.0.0.1 (a free port), and a small HTTP client for tests."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.helpers.cli import ERNIE, ernie_env


class Served:
    """`ernie serve ARGS --port 0`; `url` is its base (http://127.0.0.1:PORT), `log` its stderr lines."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None, timeout: float = 180):
        self.proc = subprocess.Popen([str(ERNIE), "serve", "--port", "0", *args], cwd=cwd, env=env or ernie_env(cwd),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.log: list[str] = []
        self.url = ""
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.proc.kill()
            raise RuntimeError("ernie serve did not start:\n" + "".join(self.log))

    def _drain(self, ready: threading.Event) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", errors="replace")
            self.log.append(line)
            if line.startswith("ernie serve: ") and " at http://" in line:
                self.url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
                ready.set()
        ready.set()

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def connection(served: Served, timeout: float = 120) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", served.port, timeout=timeout)


def request(served: Served, method: str, path: str, body=None, key: str | None = None,
            headers: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
    """One request; the answer parsed as JSON when it is JSON."""
    conn = connection(served, timeout)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={**_headers(key), **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        return response.status, json.loads(raw)
    except json.JSONDecodeError:
        return response.status, raw.decode("utf-8", errors="replace")


def stream(served: Served, body: dict, key: str | None = None) -> tuple[int, list]:
    """A streamed chat: the decoded `data:` payloads in order ('[DONE]' kept as a string)."""
    conn = connection(served)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}), headers=_headers(key))
    response = conn.getresponse()
    events = [json.loads(p) if p != "[DONE]" else p for p in sse_payloads(response)] if response.status == 200 \
        else [json.loads(response.read())]
    conn.close()
    return response.status, events


def sse_payloads(response):
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            yield line[6:]


def _headers(key: str | None) -> dict:
    out = {"Content-Type": "application/json"}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def user(text: str, *media: tuple[str, str]) -> dict:
    """A user message: text, then (kind, url) media parts."""
    parts = [{"type": "text", "text": text}] + [{"type": f"{k}_url", f"{k}_url": {"url": u}} for k, u in media]
    return {"role": "user", "content": parts}


def wait_until(predicate, timeout: float = 30, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
