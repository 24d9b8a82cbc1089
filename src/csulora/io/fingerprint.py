"""A fingerprint of a checkpoint folder: what statistics or caches computed from it belong to.

Statistics measured on one model (the calibration Grams, docs/design.md §5c) are wrong for
any other, silently: same shapes, different numbers. The fingerprint hashes every weight
file in full (sha256), the tokenizer files and the chat template, so a file computed from
one folder can name exactly what it was computed from, and a later run can refuse another.
Hashing reads the weights once (about a second per GB); it is done once per calibration.

An **update** has an identity too (:func:`update_fingerprint`): statistics measured on the
fine-tuned model (Antidote's, ``csulora calibrate ALIGNED --update UPDATE``) are wrong for any
other adapter or fine-tune of the same aligned model, again silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from csulora.errors import InputError
from csulora.io.checkpoints import find_safetensors_files

# Files that decide how text becomes token ids and how a chat is rendered.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_CHUNK = 1 << 22
# What decides an adapter's forward: its factors and the config that scales them (its README,
# report and training record do not count). tune's score cache keys adapters by the same files.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def file_sha256(path: Path) -> str:
    """The file's sha256, hashed once per process while its size, inode and mtime stay the same:
    `tune` checks one aligned model against a calibration file for every setting it writes, and
    a 7B model's weights take a minute to hash."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return _hashed(str(Path(path).resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _hashed(path: str, size: int, inode: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


def chat_template_of(folder: Path) -> str | None:
    """The chat template as transformers would use it (tokenizer_config.json or its own file)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            raise InputError(f"{config}: not valid JSON") from None
        return template if isinstance(template, str) else json.dumps(template, sort_keys=True) if template else None
    return None


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """``{"weights": {file: sha256}, "tokenizer": {file: sha256}, "chat_template": sha256|None, "digest": ...}``.

    ``digest`` is one sha256 over everything else: two folders with the same digest hold the
    same weights, tokenizer and chat template, whatever their paths.
    """
    folder = Path(model_dir)
    shards = sorted({path for path in find_safetensors_files(folder).values()})
    weights = {path.name: file_sha256(path) for path in shards}
    tokenizer = {name: file_sha256(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}
    template = chat_template_of(folder)
    record: dict[str, Any] = {
        "weights": weights,
        "tokenizer": tokenizer,
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
    }
    record["digest"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def adapter_digest(folder: str | os.PathLike) -> str:
    """One sha256 over an adapter folder's weights and config (:data:`ADAPTER_FILES`)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        digest.update(file_sha256(Path(folder) / name).encode())
    return digest.hexdigest()


def update_fingerprint(update_dir: str | os.PathLike) -> dict[str, Any]:
    """What an update is: ``{"kind": "adapter", "files": {name: sha256}, "digest": ...}`` for a PEFT
    adapter (:func:`adapter_digest`), ``{"kind": "checkpoint", **model_fingerprint}`` for a full
    fine-tune. Two folders with the same kind and digest are the same update, whatever their paths."""
    from csulora.io.input_kind import ADAPTER, input_kind

    folder = Path(update_dir)
    if input_kind(folder) == ADAPTER:
        files = {name: file_sha256(folder / name) for name in ADAPTER_FILES}
        return {"kind": "adapter", "files": files, "digest": adapter_digest(folder)}
    return {"kind": "checkpoint", **model_fingerprint(folder)}
