"""Resolution of a model name: local directory, or a repo in a stand-in Hub cache (no network).

The cache is built by hand with the real layout (models--org--name/snapshots/<commit>/ and
refs/<revision>), HF_HUB_CACHE points at it and HF_HUB_OFFLINE=1, or the endpoint is a closed
local port for the "Hub unreachable" cases.
"""

import json
from pathlib import Path

import pytest

from model.checkpoint import hub
from model.checkpoint.hub import DEFAULT_REPO, TRANSFORMERS_REVISION, resolve
from model.errors import CheckpointError, ModelNotFoundError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, revision: str = "main", files=("config.json", "tokenizer.json"),
                commit: str = COMMIT) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in files:
        (snap / name).write_text(json.dumps({"file": name}))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hub-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_local_directory_wins(tmp_path):
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path)) == tmp_path


def test_file_and_missing_path_are_errors(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoint directory"):
        resolve(f)
    with pytest.raises(ModelNotFoundError, match="no checkpoint directory at .*nope") as e:
        resolve(str(tmp_path / "nope"))
    assert DEFAULT_REPO in e.value.hint
    with pytest.raises(ModelNotFoundError, match="no checkpoint directory"):
        resolve("./relative/missing")


def test_cached_repo_offline(cache):
    snap = _cache_repo(cache, "org/tiny")
    assert resolve("org/tiny") == snap
    assert (resolve("org/tiny") / "tokenizer.json").is_file()


def test_cached_revision_offline(cache):
    snap = _cache_repo(cache, "org/tiny", revision="refs/pr/3")
    assert resolve("org/tiny", revision="refs/pr/3") == snap
    with pytest.raises(ModelNotFoundError, match="revision refs/pr/4"):
        resolve("org/tiny", revision="refs/pr/4")


def test_default_repo_uses_the_transformers_revision(cache):
    snap = _cache_repo(cache, DEFAULT_REPO, revision=TRANSFORMERS_REVISION)
    assert resolve() == snap
    assert resolve(DEFAULT_REPO) == snap


def test_unknown_repo_offline_says_how_to_use_a_directory(cache):
    with pytest.raises(ModelNotFoundError) as e:
        resolve("org/absent")
    assert "org/absent is not in the Hub cache" in str(e.value) and "offline" in str(e.value)
    assert "--local-dir DIR" in e.value.hint and "pass DIR" in e.value.hint


def test_offline_argument_overrides_environment(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snap = _cache_repo(cache, "org/tiny")
    assert resolve("org/tiny", offline=True) == snap


def test_snapshot_without_tokenizer_names_the_revision(cache):
    _cache_repo(cache, "baidu/original", files=("config.json", "tokenizer.model"))
    with pytest.raises(ModelNotFoundError, match="has no tokenizer.json") as e:
        resolve("baidu/original")
    assert f"--revision {TRANSFORMERS_REVISION}" in e.value.hint


@pytest.fixture
def unreachable(cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 1)
    return cache


def test_unreachable_hub_falls_back_to_the_cache(unreachable):
    snap = _cache_repo(unreachable, "org/tiny")
    assert resolve("org/tiny") == snap


def test_unreachable_hub_without_cache_is_model_not_found(unreachable):
    with pytest.raises(ModelNotFoundError) as e:
        resolve("org/absent")
    assert "org/absent" in str(e.value) and "pass DIR" in e.value.hint


def test_allow_patterns_exclude_pickles():
    from fnmatch import fnmatch

    allowed = lambda name: any(fnmatch(name, p) for p in hub.ALLOW_PATTERNS)  # noqa: E731
    for name in ("config.json", "model-00001-of-00012.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "chat_template.jinja", "Roboto-Regular.ttf", "preprocessor_config.json"):
        assert allowed(name), name
    for name in ("pytorch_model.bin", "model.pt", "modeling_ernie.py", "model.pdparams"):
        assert not allowed(name), name


def test_from_pretrained_by_repo_id_offline(cache):
    import torch

    from model.config import ErnieVLConfig
    from model.ernie_vl import ErnieVL
    from tests.helpers.checkpoints import make_checkpoint_from_ours, random_state
    from tests.tiny_configs import CONFIG_A

    cfg = ErnieVLConfig.from_dict(CONFIG_A)
    snap = _cache_repo(cache, "org/tiny-ernie", revision="refs/pr/10")
    state = random_state(cfg, seed=9)
    make_checkpoint_from_ours(snap, state, cfg, layout="baidu", n_shards=2)
    model = ErnieVL.from_pretrained("org/tiny-ernie", revision="refs/pr/10", device="cpu")
    assert model.config == cfg
    assert torch.equal(model.state_dict()["model.norm.weight"], state["model.norm.weight"])
