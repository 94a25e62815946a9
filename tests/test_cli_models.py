"""`ernie info / models / rm / pull`: the Hub cache layout, parameter counts, torch-free info."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_cli.modelinfo import count_parameters
from model.config import ErnieVLConfig, tiny
from tests.helpers.cli import assert_one_line_error, ernie_env, run_ernie
from tests.tiny_configs import CONFIG_A, CONFIG_B


def _fake_cached_repo(hf_home: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """The standard Hub cache layout: blobs by hash, a snapshot of symlinks, refs/main."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return root


@pytest.mark.parametrize("name", ["A", "B"])
def test_parameter_count_equals_the_model_built_from_the_config(name):
    pytest.importorskip("torch")
    from model.ernie_vl import ErnieVL

    config = ErnieVLConfig.from_dict({"A": CONFIG_A, "B": CONFIG_B}[name])
    model = ErnieVL.from_config(config, device="meta")
    assert count_parameters(config).total == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_the_real_28b_config():
    pytest.importorskip("torch")
    from model.ernie_vl import ErnieVL

    config = ErnieVLConfig()  # defaults are the real checkpoint's
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in ErnieVL.from_config(config, device="meta").parameters())
    assert 2.5e9 < counts.active_text < 3.6e9  # "A3B": about 3B active per token


def test_active_parameters_leave_out_unchosen_experts_and_vision():
    cfg = tiny()
    t = cfg.text
    c = count_parameters(cfg)
    n_moe = sum(map(t.is_moe_layer, range(t.num_hidden_layers)))
    I_t, I_v = t.moe_intermediate_size
    idle = n_moe * ((t.moe_num_experts - t.moe_k) * 3 * t.hidden_size * I_t  # text experts not picked
                    + t.moe_num_experts * 3 * t.hidden_size * I_v  # the vision bank
                    + t.moe_num_experts * t.hidden_size)  # the vision router
    assert c.active_text == c.total - c.vision - idle


def test_info_on_a_checkpoint_dir_is_torch_free(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG_A))
    code = "import sys; sys.argv = ['ernie', 'info', 'm', '--json']; from ernie_cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=ernie_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["parameters"]["total"] == count_parameters(ErnieVLConfig.from_dict(CONFIG_A)).total
    assert summary["memory_bytes"]["bfloat16"] * 2 == summary["memory_bytes"]["float32"]
    assert summary["text"]["layers"] == 3 and summary["text"]["moe_layers"] == 2
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert not [m for m in imported if m.split(".")[0] == "torch"]


def test_models_info_rm_on_the_hub_cache(tmp_path):
    config = json.dumps(CONFIG_B).encode()
    _fake_cached_repo(tmp_path / "hf", "someone/tiny-vl", {"config.json": config, "model.safetensors": b"x" * 1000})
    listed = run_ernie(["models", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr_text
    rows = {r["name"]: r for r in json.loads(listed.stdout_text)}
    row = rows["someone/tiny-vl"]
    assert row["source"] == "hub-cache" and row["revisions"] == [{"commit": "a" * 40, "refs": ["main"]}]
    assert row["size_bytes"] >= len(config) + 1000
    table = run_ernie(["models"], tmp_path)
    assert "someone/tiny-vl" in table.stdout_text and "\x1b" not in table.stdout_text

    info = run_ernie(["info", "someone/tiny-vl", "--offline"], tmp_path)
    assert info.returncode == 0, info.stderr_text
    total = count_parameters(ErnieVLConfig.from_dict(CONFIG_B)).total
    assert f"{total / 1e3:.2f}K total" in info.stdout_text

    gone = run_ernie(["rm", "someone/tiny-vl", "--yes"], tmp_path)
    assert gone.returncode == 0, gone.stderr_text
    assert "removed someone/tiny-vl" in gone.stderr_text and gone.stdout == b""
    assert "someone/tiny-vl" not in run_ernie(["models"], tmp_path).stdout_text
    assert_one_line_error(run_ernie(["rm", "someone/tiny-vl", "-y"], tmp_path), "someone/tiny-vl",
                          "not in the hub cache")


def test_offline_without_cache(tmp_path):
    assert_one_line_error(run_ernie(["info", "someone/absent", "--offline"], tmp_path), "someone/absent", "cache")
    assert_one_line_error(run_ernie(["pull", "someone/absent"], tmp_path), "someone/absent")


def test_unknown_model_names(tmp_path):
    assert_one_line_error(run_ernie(["info", "./no/such/dir"], tmp_path), "./no/such/dir")
    assert_one_line_error(run_ernie(["info", "not-a-repo-id"], tmp_path), "not-a-repo-id")


def test_pull_progress_adapter_drives_rich():
    """huggingface_hub calls tqdm_class(total=..., desc=...) / update(n) / close(); Rich must follow."""
    import io

    from rich.console import Console

    from ernie_cli.models_cmd import _rich_tqdm

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    bar_class = _rich_tqdm(console)
    bar = bar_class(total=2000, desc="model.safetensors", unit="B")
    bar.update(500)
    bar.update(1500)
    (task,) = bar_class.rich_progress.tasks
    assert task.completed == 2000 and task.total == 2000 and task.description == "model.safetensors"
    bar.close()
    assert not task.visible and not bar_class.rich_progress.live.is_started
