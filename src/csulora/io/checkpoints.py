"""Hub-style checkpoint folders on disk, read lazily one tensor at a time.

Only safetensors are read: pickled formats (``.bin``, ``.pt``) can run code when loaded,
so they are refused with a hint instead of being unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from csulora.errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

CONVERT_HINT = (
    "csulora reads safetensors only (pickled weights can run code when loaded); convert once "
    "in a trusted environment with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
    "safe_serialization=True)`"
)


def find_safetensors_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name of a checkpoint folder to the shard file that holds it.

    Accepts a folder with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``. Refuses pickled-only folders with a hint.
    """
    folder = Path(model_dir)
    if not folder.exists():
        raise InputError(f"{folder}: no such checkpoint folder")
    if folder.is_file():
        if folder.suffix in PICKLED_SUFFIXES:
            raise InputError(f"{folder}: pickled checkpoint refused; {CONVERT_HINT}")
        raise InputError(f"{folder}: expected a checkpoint folder, got a file")
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a valid safetensors index ({exc})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise InputError(f"{index}: shard {shard.name} is listed but missing")
        return files
    single = folder / SINGLE_SAFETENSORS
    if single.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as handle:
                return {name: single for name in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise InputError(f"{single}: not a readable safetensors file ({exc})") from None
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise InputError(f"{folder}: only pickled weights found ({', '.join(pickled)}); {CONVERT_HINT}")
    raise InputError(f"{folder}: no {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX} found")
