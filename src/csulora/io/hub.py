"""Hugging Face hub ids where a folder is expected: resolved to a local snapshot folder.

``csulora subspace meta-llama/Llama-3.1-8B meta-llama/Llama-3.1-8B-Instruct ...`` works
like passing the two folders: a string that is not an existing path and looks like a hub
id (``org/name``) is fetched with :func:`huggingface_hub.snapshot_download` -- safetensors,
JSON configs and tokenizer files only (:data:`HUB_PATTERNS`; pickled ``.bin`` weights are
never fetched) -- into the usual hub cache (``HF_HUB_CACHE``/``HF_HOME``), and the snapshot
folder is used from then on. A download happens only when the user passes a hub id; with
``HF_HUB_OFFLINE=1`` only the local hub cache is looked at. When the id is neither cached
nor reachable the error is one line saying how to fetch it first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from csulora.errors import InputError

# What a checkpoint or adapter folder needs: weights (safetensors only), configs, tokenizer
# (tokenizer*.json, sentencepiece *.model, vocab/merges *.txt) and chat template. Never
# *.bin / *.pt / *.pth (pickles) nor other formats (GGUF, ONNX): no pattern here matches them.
HUB_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja")
# org/name as the hub spells repo ids: one slash, no leading dot or dash, at most 96 chars a part.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(spec: str | os.PathLike) -> bool:
    """``org/name`` (not an absolute, ``./`` or ``~`` path, not ending in a file suffix like .json)."""
    text = os.fspath(spec)
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith((".safetensors", ".json"))


def fetch_command(repo_id: str) -> str:
    """The shell command that fetches what csulora reads of ``repo_id`` into a local folder."""
    includes = " ".join(f"--include '{pattern}'" for pattern in HUB_PATTERNS)
    return f"hf download {repo_id} {includes} --local-dir DIR"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the library reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def resolve_model_dir(spec: str | os.PathLike, kind: str) -> Path:
    """The local folder for ``spec``: an existing path as is, a hub id fetched (or found in the cache).

    ``kind`` (``BASE``, ``ALIGNED``, ``MODEL``, ``ADAPTER``) names the argument in errors.
    Anything else (a missing path that is no hub id) is returned unchanged: the reader
    of that folder says what is wrong with it.
    """
    if isinstance(spec, Path) or os.path.exists(spec) or not looks_like_hub_id(spec):
        return Path(spec)
    return download_snapshot(os.fspath(spec), kind)


def cached_model_dir(spec: str | os.PathLike) -> Path | None:
    """The local folder of ``spec`` without fetching anything: an existing folder, or a hub id's
    snapshot already in the hub cache; None otherwise (e.g. an adapter's recorded base model
    that this machine has never seen)."""
    if os.path.isdir(spec):
        return Path(spec)
    if not looks_like_hub_id(spec):
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            os.fspath(spec), allow_patterns=list(HUB_PATTERNS), cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=True,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 -- any miss means "not cached here"
        return None
    return Path(folder)


def download_snapshot(repo_id: str, kind: str) -> Path:
    """``snapshot_download`` of :data:`HUB_PATTERNS`; every failure is one line naming the id."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=list(HUB_PATTERNS),
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # as set now, like HF_HUB_OFFLINE
            local_files_only=offline,
        )
    except GatedRepoError:
        raise InputError(
            f"{kind} {repo_id}: the hub repo is gated: accept its terms on huggingface.co, log in with "
            f"`hf auth login`, or fetch it first with `{fetch_command(repo_id)}` and pass DIR"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{kind} {repo_id}: no such folder, and no such model on the Hugging Face hub (or it is private: "
            "`hf auth login`)"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- the library's network errors have no common base
        # LocalEntryNotFoundError: an offline miss or an incomplete cached snapshot;
        # HfHubHTTPError: the hub answered with an error; httpx errors: a proxy, a lost connection.
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else _first_line(exc)
        raise InputError(
            f"{kind} {repo_id} is not a folder and the hub is unreachable ({why}): fetch it first with "
            f"`{fetch_command(repo_id)}` and pass DIR"
        ) from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
