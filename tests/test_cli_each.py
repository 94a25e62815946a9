"""`ernie describe --each` end to end: the real executable on ernie-tiny over generated scenes.

Single answers come from the engine in-process (the code path of `ernie describe FILE`), and one
real `ernie describe` process ties the two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cli import ERNIE, TRACEBACK, ernie_env, run_ernie
from tests.helpers.media import png_with_declared_size
from tests.test_ernie_tiny import shapes

torch = pytest.importorskip("torch")
N_SCENES = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Scenes scene0.png.., a text file named .png, a truncated PNG, a decompression bomb."""
    import random

    root = tmp_path_factory.mktemp("each")
    rng = random.Random(5)
    for i in range(N_SCENES):
        shapes.render(shapes.random_scene(rng)).save(root / f"scene{i}.png")
    (root / "notes.png").write_text("not a picture\n")
    (root / "cut.png").write_bytes((root / "scene0.png").read_bytes()[:200])
    (root / "bomb.png").write_bytes(png_with_declared_size(30000, 30000))
    return root


@pytest.fixture(scope="module")
def singles(world):
    """{scene name: answer} from the engine, one conversation at a time (what `describe FILE` does)."""
    from ernie_cli.engine import TorchEngine
    from ernie_cli.media import check_file
    from ernie_cli.settings import GenerationSettings, LoadOptions, MediaOptions, user_message
    from processing.events import Finished

    engine = TorchEngine()
    engine.load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions())
    out = {}
    for i in range(N_SCENES):
        media = check_file(world / f"scene{i}.png", f"scene{i}.png")
        events = list(engine.generate([user_message("Describe this image.", [media])], GenerationSettings()))
        done = [e for e in events if isinstance(e, Finished)][0]
        out[f"scene{i}.png"] = done.text
    return out


def each(world, *args, **kw):
    return run_ernie(["describe", "--each", *args, "--model", "ernie-tiny"], world, **kw)


def lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout_text.splitlines()]


def test_jsonl_keeps_input_order_and_reports_broken_inputs_among_good_ones(world, singles):
    inputs = ["scene0.png", "missing.png", "scene1.png", "notes.png", "cut.png", "scene2.png", "bomb.png",
              "scene3.png", "scene4.png", "scene5.png"]
    proc = each(world, *inputs, "--jsonl", "--batch-size", "3")
    assert proc.returncode == 1, proc.stderr_text
    assert TRACEBACK not in proc.stderr_text
    objs = lines(proc)
    assert [o["path"] for o in objs] == inputs
    broken = {o["path"]: o["error"] for o in objs if "error" in o}
    assert set(broken) == {"missing.png", "notes.png", "cut.png", "bomb.png"}
    assert "no such file" in broken["missing.png"] and "not an image" in broken["notes.png"]
    assert all(set(o) == {"path", "error"} for o in objs if "error" in o)
    for o in objs:
        if "error" not in o:
            assert o["text"] == singles[o["path"]], o["path"]  # greedy: identical to the file alone
            assert {"text", "thinking", "finish_reason", "usage", "timings", "media"} <= set(o)
            assert o["finish_reason"] == "stop" and o["usage"]["completion_tokens"] > 0
            assert o["media"][0]["path"] == o["path"]
    err = proc.stderr_text.strip().splitlines()
    assert err[-1] == "4 of 10 failed"
    assert all(line.startswith("error: ") for line in err[:-1]) and len(err) == 5


def test_all_good_exits_0_and_says_nothing_on_a_piped_stderr(world, singles):
    proc = each(world, "scene1.png", "scene0.png", "--jsonl")
    assert proc.returncode == 0 and proc.stderr_text == "", proc.stderr_text
    assert [o["text"] for o in lines(proc)] == [singles["scene1.png"], singles["scene0.png"]]


def test_each_answer_equals_a_real_single_describe(world):
    single = run_ernie(["describe", "scene2.png", "--model", "ernie-tiny", "--json"], world)
    batched = each(world, "scene3.png", "scene2.png", "scene4.png", "--jsonl", "--batch-size", "4")
    assert single.returncode == 0 and batched.returncode == 0, single.stderr_text + batched.stderr_text
    assert lines(batched)[1]["text"] == json.loads(single.stdout_text)["text"]


def test_json_is_one_array_and_text_has_head_style_headers(world, singles):
    proc = each(world, "scene0.png", "missing.png", "scene1.png", "--json")
    assert proc.returncode == 1
    array = json.loads(proc.stdout_text)
    assert [o["path"] for o in array] == ["scene0.png", "missing.png", "scene1.png"]
    text = each(world, "scene0.png", "missing.png", "scene1.png")
    assert text.returncode == 1
    assert text.stdout_text == (f"==> scene0.png <==\n{singles['scene0.png']}\n\n"
                                f"==> scene1.png <==\n{singles['scene1.png']}\n")
    assert "error: no such file: missing.png" in text.stderr_text and "1 of 3 failed" in text.stderr_text


def test_stdin_list_of_paths(world, singles):
    listing = "scene2.png\n\nscene0.png\r\nnope.png\nfile:///etc/passwd\n"
    proc = each(world, "-", "--jsonl", input=listing)
    assert proc.returncode == 1
    objs = lines(proc)
    assert [o["path"] for o in objs] == ["scene2.png", "scene0.png", "nope.png", "file:///etc/passwd"]
    assert objs[0]["text"] == singles["scene2.png"] and objs[1]["text"] == singles["scene0.png"]
    assert "unsupported URL scheme" in objs[3]["error"]
    empty = each(world, "-", "--json", input="\n")
    assert empty.returncode == 0 and json.loads(empty.stdout_text) == []


def test_videos_among_pictures(world, singles):
    import shutil

    clip = Path(__file__).resolve().parents[1] / "examples" / "red-circle-left-to-right.mp4"
    shutil.copy(clip, world / "clip.mp4")
    alone = run_ernie(["describe", "clip.mp4", "--model", "ernie-tiny", "--json"], world)
    proc = each(world, "scene0.png", "clip.mp4", "scene1.png", "--jsonl", "--batch-size", "2")
    assert alone.returncode == 0 and proc.returncode == 0, alone.stderr_text + proc.stderr_text
    objs = lines(proc)
    assert objs[1]["text"] == json.loads(alone.stdout_text)["text"] == "A red circle moves from left to right."
    assert objs[1]["media"][0]["kind"] == "video" and objs[1]["media"][0]["timestamps"]
    assert [objs[0]["text"], objs[2]["text"]] == [singles["scene0.png"], singles["scene1.png"]]


def test_settings_apply_to_every_input(world):
    proc = each(world, "scene0.png", "scene1.png", "--jsonl", "-n", "2", "--prompt", "What is here?")
    assert proc.returncode == 0, proc.stderr_text
    assert all(o["usage"]["completion_tokens"] == 2 and o["finish_reason"] == "length" for o in lines(proc))


def test_batch_flags_need_each(world):
    proc = run_ernie(["describe", "scene0.png", "--batch-size", "2", "--model", "ernie-tiny"], world)
    assert proc.returncode == 2 and "--each" in proc.stderr_text


def _copies(world: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"copy{i:02d}.png"
        (world / name).write_bytes((world / f"scene{i % N_SCENES}.png").read_bytes())
        names.append(name)
    return names


def _complete_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _start_and_stop_after_first_answer(world, names, out_path, sig):
    with open(out_path, "w") as out:
        proc = subprocess.Popen([str(ERNIE), "describe", "--each", *names, "--model", "ernie-tiny", "--jsonl",
                                 "--batch-size", "1"], stdout=out, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, cwd=world, env=ernie_env(world))
        deadline = time.monotonic() + 120
        while not _complete_lines(out_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def test_resume_after_a_kill_answers_only_the_rest(world, singles):
    names = _copies(world, 30)
    out_path = world / "captions.jsonl"
    code, _ = _start_and_stop_after_first_answer(world, names, out_path, signal.SIGKILL)
    first = _complete_lines(out_path)
    assert code == -signal.SIGKILL and 1 <= len(first) < len(names), len(first)
    with open(out_path, "a") as out:
        resumed = subprocess.run([str(ERNIE), "describe", "--each", *names, "--model", "ernie-tiny", "--jsonl",
                                  "--resume", str(out_path)], stdout=out, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, cwd=world, env=ernie_env(world), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = _complete_lines(out_path)
    assert sorted(o["path"] for o in final) == sorted(names)  # every input once: none answered twice
    for o in final:
        assert o["text"] == singles[f"scene{int(o['path'][4:6]) % N_SCENES}.png"]


def test_ctrl_c_writes_the_finished_answers_and_exits_130(world):
    names = _copies(world, 30)
    out_path = world / "interrupted.jsonl"
    code, err = _start_and_stop_after_first_answer(world, names, out_path, signal.SIGINT)
    assert code == 130, err
    assert TRACEBACK not in err and "interrupted" in err
    text = out_path.read_text()
    assert text.endswith("\n")
    written = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert 1 <= len(written) < len(names)
    assert [o["path"] for o in written] == sorted(o["path"] for o in written)  # in input order
    assert all("text" in o for o in written)


def test_progress_bar_on_a_terminal_stderr(world):
    pexpect = pytest.importorskip("pexpect")
    env = ernie_env(world, TERM="xterm")
    child = pexpect.spawn("/bin/sh", ["-c", f"{ERNIE} describe --each scene0.png scene1.png scene2.png "
                                            "--model ernie-tiny --jsonl --batch-size 1 > out.jsonl"],
                          cwd=str(world), env=env, timeout=120, encoding="utf-8", codec_errors="replace",
                          dimensions=(30, 140))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "files/s" in child.before and "tok/s" in child.before and "/3" in child.before, child.before
    assert len((world / "out.jsonl").read_text().splitlines()) == 3
    quiet = pexpect.spawn("/bin/sh", ["-c", f"{ERNIE} describe --each scene0.png --model ernie-tiny -q --jsonl "
                                            "> out.jsonl"], cwd=str(world), env=env, timeout=120, encoding="utf-8")
    quiet.expect(pexpect.EOF)
    quiet.close()
    assert quiet.exitstatus == 0 and "files/s" not in quiet.before, quiet.before


def test_resume_reads_answered_paths_from_jsonl_or_a_json_array(tmp_path):
    from ernie_cli.each import answered

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"path": "x.png", "text": "t"}) + "\n" + json.dumps({"path": "y.png", "error": "e"})
                     + "\nnot json\n" + '{"path": "z.png", "te')  # a line cut by a kill
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"path": "p.png", "text": "t"}, {"path": "q.png", "error": "e"}]))
    assert answered(jsonl) == {"x.png"} and answered(array) == {"p.png"}
    assert answered(tmp_path / "new.jsonl") == set()  # a first run: nothing to skip


def test_stdin_lists_skip_blank_lines_and_keep_spaces(tmp_path):
    import io

    from ernie_cli.each import read_inputs
    from model.errors import ErnieError

    listing = io.StringIO("a.png\n\n  \nmy photo.jpg\r\nhttps://x/y.png\n")
    assert read_inputs(["first.png", "-", "last.png"], listing) == [
        "first.png", "a.png", "my photo.jpg", "https://x/y.png", "last.png"]
    with pytest.raises(ErnieError, match="only once"):
        read_inputs(["-", "-"], io.StringIO(""))


def _each_run(engine, refs):
    """An EachRun writing --jsonl into a string (in-process)."""
    import io

    from ernie_cli.each import EachRun, Writer
    from ernie_cli.render import stderr_console
    from ernie_cli.settings import GenerationSettings

    out = io.StringIO()
    run = EachRun(engine, refs, None, None, GenerationSettings(), Writer("jsonl", out), stderr_console(),
                  show_progress=False, ahead=len(refs))
    return run, out


def test_inputs_prepared_while_the_model_loads_go_first_in_order(world, singles, monkeypatch):
    """The processor loads before the weights and the first inputs are prepared meanwhile; when
    every input is ready before the model, run() submits them in input order and says the input
    has ended (no hold for companions that will never come)."""
    from ernie_cli import batch
    from ernie_cli.engine import TorchEngine
    from ernie_cli.settings import LoadOptions, MediaOptions

    ended = []
    real_end = batch.BatchRunner.end_of_input
    monkeypatch.setattr(batch.BatchRunner, "end_of_input", lambda self: (ended.append(True), real_end(self)))
    refs = [str(world / f"scene{i}.png") for i in (2, 0, 1)] + [str(world / "notes.png")]
    engine = TorchEngine()
    run, out = _each_run(engine, refs)
    seen_model = []

    def processor_ready():
        seen_model.append(engine.model)
        run.start_prefetch()
        run._prefetch.join(60)  # every input prepared (or failed) before the weights load

    engine.load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions(), on_processor=processor_ready)
    assert seen_model == [None] and engine.model is not None
    assert [ref for _, ref, _ in run._early] == refs[:3]  # notes.png failed at preparation
    assert run.run(batch_size=2) is False
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["path"] for r in rows] == refs
    assert [r["text"] for r in rows[:3]] == [singles[f"scene{i}.png"] for i in (2, 0, 1)]
    assert "error" in rows[3] and ended == [True]


def test_a_model_that_fails_to_load_stops_the_prefetch(world, tmp_path):
    from ernie_cli.engine import TorchEngine
    from ernie_cli.settings import LoadOptions, MediaOptions
    from model.errors import ErnieError

    bad = tmp_path / "bad"
    bad.mkdir()
    tiny = Path(__import__("ernie_cli").__file__).parent / "assets" / "ernie-tiny"
    for name in os.listdir(tiny):
        if name != "model.safetensors":
            (bad / name).write_bytes((tiny / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    refs = [str(world / f"scene{i}.png") for i in range(N_SCENES)] * 20
    engine = TorchEngine()
    run, _ = _each_run(engine, refs)
    with pytest.raises(ErnieError):
        engine.load(LoadOptions(str(bad), device="cpu"), MediaOptions(), on_processor=run.start_prefetch)
    run.abandon()
    assert run._prefetch.ident is not None and not run._prefetch.is_alive()
    assert len(run._early) < len(refs)  # it stopped, not prepared everything


def test_each_keeps_no_preprocessed_media_unless_asked(world, monkeypatch):
    """Every file is seen once: the cache of preprocessed media stays off (its entries would only
    take memory), unless $ERNIE_MEDIA_CACHE_MB asks for one."""
    from ernie_cli.engine import TorchEngine
    from ernie_cli.settings import LoadOptions, MediaOptions
    from processing.media_cache import MEDIA_CACHE

    monkeypatch.delenv("ERNIE_MEDIA_CACHE_MB", raising=False)
    try:
        TorchEngine().load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions(), cache_media=False)
        assert MEDIA_CACHE.max_bytes == 0
        monkeypatch.setenv("ERNIE_MEDIA_CACHE_MB", "64")
        TorchEngine().load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions(), cache_media=False)
        assert MEDIA_CACHE.max_bytes == 64 * 2**20
    finally:
        monkeypatch.delenv("ERNIE_MEDIA_CACHE_MB", raising=False)
        TorchEngine().load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions())
    assert MEDIA_CACHE.max_bytes == 512 * 2**20
