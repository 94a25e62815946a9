"""ernie_cli.batch.BatchRunner (the text side of continuous batching, for --each and a server) on
ernie-tiny in-process: every request's events and result equal engine.generate on it alone."""

from __future__ import annotations

import random
import threading

import pytest

from ernie_cli.settings import GenerationSettings, LoadOptions, MediaOptions, user_message
from model.errors import ContextLengthError
from tests.test_ernie_tiny import shapes

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def engine_and_media(tmp_path_factory):
    from ernie_cli.engine import TorchEngine
    from ernie_cli.media import check_file

    root = tmp_path_factory.mktemp("runner")
    rng = random.Random(11)
    media = []
    for i in range(4):
        shapes.render(shapes.random_scene(rng, n_shapes=3 if i == 0 else None)).save(root / f"s{i}.png")
        media.append(check_file(root / f"s{i}.png", f"s{i}.png"))
    engine = TorchEngine()
    engine.load(LoadOptions("ernie-tiny", device="cpu"), MediaOptions())
    return engine, media


def alone(engine, conversation, settings):
    from processing.events import Finished

    events = list(engine.generate(conversation, settings))
    return [e for e in events if isinstance(e, Finished)][0]


def test_requests_with_their_own_settings_equal_their_runs_alone(engine_and_media):
    from ernie_cli.batch import BatchRunner
    from processing.events import Finished, TextDelta

    engine, media = engine_and_media
    first = alone(engine, [user_message("Describe this image.", [media[0]])], GenerationSettings()).text
    stop_word = first.split()[2]  # a word inside the first answer: the stop string ends it there
    jobs = [([user_message("Describe this image.", [media[0]])], GenerationSettings(stop=(stop_word,))),
            ([user_message("Describe this image.", [media[1]])], GenerationSettings()),
            ([user_message("What is this?", [media[2]])], GenerationSettings(max_new_tokens=3)),
            ([user_message("Describe this image.", [media[3]])], GenerationSettings(temperature=0.7, seed=5))]
    with BatchRunner(engine, batch_size=3) as runner:
        requests = [runner.submit(engine.prepare(c, s)) for c, s in jobs]
        streams = [list(r.events()) for r in requests]
    for (conversation, settings), events in zip(jobs, streams):
        want = alone(engine, conversation, settings)
        got = events[-1]
        assert isinstance(got, Finished)
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == got.text
        assert (got.text, got.reason) == (want.text, want.reason), settings
        assert got.stats.prompt_tokens == want.stats.prompt_tokens
    assert streams[0][-1].reason == "stop" and stop_word not in streams[0][-1].text
    assert streams[2][-1].reason == "length" and streams[2][-1].stats.completion_tokens == 3


def test_cancel_and_errors(engine_and_media):
    from ernie_cli.batch import BatchRunner

    engine, media = engine_and_media
    ended = []
    runner = BatchRunner(engine, batch_size=2, on_done=ended.append)
    try:
        conversation = [user_message("Describe this image.", [media[0]])]
        prepared = engine.prepare(conversation, GenerationSettings())
        gone = runner.submit(prepared)
        gone.cancel()
        kept = runner.submit(prepared)
        assert kept.result(timeout=60).text == alone(engine, conversation, GenerationSettings()).text
        assert gone.result(timeout=60).reason == "interrupted"
        assert set(ended) == {gone, kept}
        too_long = engine.prepare(conversation, GenerationSettings(max_new_tokens=10 ** 6))
        with pytest.raises(ContextLengthError):
            runner.submit(too_long)
    finally:
        runner.close()
    assert not runner.running


def test_submit_from_many_threads(engine_and_media):
    from ernie_cli.batch import BatchRunner

    engine, media = engine_and_media
    conversations = [[user_message("Describe this image.", [m])] for m in media]
    results = {}
    with BatchRunner(engine, batch_size=4) as runner:
        def client(i):
            results[i] = runner.submit(engine.prepare(conversations[i], GenerationSettings())).result(timeout=120)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, conversation in enumerate(conversations):
        assert results[i].text == alone(engine, conversation, GenerationSettings()).text
