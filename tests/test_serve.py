"""`ernie serve` as a real process on 127.0.0.1, spoken to over HTTP.

ernie-tiny answers the examples/ pictures and clips; greedy answers must equal `ernie describe`'s,
streamed chunks must add up to the whole answer, concurrent requests (decoded together in
batches) must each equal their answer alone, and every bad request gets its status and an
OpenAI-shaped JSON error while the server keeps serving.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.helpers.cli import TRACEBACK, assert_one_line_error, run_ernie  # noqa: E402
from tests.helpers.media import encode, make_image, png_with_declared_size  # noqa: E402
from tests.helpers.server import Served, connection, data_url, request, sse_payloads, stream, user, wait_until  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "sekrit-key"
IMAGE = EXAMPLES / "shapes.png"
VIDEO = EXAMPLES / "red-circle-left-to-right.mp4"
VIDEO2 = EXAMPLES / "blue-square-top-to-bottom.mp4"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve")
    server = Served(cwd, "--model", "ernie-tiny", "--api-key", KEY, "--max-request-mb", "1")
    yield server
    assert server.stop() == 0, "".join(server.log)
    assert TRACEBACK not in "".join(server.log), "".join(server.log)


def chat(served, *messages, **fields):
    return request(served, "POST", "/v1/chat/completions", {"model": "ernie-tiny", "messages": list(messages),
                                                             **fields}, key=KEY)


def answer(served, *messages, **fields) -> str:
    status, body = chat(served, *messages, **fields)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def image_message(prompt="Describe this image.", path=IMAGE):
    return user(prompt, ("image", data_url(path, "image/png")))


def video_message(prompt="Describe this video.", path=VIDEO):
    return user(prompt, ("video", data_url(path, "video/mp4")))


# --- routes -----------------------------------------------------------------------------------------

def test_health_needs_no_key_and_models_lists_the_model(served):
    assert request(served, "GET", "/health")[0] == 200
    status, body = request(served, "GET", "/v1/models", key=KEY)
    assert status == 200 and [m["id"] for m in body["data"]] == ["ernie-tiny"]
    assert body["object"] == "list" and body["data"][0]["object"] == "model"


def test_binds_loopback_only(served):
    assert served.url.startswith("http://127.0.0.1:")
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in list(addresses)[:1]:  # another interface of this machine must not answer
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, served.port)) != 0


# --- answers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, kind, mime", [(IMAGE, "image", "image/png"), (VIDEO, "video", "video/mp4")])
def test_greedy_answer_equals_describe(served, tmp_path, path, kind, mime):
    local = run_ernie(["describe", str(path), "--model", "ernie-tiny", "--json"], tmp_path)
    assert local.returncode == 0, local.stderr_text
    expected = json.loads(local.stdout_text)
    prompt = "Describe this image." if kind == "image" else "Describe this video."
    status, body = chat(served, user(prompt, (kind, data_url(path, mime))))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["message"]["content"] == expected["text"] != ""
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "ernie-tiny"


def test_stream_adds_up_to_the_answer_with_usage_last(served):
    whole = answer(served, video_message(path=VIDEO2))
    status, events = stream(served, {"model": "ernie-tiny", "messages": [video_message(path=VIDEO2)],
                                     "stream_options": {"include_usage": True}}, key=KEY)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole and len(chunks) > 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_field(served):
    status, events = stream(served, {"messages": [image_message()], "max_tokens": 3}, key=KEY)
    assert status == 200 and events[-1] == "[DONE]"
    assert all("usage" not in c for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_settings_are_honoured(served):
    full = answer(served, image_message())
    short = chat(served, image_message(), max_completion_tokens=2)[1]
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    assert full.startswith(short["choices"][0]["message"]["content"])
    word = full.split()[2]
    stopped = answer(served, image_message(), stop=[word])
    assert stopped == full[:full.index(word)]
    seeded = [answer(served, image_message(), temperature=1.5, top_p=0.9, top_k=50, min_p=0.01, seed=7,
                     repetition_penalty=1.1, max_tokens=12) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_thinking_comes_back_in_reasoning_content(served):
    status, body = chat(served, image_message(), chat_template_kwargs={"enable_thinking": True}, max_tokens=12)
    assert status == 200
    message = body["choices"][0]["message"]
    status, events = stream(served, {"messages": [image_message()], "max_tokens": 12,
                                     "chat_template_kwargs": {"enable_thinking": True}}, key=KEY)
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (message["reasoning_content"] or "")
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    assert message["reasoning_content"], "ernie-tiny given <think> writes some reasoning within 12 tokens"


def test_http_media_urls_are_fetched(served):
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(EXAMPLES)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/{VIDEO.name}"
        assert answer(served, user("Describe this video.", ("video", url))) == answer(served, video_message())
        status, payload = chat(served, user("Describe this video.", ("video", url + ".missing")))
        assert status == 400 and "404" in payload["error"]["message"]
    finally:
        files.shutdown()


def test_history_and_system_prompt(served):
    first = answer(served, image_message())
    second = answer(served, {"role": "system", "content": "You are terse."}, image_message(),
                    {"role": "assistant", "content": first}, {"role": "user", "content": "What colour is the circle?"})
    assert isinstance(second, str)


def test_sixteen_concurrent_requests_equal_their_answers_alone(served):
    bodies = []
    for i in range(16):
        media = [image_message, video_message][i % 2]
        prompt = ["Describe this image.", "What shapes are there?", "Describe this video.", "Which way does it move?"][i % 4]
        kw = {"path": [IMAGE, VIDEO, IMAGE, VIDEO2][i % 4]}
        bodies.append(dict(messages=[media(prompt, **kw)], max_tokens=8 + i))
    alone = [answer(served, **b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: answer(served, **b), bodies))
    assert together == alone
    assert len(set(alone)) > 2


# --- errors ---------------------------------------------------------------------------------------------

def _png_bytes_url() -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(encode(make_image("RGB", 64, 48), "PNG")).decode()


BAD = {
    "not json": (b"{not json", 400, "not valid JSON"),
    "array body": ([1, 2], 400, "JSON object"),
    "no messages": ({"model": "ernie-tiny"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    "temperature type": ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    "max_tokens zero": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens bool": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
    "n=2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    "stop type": ({"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    "thinking type": ({"messages": [{"role": "user", "content": "hi"}],
                       "chat_template_kwargs": {"enable_thinking": "yes"}}, 400, "enable_thinking"),
    "part type": ({"messages": [{"role": "user", "content": [{"type": "audio_url"}]}]}, 400, "type"),
    "file url": ({"messages": [user("hi", ("image", "file:///etc/passwd"))]}, 400, "http(s) or data"),
    "bad base64": ({"messages": [user("hi", ("image", "data:image/png;base64,@@@"))]}, 400, "base64"),
    "not an image": ({"messages": [user("hi", ("image", "data:image/png;base64,aGVsbG8gd29ybGQ="))]}, 400,
                     "not an image"),
    "bomb": ({"messages": [user("hi", ("image", "data:image/png;base64,"
                                       + __import__("base64").b64encode(png_with_declared_size(30000, 30000)).decode()))]},
             400, "pixels"),
    "image as video": ({"messages": [user("hi", ("video", _png_bytes_url()))]}, 400, "image"),
    "truncated image": ({"messages": [user("hi", ("image", "data:image/png;base64," + __import__("base64").b64encode(
        IMAGE.read_bytes()[:500]).decode()))]}, 400, "corrupt or truncated"),
    "truncated video": ({"messages": [user("hi", ("video", "data:video/mp4;base64," + __import__("base64").b64encode(
        VIDEO.read_bytes()[:3000]).decode()))]}, 400, "corrupt or truncated"),
    "over the context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400,
                         "lower max_tokens to at most"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
    "too large": ({"messages": [{"role": "user", "content": "x" * (1 << 21)}]}, 413, "over the limit"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_its_status_and_a_json_error(served, name):
    body, status, needle = BAD[name]
    got, payload = request(served, "POST", "/v1/chat/completions", body, key=KEY)
    assert got == status, payload
    error = payload["error"]
    assert needle.lower() in error["message"].lower(), error
    assert "ernie-media-" not in error["message"], error  # media are named as sent, not by a temporary copy
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("headers, needle", [({}, "missing API key"), ({"Authorization": "Bearer nope"}, "wrong API key"),
                                             ({"Authorization": "Basic " + KEY}, "missing API key")])
def test_api_key_is_enforced(served, headers, needle):
    for method, path, body in [("POST", "/v1/chat/completions", {"messages": [image_message()]}),
                               ("GET", "/v1/models", None)]:
        status, payload = request(served, method, path, body, headers=headers)
        assert status == 401 and needle in payload["error"]["message"]


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_routes_get_json_errors(served, method, path, status):
    got, payload = request(served, method, path, key=KEY)
    assert got == status and payload["error"]["message"]


def test_the_413_message_shows_small_limits():
    from ernie_cli.serve import _too_large

    message = _too_large(15_000, 10_485).message
    assert "0.0143 MB" in message and "limit of 0.01 MB" in message, message


def test_an_answer_sent_whole_does_not_wake_the_loop_per_token():
    import asyncio

    from ernie_cli.serve import _sink
    from processing.events import Finished, TextDelta, ThinkingDelta

    async def forwarded(deltas: bool) -> list:
        events: asyncio.Queue = asyncio.Queue()
        emit = _sink(asyncio.get_running_loop(), events, deltas=deltas)
        done = Finished("stop", None, "ab", None, {})
        for event in (ThinkingDelta("t"), TextDelta("a"), TextDelta("b"), done):
            emit(event)
        await asyncio.sleep(0)
        return [events.get_nowait() for _ in range(events.qsize())]

    whole = asyncio.run(forwarded(False))
    assert [type(e).__name__ for e in whole] == ["Finished"]
    streamed = asyncio.run(forwarded(True))
    assert [type(e).__name__ for e in streamed] == ["ThinkingDelta", "TextDelta", "TextDelta", "Finished"]


def test_server_keeps_serving_after_errors(served):
    for name in BAD:
        request(served, "POST", "/v1/chat/completions", BAD[name][0], key=KEY)
    # a refused request is no longer counted as on its way (a later one would be held for it)
    assert request(served, "GET", "/health")[1]["arriving"] == 0
    assert answer(served, image_message()) == "A red circle, a blue square and a green triangle."
    assert request(served, "GET", "/health")[1] == {"status": "ok", "model": "ernie-tiny", "waiting": 0,
                                                    "running": 0, "arriving": 0}


# --- a server that answers for a long time: queue limits, disconnects, SIGTERM ---------------------------

LONG = 50_000


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A random tiny checkpoint with a long context: greedy answers run to max_tokens."""
    from model.config import tiny
    from tests.helpers.checkpoints import make_checkpoint_from_ours, random_state
    from tests.helpers.tokenizer import make_tiny_processor_dir

    root = tmp_path_factory.mktemp("slow")
    config = tiny(max_position_embeddings=LONG + 4096)
    make_checkpoint_from_ours(root / "ckpt", random_state(config, seed=5), config, layout="baidu")
    make_tiny_processor_dir(root / "ckpt")
    return root


def _open_stream(served, max_tokens=LONG):
    conn = connection(served)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    payloads = sse_payloads(response)
    next(payloads)  # the role chunk: decoding has begun
    return conn, response, payloads


def test_full_queue_gets_503_and_a_disconnect_frees_the_slot(slow):
    server = Served(slow, "--model", "ckpt", "--max-batch", "1", "--queue-size", "1", "--no-media-urls")
    try:
        status, payload = request(server, "POST", "/v1/chat/completions",
                                  {"messages": [user("hi", ("image", "http://127.0.0.1:9/cat.png"))]})
        assert status == 400 and "does not fetch media URLs" in payload["error"]["message"]
        running = _open_stream(server)
        assert wait_until(lambda: request(server, "GET", "/health")[1]["running"] == 1)
        queued = threading.Thread(target=request, args=(server, "POST", "/v1/chat/completions",
                                                        {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3}))
        queued.start()
        assert wait_until(lambda: request(server, "GET", "/health")[1]["waiting"] == 1)
        status, payload = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 503 and payload["error"]["code"] == "queue_full"
        running[0].sock.shutdown(socket.SHUT_RDWR)  # the streaming client goes away mid-answer
        running[0].close()
        queued.join(60)
        assert not queued.is_alive(), "the queued request was served once the slot was freed"
        status, payload = request(server, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert status == 200 and payload["usage"]["completion_tokens"] == 2
        _ctrl_c_on_the_client_frees_the_row(server, slow)
    finally:
        assert server.stop() == 0


def _ctrl_c_on_the_client_frees_the_row(server, cwd):
    """`ernie describe --server` interrupted mid-answer: exit 130, [interrupted], and the server's row is free."""
    import subprocess

    from tests.helpers.cli import ERNIE, ernie_env

    assert wait_until(lambda: request(server, "GET", "/health")[1]["running"] == 0, timeout=30)
    client = subprocess.Popen([str(ERNIE), "describe", str(IMAGE), "--server", server.url, "-n", str(LONG)], cwd=cwd,
                              env=ernie_env(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_until(lambda: request(server, "GET", "/health")[1]["running"] == 1, timeout=60)
    time.sleep(0.5)
    client.send_signal(signal.SIGINT)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 130 and b"[interrupted]" in err and TRACEBACK.encode() not in err, err
    assert out  # the answer so far was printed
    assert wait_until(lambda: request(server, "GET", "/health")[1]["running"] == 0, timeout=30)


def test_sigterm_ends_answers_in_flight_and_exits_0(slow):
    server = Served(slow, "--model", "ckpt", "--grace", "1")
    conn, response, payloads = _open_stream(server)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rest = list(payloads)  # the stream ends (finished or cut) instead of running its 50,000 tokens
    assert server.proc.wait(30) == 0, "".join(server.log)
    assert time.monotonic() - started < 20
    assert len(rest) < LONG
    assert TRACEBACK not in "".join(server.log)
    with pytest.raises(OSError):
        request(server, "GET", "/health", timeout=5)


def test_busy_port_is_a_one_line_error_before_the_model_loads(served, tmp_path):
    proc = run_ernie(["serve", "--model", "ernie-tiny", "--port", str(served.port)], tmp_path)
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr_text
    assert "cannot listen on 127.0.0.1" in proc.stderr_text and "another server" in proc.stderr_text
    assert "Loading" not in proc.stderr_text  # a real checkpoint's load would come first otherwise


@pytest.mark.parametrize("host, hint", [("10.255.255.1", "not an address of this machine"),
                                        ("no-such-host.invalid", "no address is known for the host name")])
def test_a_host_that_cannot_be_listened_on_gets_its_own_hint(tmp_path, host, hint):
    proc = run_ernie(["serve", "--model", "ernie-tiny", "--host", host, "--port", "0"], tmp_path)
    message = assert_one_line_error(proc, f"cannot listen on {host}")
    assert hint in proc.stderr_text and "another server" not in proc.stderr_text, message


# --- the --server client against this server --------------------------------------------------------------

@pytest.mark.parametrize("args", [[str(IMAGE)], [str(VIDEO)], [str(IMAGE), str(VIDEO2), "-p", "What is there?"]])
def test_client_answers_as_describe_does(served, tmp_path, args):
    local = run_ernie(["describe", *args, "--model", "ernie-tiny", "--json"], tmp_path)
    remote = run_ernie(["describe", *args, "--server", served.url, "--api-key", KEY, "--json"], tmp_path)
    assert remote.returncode == 0, remote.stderr_text
    mine, theirs = json.loads(local.stdout_text), json.loads(remote.stdout_text)
    for key in ("text", "thinking", "finish_reason", "usage", "model"):
        assert theirs[key] == mine[key], key
    plain = run_ernie(["describe", *args, "--server", served.url], tmp_path, ERNIE_API_KEY=KEY)
    assert plain.returncode == 0 and plain.stdout_text == mine["text"] + "\n"


def test_client_jsonl_and_thinking_match_local(served, tmp_path):
    args = [str(IMAGE), "--think", "-n", "12"]
    local = run_ernie(["describe", *args, "--model", "ernie-tiny", "--jsonl"], tmp_path)
    remote = run_ernie(["describe", *args, "--server", served.url, "--api-key", KEY, "--jsonl"], tmp_path)
    events = [json.loads(line) for line in remote.stdout_text.splitlines()]
    expected = [json.loads(line) for line in local.stdout_text.splitlines()]
    assert events[-1]["thinking"] == expected[-1]["thinking"] and events[-1]["text"] == expected[-1]["text"]
    assert "".join(e["text"] for e in events if e["type"] == "thinking_delta") == expected[-1]["thinking"]
    shown = run_ernie(["describe", *args, "--server", served.url, "--api-key", KEY], tmp_path)
    plain = run_ernie(["describe", *args, "--model", "ernie-tiny"], tmp_path)
    assert expected[-1]["thinking"].strip() in shown.stderr_text
    assert (shown.stdout_text, shown.stderr_text) == (plain.stdout_text, plain.stderr_text)


def test_client_chat_keeps_the_conversation(served, tmp_path):
    lines = "Describe this image.\nWhat colour is the triangle?\n"
    local = run_ernie(["chat", str(IMAGE), "--model", "ernie-tiny"], tmp_path, input=lines)
    remote = run_ernie(["chat", str(IMAGE), "--server", served.url, "--api-key", KEY], tmp_path, input=lines)
    assert remote.returncode == 0, remote.stderr_text
    assert remote.stdout_text == local.stdout_text and len(remote.stdout_text.splitlines()) == 2


def test_client_with_a_wrong_key_says_what_the_server_said(served, tmp_path):
    proc = run_ernie(["describe", str(IMAGE), "--server", served.url, "--api-key", "nope"], tmp_path)
    line = assert_one_line_error(proc, "answered 401", "wrong API key")
    assert "--api-key" in proc.stderr_text.split(line, 1)[1]
    proc = run_ernie(["describe", str(IMAGE), "--server", served.url, "-n", "100000000"], tmp_path,
                     ERNIE_API_KEY=KEY)
    line = assert_one_line_error(proc, "answered 400", "context")
    assert "(hint:" not in line  # the server's hint becomes the client's hint line
    assert "hint: lower max_tokens" in proc.stderr_text, proc.stderr_text


def test_serve_without_the_extra_is_a_one_line_error_with_the_pip_hint(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['starlette'] = None; sys.argv = ['ernie', 'serve', '--model', 'ernie-tiny']\n"
            "from ernie_cli.app import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr
    assert proc.stderr.splitlines() == ["error: `ernie serve` needs starlette, which is not installed",
                                        "hint: pip install 'ernie-cli[serve]'"]


def test_batch_wait_is_a_serve_option_and_refuses_negative_values(tmp_path):
    from ernie_cli.serve import ServeOptions

    assert ServeOptions().batch_wait_s == 0.05
    proc = run_ernie(["serve", "--model", "ernie-tiny", "--batch-wait", "-1"], tmp_path)
    assert proc.returncode == 2 and "--batch-wait" in proc.stderr_text and TRACEBACK not in proc.stderr_text
    assert "--batch-wait" in run_ernie(["serve", "--help"], tmp_path).stdout_text


def test_what_start_up_made_is_frozen_out_of_full_collections_once_the_model_is_loaded(monkeypatch):
    import gc

    from ernie_cli import engine as engine_module
    from ernie_cli import serve as serve_module
    from ernie_cli.settings import LoadOptions, MediaOptions

    seen = {}

    class Loaded:
        def load(self, load, media):
            seen["at load"] = gc.get_freeze_count()

    class NoJobs:
        def __init__(self, *args):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(engine_module, "make_engine", lambda: Loaded())
    monkeypatch.setattr(serve_module, "Jobs", NoJobs)
    monkeypatch.setattr(serve_module, "_serve", lambda server, options, sock: (
        sock.close(), seen.setdefault("serving", gc.get_freeze_count()))[1])
    gc.unfreeze()
    try:
        serve_module.run_serve(LoadOptions(model="ernie-tiny"), MediaOptions(), serve_module.ServeOptions(port=0))
    finally:
        gc.unfreeze()
    assert seen["at load"] == 0 and seen["serving"] > 1000, seen


def test_verbose_request_lines_go_to_stderr_and_stdout_stays_empty(tmp_path):
    server = Served(tmp_path, "--model", "ernie-tiny", "-v")
    try:
        status, _ = request(server, "GET", "/health")
        assert status == 200
        assert wait_until(lambda: any("GET /health" in line for line in server.log), 10), "".join(server.log)
    finally:
        assert server.stop() == 0
    assert server.proc.stdout.read() == b""
