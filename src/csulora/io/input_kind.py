"""What a folder given as ADAPTER is: a PEFT LoRA adapter or a full checkpoint (docs/design.md §5d).

``audit``, ``correct`` and ``tune`` accept either: a PEFT adapter (its update is ``s B A``) or
a fully fine-tuned checkpoint (its update is the dense ``W_ft - W_aligned``). Recognition is by
the files the two formats always have:

- ``adapter_config.json`` -> an adapter (whatever else is in the folder);
- ``config.json`` with ``model*.safetensors`` (single file or shards) or
  ``model.safetensors.index.json``, and no ``adapter_config.json`` -> a checkpoint;
- anything else -> one line saying what was expected; pickled weights get the conversion hint.
"""

from __future__ import annotations

import os
from pathlib import Path

from csulora.errors import InputError
from csulora.io.checkpoints import CONFIG_JSON, CONVERT_HINT, PICKLED_SUFFIXES, SAFETENSORS_INDEX

ADAPTER = "adapter"
CHECKPOINT = "checkpoint"
ADAPTER_CONFIG = "adapter_config.json"
_CHECKPOINT_WEIGHTS = "model*.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local full-checkpoint folder (never raises: for dispatching)."""
    try:
        return input_kind(path) == CHECKPOINT
    except InputError:
        return False


def is_local_checkpoint(path: str | os.PathLike) -> bool:
    """The API's front door: True for a checkpoint folder; an existing folder that is neither
    kind is refused here in one line; a path that does not exist is left to the adapter path,
    whose reader says what is wrong (the API resolves hub ids to folders before asking)."""
    if not Path(path).exists():
        return False
    return input_kind(path) == CHECKPOINT


def input_kind(path: str | os.PathLike) -> str:
    """``"adapter"`` or ``"checkpoint"``; a one-line InputError for anything else."""
    folder = Path(path)
    if not folder.exists():
        raise InputError(f"{folder}: no such adapter or checkpoint folder")
    if folder.is_file():
        if folder.suffix in PICKLED_SUFFIXES:
            raise InputError(f"{folder}: pickled weights refused; {CONVERT_HINT}")
        raise InputError(f"{folder}: expected a PEFT adapter or checkpoint folder, got a file")
    if (folder / ADAPTER_CONFIG).is_file():
        return ADAPTER
    has_config = (folder / CONFIG_JSON).is_file()
    has_weights = (folder / SAFETENSORS_INDEX).is_file() or any(folder.glob(_CHECKPOINT_WEIGHTS))
    if has_config and has_weights:
        return CHECKPOINT
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise InputError(f"{folder}: only pickled weights found ({', '.join(pickled)}); {CONVERT_HINT}")
    if has_config:
        raise InputError(f"{folder}: has {CONFIG_JSON} but no model*.safetensors or {SAFETENSORS_INDEX}")
    raise InputError(
        f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter) and no {CONFIG_JSON} with model*.safetensors "
        "(not a checkpoint)"
    )
