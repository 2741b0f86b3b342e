"""Models named as users name them: a Hugging Face repo id (``Qwen/Qwen3-30B-A3B``) to a local directory.

A model argument that is an existing path is used as is. One that is not, and reads like a repo id
(``org/name``, no other slash, not starting with ``.``, ``~`` or ``/``), is resolved through
huggingface_hub's own cache (``snapshot_download``): downloaded when online, read from the cache
when offline. Offline is ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set *when the model is
resolved*, and the cache is ``HF_HUB_CACHE`` (else ``HF_HOME/hub``) as set then too, so a change
after import is honoured. The directory returned then goes through the same checks as any checkpoint
directory (:func:`swapmoe.checkpoint.check_checkpoint`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from swapmoe.errors import CheckpointError

# org/name as the Hub spells repo ids: letters, digits, "-", "_", "." in each part
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# what a checkpoint needs: config, weights, tokenizer files, remote code (for --trust-remote-code)
_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]
_PICKLE_PATTERNS = ["*.bin"]


def looks_like_repo_id(model: str | Path) -> bool:
    """Whether ``model`` names a Hub repo rather than a local path (an existing path always wins)."""
    text = str(model)
    return not Path(text).expanduser().exists() and _REPO_ID.match(text) is not None and ".." not in text


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, read as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """The Hub cache as set now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(model: str | Path, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local checkpoint directory for ``model``: a path as is, a repo id through the Hub cache.

    ``revision`` is a branch, tag or commit of the repo (default: ``main``); it is refused with a
    local path, where it would mean nothing. Errors are one line naming the fix.
    """
    if not looks_like_repo_id(model):
        if revision is not None:
            raise CheckpointError(f"--revision {revision} applies to a Hugging Face repo id (org/name), "
                                  f"and {model} is a local path: drop --revision")
        return Path(model).expanduser()
    repo_id = str(model)
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    is_offline = offline()
    where = cache_dir()
    rev = revision or "main"
    patterns = _PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=where, local_files_only=is_offline,
                                 allow_patterns=patterns)
    except hub_errors.LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows a cut-off download
            raise CheckpointError(f"{repo_id} (revision {rev}) is only partly in the cache {where} (an interrupted "
                                  f"download): run huggingface-cli download {repo_id} again") from None
        if is_offline:
            raise CheckpointError(
                f"{repo_id} is no local directory, and (revision {rev}) is not in the local Hugging Face cache "
                f"{where} while HF_HUB_OFFLINE is set: download it where there is a network (huggingface-cli "
                f"download {repo_id}), or unset HF_HUB_OFFLINE"
            ) from None
        raise CheckpointError(f"{repo_id} is no local directory, and (revision {rev}) could not be downloaded "
                              f"(no connection to the Hub?) nor found in the local cache {where}: check the "
                              "path or the network, or set HF_HUB_CACHE to a cache that holds it") from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {rev!r}: pass a branch, tag or commit it has") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} is neither a local directory nor a Hugging Face repo you can access "
                              "(misspelt, private or gated: log in with huggingface-cli login)") from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{repo_id} (revision {rev}) could not be resolved: {first}") from None
    return Path(path)
