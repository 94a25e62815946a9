"""The `--server` client against recorded vLLM answers (tests/fixtures/vllm), replayed by a local HTTP server.

The real `ernie` executable talks to it; the server records what the client sent, so the request's
wire form (data: URLs, video_url, stream_options, chat_template_kwargs) is checked too.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers.cli import TRACEBACK, assert_one_line_error, run_ernie

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = "baidu/ERNIE-4.5-VL-28B-A3B-PT"
REASONING = "The user wants a description of the picture. I see a red circle, a blue square\n and a green triangle."
ANSWER = "The picture shows a red circle, a blue square and a green triangle on a white background."


class Replay:
    """A local stand-in for vLLM: /v1/models from models.json, chat answered with `self.answer`."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.answer: tuple[int, str, bytes] = (200, "text/event-stream", b"")
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, "application/json", (FIXTURES / "models.json").read_bytes())
                else:
                    self._send(404, "application/json", b'{"error": {"message": "Not Found"}}')

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                replay.requests.append(json.loads(body))
                replay.headers.append(dict(self.headers))
                self._send(*replay.answer)

            def _send(self, status, kind, payload):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def play(self, name: str, status: int | None = None) -> None:
        data = (FIXTURES / name).read_bytes()
        sse = name.endswith(".sse")
        self.answer = (status or 200, "text/event-stream" if sse else "application/json", data)


@pytest.fixture(scope="module")
def vllm():
    replay = Replay()
    yield replay
    replay.httpd.shutdown()


def describe(vllm, tmp_path, *args, **env):
    return run_ernie(["describe", "--server", vllm.url, *args], tmp_path, **env)


@pytest.mark.parametrize("fixture", ["stream_reasoning_content.sse", "stream_reasoning.sse"])
def test_reasoning_goes_to_stderr_and_the_answer_to_stdout(vllm, tmp_path, fixture):
    vllm.play(fixture)
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--think")
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == ANSWER + "\n"
    assert REASONING in proc.stderr_text and TRACEBACK not in proc.stderr_text
    sent = vllm.requests[-1]
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert sent["model"] == MODEL, "the model name comes from GET /v1/models"


@pytest.mark.parametrize("fixture", ["stream_reasoning_content.sse", "stream_reasoning.sse"])
def test_json_carries_text_thinking_usage_and_reason(vllm, tmp_path, fixture):
    vllm.play(fixture)
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--think", "--json")
    assert proc.returncode == 0, proc.stderr_text
    out = json.loads(proc.stdout_text)
    assert out["text"] == ANSWER and out["thinking"] == REASONING
    assert out["usage"] == {"prompt_tokens": 1183, "completion_tokens": 58}
    assert out["finish_reason"] == "stop" and out["model"] == MODEL
    assert out["media"] == [{"kind": "image", "path": str(EXAMPLES / "shapes.png"), "grid": None, "tokens": None}]
    assert proc.stderr_text == ""


def test_jsonl_streams_thinking_then_text_then_done(vllm, tmp_path):
    vllm.play("stream_reasoning.sse")
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--think", "--jsonl")
    events = [json.loads(line) for line in proc.stdout_text.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds == ["thinking_delta"] * 9 + ["delta"] * 6 + ["done"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == ANSWER == events[-1]["text"]


def test_multibyte_text_and_length_finish(vllm, tmp_path):
    vllm.play("stream_length_cjk.sse")
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--json", "-n", "16")
    out = json.loads(proc.stdout_text)
    assert out["text"] == "图片中有一个红色的圆形，一个蓝色的方形 🟦" and out["finish_reason"] == "length"
    assert out["thinking"] is None
    assert vllm.requests[-1]["max_tokens"] == 16


def test_request_wire_form(vllm, tmp_path):
    vllm.play("stream_reasoning_content.sse")
    image, video = EXAMPLES / "shapes.png", EXAMPLES / "red-circle-left-to-right.mp4"
    proc = describe(vllm, tmp_path, str(image), str(video), "-p", "What happens?", "--system", "Be brief.",
                    "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05",
                    "--repetition-penalty", "1.1", "--seed", "3", "--stop", "END", "--stop", "STOP", "--no-think",
                    "--api-key", "k-123")
    assert proc.returncode == 0, proc.stderr_text
    sent, headers = vllm.requests[-1], vllm.headers[-1]
    assert headers["Authorization"] == "Bearer k-123"
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    text, picture, clip = sent["messages"][1]["content"]
    assert text == {"type": "text", "text": "What happens?"}
    assert picture["type"] == "image_url" and picture["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(picture["image_url"]["url"].split(",", 1)[1]) == image.read_bytes()
    assert clip["type"] == "video_url" and clip["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert base64.b64decode(clip["video_url"]["url"].split(",", 1)[1]) == video.read_bytes()
    assert {k: sent[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop")} == \
        {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 3,
         "stop": ["END", "STOP"]}
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}


def test_model_flag_is_sent_as_given_and_env_selects_the_server(vllm, tmp_path):
    vllm.play("stream_reasoning.sse")
    proc = run_ernie(["describe", str(EXAMPLES / "shapes.png"), "--model", "my-served-name"], tmp_path,
                     ERNIE_SERVER=vllm.url + "/v1/")
    assert proc.returncode == 0, proc.stderr_text
    assert vllm.requests[-1]["model"] == "my-served-name"


@pytest.mark.parametrize("fixture", ["error_400.json", "error_400_legacy.json"])
def test_server_error_is_one_line_with_its_message(vllm, tmp_path, fixture):
    vllm.play(fixture, status=400)
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"))
    message = json.loads((FIXTURES / fixture).read_text())
    message = message.get("error", message)["message"]
    line = assert_one_line_error(proc, "answered 400")
    assert " ".join(message.split())[:60] in line


def test_error_mid_stream_is_one_line(vllm, tmp_path):
    vllm.play("stream_error.sse")
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--json")
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr_text
    assert "error: " in proc.stderr_text and "EngineDeadError" in proc.stderr_text


def test_unreachable_server_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_ernie(["describe", str(EXAMPLES / "shapes.png"), "--server", f"http://127.0.0.1:{port}"], tmp_path)
    assert_one_line_error(proc, "cannot reach", f"127.0.0.1:{port}")


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf"])
@pytest.mark.parametrize("command", ["describe", "chat"])
def test_a_bad_server_timeout_is_one_line(tmp_path, value, command):
    args = [command, str(EXAMPLES / "shapes.png"), "--server", "http://127.0.0.1:9"]
    proc = run_ernie(args, tmp_path, input="hello\n" if command == "chat" else None, ERNIE_SERVER_TIMEOUT=value)
    assert_one_line_error(proc, "$ERNIE_SERVER_TIMEOUT must be a positive number", repr(value))


def test_server_timeout_bounds_the_model_lookup(tmp_path):
    """A server that accepts the connection and never answers: the lookup of its model gives up
    after $ERNIE_SERVER_TIMEOUT seconds, not after a fixed 30."""
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.monotonic()
        proc = run_ernie(["describe", str(EXAMPLES / "shapes.png"), "--server", f"http://127.0.0.1:{port}"], tmp_path,
                         timeout=60, ERNIE_SERVER_TIMEOUT="1")
        elapsed = time.monotonic() - start
    assert_one_line_error(proc, f"127.0.0.1:{port}")
    assert elapsed < 20, elapsed


def test_the_status_line_names_the_server_not_the_default_model():
    from ernie_cli.settings import LoadOptions

    url = "http://gpu-box:8000/v1"
    assert LoadOptions(server=url).status_line() == f"Connecting to {url}…"
    assert LoadOptions("m", server=url).status_line() == f"Connecting to {url} (m)…"
    assert LoadOptions("ernie-tiny").status_line() == "Loading ernie-tiny…"


def test_client_refuses_a_url_it_cannot_send_to(vllm, tmp_path):
    vllm.play("stream_reasoning.sse")
    proc = run_ernie(["describe", str(EXAMPLES / "shapes.png"), "--server", vllm.url, "--server", "ftp://x"], tmp_path)
    assert_one_line_error(proc, "http(s) URL")


@pytest.mark.parametrize("command", ["describe", "chat"])
def test_a_thinking_budget_with_a_server_is_a_usage_error(vllm, tmp_path, command):
    vllm.play("stream_reasoning.sse")
    args = [str(EXAMPLES / "shapes.png")] if command == "describe" else []
    proc = run_ernie([command, *args, "--server", vllm.url, "--thinking-budget", "5"], tmp_path, input=b"hi\n")
    assert proc.returncode == 2 and TRACEBACK not in proc.stderr_text, proc.stderr_text
    assert "--thinking-budget" in proc.stderr_text and "only with a local model" in proc.stderr_text


def test_describe_with_server_does_not_import_torch(vllm, tmp_path):
    vllm.play("stream_reasoning.sse")
    code = ("import sys, runpy; sys.argv = ['ernie', 'describe', '--server', %r, %r]\n"
            "try:\n    runpy.run_module('ernie_cli.app', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
            % (vllm.url, str(EXAMPLES / "shapes.png")))
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ANSWER in proc.stdout and "NO-TORCH" in proc.stderr, proc.stderr


def test_a_server_that_ignores_stream_true_still_answers(vllm, tmp_path):
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER, "reasoning_content": "Hm."},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
    vllm.answer = (200, "application/json", json.dumps(body, indent=2).encode())
    proc = describe(vllm, tmp_path, str(EXAMPLES / "shapes.png"), "--json")
    out = json.loads(proc.stdout_text)
    assert (out["text"], out["thinking"], out["finish_reason"]) == (ANSWER, "Hm.", "length")
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 7}
