"""`ernie pull / models / rm / info`: the standard Hugging Face cache, plus the bundled ernie-tiny.

Torch-free: `info` reads config.json through model.config and computes sizes from it.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from ernie_cli.engine import ASSETS, resolve_model_ref
from ernie_cli.modelinfo import (DTYPE_BYTES, count_parameters, format_name, human_bytes, human_count, kv_cache_bytes,
                                 quantization_of, quantized_weight_bytes)
from ernie_cli.settings import TINY_MODEL
from model.errors import ErnieError, ModelNotFoundError


def hub_offline(flag: bool | None) -> str | None:
    """What keeps the Hub off, in the user's words ("--offline", "HF_HUB_OFFLINE"), or None when nothing does."""
    if flag:
        return "--offline"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE"
    return None


@contextmanager
def hub_errors(repo: str, revision: str | None = None, offline: str | None = None,
               pulling: bool = False) -> Iterator[None]:
    """Hub exceptions -> ModelNotFoundError / ErnieError with what to do next (`offline`: see hub_offline)."""
    from huggingface_hub import errors

    where = f"{repo} (revision {revision})" if revision else repo
    try:
        yield
    except errors.GatedRepoError:
        raise ModelNotFoundError(f"{where} is gated and this account has no access",
                                 hint="accept the licence on huggingface.co and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo!r} on the Hub (or it is private)",
                                 hint="check the name; for private repos set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo} has no revision {revision!r}", hint="check the branch, tag or commit") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise _not_reachable(repo, where, offline, pulling) from None
    except errors.HFValidationError as e:
        raise ModelNotFoundError(f"{repo!r} is not a valid Hub repo id ({e})", hint="use owner/name") from None
    except errors.HfHubHTTPError as e:
        raise ErnieError(f"the Hub refused {where}: {e}".splitlines()[0], hint="retry later, or check HF_TOKEN") from None


def _not_reachable(repo: str, where: str, offline: str | None, pulling: bool) -> ModelNotFoundError:
    """The model is not cached and the Hub cannot be asked: say which of the two stopped it."""
    from huggingface_hub import constants

    if offline:
        undo = "drop --offline" if offline == "--offline" else "unset HF_HUB_OFFLINE"
        if pulling:
            return ModelNotFoundError(f"cannot pull {where}: {offline} keeps ernie off the Hub", hint=undo)
        return ModelNotFoundError(f"{where} is not in the Hub cache and {offline} keeps ernie off the Hub",
                                  hint=f"{undo}, or run `ernie pull {repo}` while online")
    state = f"the Hub ({constants.ENDPOINT}) is unreachable"
    if pulling:
        return ModelNotFoundError(f"cannot pull {where}: {state}",
                                  hint="check the network (and HF_ENDPOINT, if set), then pull again: it resumes")
    return ModelNotFoundError(f"{where} is not in the Hub cache and {state}",
                              hint=f"check the network (and HF_ENDPOINT, if set); once online, `ernie pull {repo}` "
                              "keeps a copy for offline use")


def out_console() -> Console:
    from ernie_cli.render import console

    return console(sys.stdout, soft_wrap=True)


# --- pull --------------------------------------------------------------------------------------------

def run_pull(repo: str, revision: str | None, quiet: bool) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from ernie_cli.render import stderr_console
    from model.checkpoint.hub import ALLOW_PATTERNS, KNOWN_REVISIONS

    err = stderr_console()
    disable_progress_bars()
    tqdm_class = None if quiet or not err.is_terminal else _rich_tqdm(err)
    revision = revision or KNOWN_REVISIONS.get(repo)  # the revision with tokenizer.json, where we know one
    with hub_errors(repo, revision, hub_offline(None), pulling=True):
        path = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, tqdm_class=tqdm_class)
    if not quiet:
        err.print(f"pulled {repo}{'@' + revision if revision else ''}")
    print(path)


def _rich_tqdm(console: Console):
    """A tqdm stand-in that draws huggingface_hub's progress with Rich."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
    from tqdm.auto import tqdm

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        console=console, transient=True)

    class RichTqdm(tqdm):
        rich_progress = progress

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if not progress.live.is_started:
                progress.start()
            self._task = progress.add_task(str(kwargs.get("desc") or "download")[-40:], total=kwargs.get("total"))

        def update(self, n=1):
            progress.advance(self._task, n or 0)

        def close(self):
            progress.update(self._task, visible=False)
            if all(t.finished or not t.visible for t in progress.tasks):
                progress.stop()
            super().close()

    return RichTqdm


# --- models ------------------------------------------------------------------------------------------

def cached_models() -> list[dict[str, Any]]:
    rows = []
    tiny = ASSETS / TINY_MODEL
    if (tiny / "config.json").exists():
        size = sum(f.stat().st_size for f in tiny.rglob("*") if f.is_file())
        rows.append({"name": TINY_MODEL, "source": "bundled", "size_bytes": size, "revisions": [], "path": str(tiny),
                     "format": _format(tiny)})
    from ernie_cli.quantize_cmd import dir_bytes, local_models

    for path in local_models():
        rows.append({"name": str(path), "source": "local", "size_bytes": dir_bytes(path), "revisions": [],
                     "path": str(path), "format": _format(path)})
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return rows
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = [{"commit": r.commit_hash, "refs": sorted(r.refs)} for r in repo.revisions]
        snapshots = sorted(repo.revisions, key=lambda r: r.last_modified)
        rows.append({"name": repo.repo_id, "source": "hub-cache", "size_bytes": repo.size_on_disk,
                     "revisions": revisions, "path": str(repo.repo_path),
                     "format": _format(Path(snapshots[-1].snapshot_path)) if snapshots else "-"})
    return rows


def _format(directory: Path) -> str:
    """A checkpoint directory's weight format ("bfloat16", "int4 (group 64)", ...); "-" when unreadable."""
    try:
        return format_name(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return "-"


def run_models(as_json: bool) -> None:
    rows = cached_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("MODEL", "FORMAT", "SIZE", "REVISION", "SOURCE"):
        table.add_column(col)
    for row in rows:
        revs = ", ".join(",".join(r["refs"]) or r["commit"][:12] for r in row["revisions"]) or "-"
        table.add_row(row["name"], row["format"], human_bytes(row["size_bytes"]), revs, row["source"])
    out_console().print(table)


# --- rm ----------------------------------------------------------------------------------------------

def run_rm(repo: str, yes: bool) -> None:
    """Delete after a yes: from --yes, or typed at the question (read from stdin, terminal or not)."""
    if repo == TINY_MODEL:
        raise ErnieError(f"{TINY_MODEL} is bundled with ernie and cannot be removed",
                         hint="`ernie models` lists what is in the Hub cache")
    row = next((r for r in cached_models() if r["name"] == repo and r["source"] == "hub-cache"), None)
    if row is None:
        raise ModelNotFoundError(f"{repo} is not in the Hub cache", hint="`ernie models` lists what is cached")
    size = human_bytes(row["size_bytes"])
    if not yes and not _confirm(f"Delete {repo} ({size})? [y/N] "):
        print(f"nothing was removed: {repo} stays in the cache", file=sys.stderr)
        raise SystemExit(1)
    from huggingface_hub import scan_cache_dir

    strategy = scan_cache_dir().delete_revisions(*(r["commit"] for r in row["revisions"]))
    strategy.execute()
    import shutil

    shutil.rmtree(row["path"], ignore_errors=True)
    print(f"removed {repo} ({size})", file=sys.stderr)


def _confirm(question: str) -> bool:
    """y or yes (any case) read from stdin; anything else is a no. No answer at all (EOF) is an error."""
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline() if sys.stdin is not None else ""
    if not answer:
        print(file=sys.stderr)
        raise ErnieError("no answer to the question on stdin, so nothing was removed",
                         hint="answer y, or pass --yes (-y) to remove without asking")
    if not sys.stdin.isatty():
        print(answer.strip(), file=sys.stderr)  # show the piped answer where the question is
    return answer.strip().lower() in ("y", "yes")


# --- info --------------------------------------------------------------------------------------------

def config_path(model: str, revision: str | None, offline: bool | None) -> Path:
    ref = resolve_model_ref(model)
    if isinstance(ref, Path):
        if not (ref / "config.json").exists():
            raise ModelNotFoundError(f"{ref} has no config.json; expected a checkpoint directory",
                                     hint="pass the directory that holds config.json, a Hub repo id, or ernie-tiny")
        return ref / "config.json"
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from model.checkpoint.hub import KNOWN_REVISIONS

    revision = revision or KNOWN_REVISIONS.get(ref)  # the revision `ernie pull` and `describe` use
    off = hub_offline(offline)
    with hub_errors(ref, revision, off):
        try:  # the cache first: no network when the model was pulled
            return Path(hf_hub_download(ref, "config.json", revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            if off:
                raise
        # A snapshot of config.json alone: an unreachable Hub fails at once (hf_hub_download's own
        # request is retried with backoff for 20 s and more, printing each retry).
        return Path(snapshot_download(ref, revision=revision, allow_patterns=["config.json"])) / "config.json"


def model_summary(model: str, path: Path) -> dict[str, Any]:
    from model.config import ErnieVLConfig

    cfg = ErnieVLConfig.from_file(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    t, v, p = cfg.text, cfg.vision, count_parameters(cfg)
    stored = quantization_of(raw)
    if stored:  # as stored (float parts in the checkpoint's float dtype)
        floats = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").removeprefix("torch.")
        memory = {format_name(raw): quantized_weight_bytes(cfg, stored["bits"], stored.get("group_size"),
                                                           floats if floats in DTYPE_BYTES else "bfloat16",
                                                           lm_head=stored.get("lm_head", True),
                                                           vision=stored.get("vision", True))}
    else:
        memory = {d: p.total * b for d, b in DTYPE_BYTES.items()}
        memory.update({f"int{b}": quantized_weight_bytes(cfg, b) for b in (8, 4)})
    return {
        "model": model, "config": str(path),
        "text": {"layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
                 "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
                 "context_length": t.max_position_embeddings, "moe_layers": sum(map(t.is_moe_layer, range(t.num_hidden_layers))),
                 "experts_per_bank": t.moe_num_experts, "experts_per_token": t.moe_k,
                 "shared_experts": t.moe_num_shared_experts, "tied_embeddings": t.tie_word_embeddings},
        "vision": {"depth": v.depth, "hidden_size": v.hidden_size, "patch_size": v.patch_size},
        "parameters": {"total": p.total, "active_per_text_token": p.active_text, "vision": p.vision, "experts": p.experts},
        "format": format_name(raw),
        "quantization": quantization_of(raw),
        "memory_bytes": memory,
        "size_on_disk_bytes": sum(f.stat().st_size for f in path.parent.glob("*.safetensors")) or None,
        "kv_cache_bytes_per_1k_tokens_bf16": kv_cache_bytes(cfg, 1024, "bfloat16"),
    }


def run_info(model: str, revision: str | None, offline: bool | None, as_json: bool) -> None:
    summary = model_summary(model, config_path(model, revision, offline))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t, p = summary["text"], summary["parameters"]
    lines = [
        f"model         {model}",
        f"format        {summary['format']}" + (f", weights {human_bytes(summary['size_on_disk_bytes'])} on disk"
                                                 if summary["size_on_disk_bytes"] else ""),
        f"parameters    {human_count(p['total'])} total, {human_count(p['active_per_text_token'])} active per text token "
        f"(vision {human_count(p['vision'])})",
        f"text          {t['layers']} layers ({t['moe_layers']} MoE), hidden {t['hidden_size']}, "
        f"{t['heads']}/{t['kv_heads']} heads of {t['head_dim']}, vocab {t['vocab_size']}, context {t['context_length']}",
        f"experts       {t['experts_per_bank']} text + {t['experts_per_bank']} vision per layer, top-{t['experts_per_token']}, "
        f"{t['shared_experts']} shared",
        f"vision        {summary['vision']['depth']} blocks, width {summary['vision']['hidden_size']}, "
        f"patch {summary['vision']['patch_size']}",
        "memory        " + ", ".join(f"{d} {human_bytes(b)}" for d, b in summary["memory_bytes"].items()),
        f"kv cache      {human_bytes(summary['kv_cache_bytes_per_1k_tokens_bf16'])} per 1k tokens (bfloat16)",
    ]
    print("\n".join(lines))
