"""Where a checkpoint lives: a local directory, or a Hugging Face Hub repo in the standard cache.

A name that exists on disk is a directory; one that looks like a path (``/``, ``.``, ``~``, or
more than one ``/``) but does not exist is an error; anything else is a repo id, fetched with
``huggingface_hub.snapshot_download`` (config, tokenizer, processor, font and safetensors files
only: never pickles). Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) reads the cache only.
``HF_HUB_CACHE`` / ``HF_HOME`` are read at call time, so they can be changed after import.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.errors import CheckpointError, ModelNotFoundError

DEFAULT_REPO = "baidu/ERNIE-4.5-VL-28B-A3B-PT"
# The main branch of Baidu's repos holds the original files (SentencePiece tokenizer, remote
# code); this pull-request revision adds tokenizer.json and the processor configs.
TRANSFORMERS_REVISION = "refs/pr/10"
KNOWN_REVISIONS = {DEFAULT_REPO: TRANSFORMERS_REVISION}
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.ttf", "tokenizer.model"]


def resolve(path_or_repo_id: str | os.PathLike = DEFAULT_REPO, revision: str | None = None,
            offline: bool | None = None) -> Path:
    """The directory holding the checkpoint's files, downloading into the Hub cache if needed."""
    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory (config.json and "
                                  "*.safetensors)", hint="pass the directory that contains the file")
        return path
    if _looks_like_path(name):
        raise ModelNotFoundError(f"no checkpoint directory at {path}",
                                 hint="check the path, or pass a Hub repo id such as " + DEFAULT_REPO)
    return _snapshot(name, revision or KNOWN_REVISIONS.get(name), offline)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def offline_advice(offline: bool | None, then: str) -> tuple[str, str]:
    """(why the Hub was not asked or did not answer, what to do) for a model missing from the cache.

    offline: True when --offline was given, else None. `then` is the step that fixes it once online
    ("run `ernie pull REPO`"). Unsetting HF_HUB_OFFLINE is suggested only when it is set.
    """
    if offline:
        return "--offline was given", f"drop --offline, or {then} first"
    if offline is None and _is_offline(None):
        return "HF_HUB_OFFLINE is set", f"unset HF_HUB_OFFLINE and {then}"
    from huggingface_hub import constants

    return f"the Hub ({constants.ENDPOINT}) is unreachable", f"check the network (and HF_ENDPOINT, if set) and {then}"


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _snapshot(repo_id: str, revision: str | None, offline_flag: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    local_hint = ("download it elsewhere (`hf download " + repo_id +
                  (f" --revision {revision}" if revision else "") + " --local-dir DIR`) and pass DIR")
    offline = _is_offline(offline_flag)
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=offline, cache_dir=_cache_dir()))
    except hub_errors.HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a directory nor a valid Hub repo id ({e})",
                                 hint="pass a checkpoint directory or an id like " + DEFAULT_REPO) from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise ModelNotFoundError(f"the Hub has no accessible repo {where} ({type(e).__name__})",
                                 hint="check the name, log in with `hf auth login` for gated repos, or "
                                 + local_hint) from None
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}",
                                 hint="use an existing branch, tag, commit or refs/pr/N") from None
    except hub_errors.LocalEntryNotFoundError:
        state, hint = offline_advice(offline_flag, f"run `ernie pull {repo_id}`")
        raise ModelNotFoundError(f"{where} is not in the Hub cache ({_cache_dir() or 'default cache'}) and {state}",
                                 hint=f"{hint}; or {local_hint}") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"could not fetch {where} from the Hub ({type(e).__name__}: {e})",
                                 hint="check the network, or " + local_hint) from None
    _require_tokenizer(root, repo_id, revision)
    return root


def _require_tokenizer(root: Path, repo_id: str, revision: str | None) -> None:
    if (root / "tokenizer.json").is_file():
        return
    raise ModelNotFoundError(
        f"the snapshot of {repo_id} at revision {revision or 'main'} has no tokenizer.json (it holds only "
        "Baidu's original files)",
        hint=f"use the revision with the transformers-format files: --revision {TRANSFORMERS_REVISION}")
