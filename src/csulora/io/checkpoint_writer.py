"""Write a full checkpoint with the same shard layout as another, one tensor at a time.

A corrected full fine-tune (docs/design.md §5d) must load like the input it came from: the
same shard files (``model.safetensors`` or ``model-0000i-of-0000n.safetensors``), the same
``model.safetensors.index.json`` weight map, the same tensor order, dtypes and safetensors
metadata, and the config, generation config and tokenizer files beside them.

The safetensors format is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw data. :class:`ShardWriter` computes the
header from the planned tensors first, then appends each tensor as it arrives, so writing a
shard holds one tensor at a time (``safetensors.torch.save_file`` needs them all in a dict).
Tensors that are copied rather than recomputed (embeddings, norms, the LM head, unchanged
modules) are copied as raw bytes from the source shard, in chunks: byte for byte, and never
materialised as tensors. Output bytes are deterministic (no timestamps, fixed JSON layout).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from csulora.errors import InputError
from csulora.io.adapters import DEFAULT_REPORT_NAME, is_sidecar_file
from csulora.io.checkpoints import (
    CONFIG_JSON,
    PICKLED_SUFFIXES,
    SAFETENSORS_INDEX,
    find_safetensors_files,
    open_safetensors,
)

HEADER_SIZE_BYTES = 8
HEADER_ALIGNMENT = 8  # the header is padded with spaces so the data that follows is aligned
_COPY_CHUNK = 8 << 20  # bytes per read when copying a tensor's raw data
# safetensors dtype names of the float types csulora computes with (integer tensors are only copied).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Weight files of any format: never copied (a stale copy of the uncorrected weights would be
# loaded instead by some tools) and not listed as "not copied" either.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".ot", *PICKLED_SUFFIXES)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard as its header describes it (offsets into the data section)."""

    name: str
    dtype: str  # safetensors' name: F32, F16, BF16, I64, ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardLayout:
    """A safetensors file's header: its metadata and its tensors in data order."""

    path: Path
    metadata: dict[str, str] | None
    entries: tuple[TensorEntry, ...]
    data_start: int  # file offset of the data section

    def entry(self, name: str) -> TensorEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise InputError(f"{self.path}: no tensor {name} in this shard")


@dataclass(frozen=True)
class CheckpointLayout:
    """Every shard of a checkpoint folder, in file-name order, and its index (None: one file)."""

    folder: Path
    shards: tuple[ShardLayout, ...]
    index: dict[str, Any] | None

    def tensor_names(self) -> list[str]:
        return [entry.name for shard in self.shards for entry in shard.entries]

    def locate(self, name: str) -> tuple[ShardLayout, TensorEntry]:
        for shard in self.shards:
            for entry in shard.entries:
                if entry.name == name:
                    return shard, entry
        raise InputError(f"{self.folder}: no tensor {name} in this checkpoint")


def read_shard_layout(path: Path) -> ShardLayout:
    """Parse one shard's header; a truncated or corrupt file is a one-line InputError.

    ``safe_open`` checks first that the header is valid and the data covers the whole file.
    """
    open_safetensors(path)  # raises the one-line error for truncated/corrupt files
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(HEADER_SIZE_BYTES))
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None)
    entries = sorted(
        (
            TensorEntry(name, info["dtype"], tuple(int(d) for d in info["shape"]), *map(int, info["data_offsets"]))
            for name, info in header.items()
        ),
        key=lambda e: e.start,
    )
    return ShardLayout(path=path, metadata=metadata, entries=tuple(entries), data_start=HEADER_SIZE_BYTES + length)


def read_checkpoint_layout(folder: str | Path) -> CheckpointLayout:
    """The layout of a checkpoint folder (every shard's header read; no tensor data).

    Refuses pickled-only folders, shards the index lists but that are missing, truncated
    shards, and tensors the index places in a shard that does not hold them.
    """
    folder = Path(folder)
    files = find_safetensors_files(folder)
    shards = {path: read_shard_layout(path) for path in sorted(set(files.values()))}
    for name, path in files.items():
        if not any(entry.name == name for entry in shards[path].entries):
            raise InputError(f"{path}: tensor {name} is listed in the index but missing from the shard")
    index = None
    if (folder / SAFETENSORS_INDEX).exists():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
    return CheckpointLayout(folder=folder, shards=tuple(shards.values()), index=index)


@dataclass(frozen=True)
class PlannedTensor:
    """What one tensor of an output shard will be: known before any data is written."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class ShardWriter:
    """Write one safetensors file tensor by tensor, in the planned order.

    The header is written first (all offsets follow from the planned sizes); then each tensor
    is either written from memory (:meth:`write_tensor`) or copied as raw bytes from a
    source shard (:meth:`copy_tensor`). :meth:`close` checks that every planned tensor came.
    """

    def __init__(self, path: Path, planned: Sequence[PlannedTensor], metadata: dict[str, str] | None) -> None:
        self.path = path
        self._planned = list(planned)
        self._next = 0
        header: dict[str, Any] = {}
        if metadata is not None:
            header["__metadata__"] = metadata
        offset = 0
        for item in self._planned:
            header[item.name] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
        self.total_bytes = offset
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def _expect(self, name: str) -> PlannedTensor:
        """The next planned tensor, which must be ``name`` (counted once its bytes are written)."""
        if self._next >= len(self._planned):
            raise ValueError(f"{self.path}: tensor {name} is not planned for this shard")
        item = self._planned[self._next]
        if item.name != name:
            raise ValueError(f"{self.path}: expected tensor {item.name} next, got {name}")
        return item

    def write_tensor(self, name: str, tensor: Tensor) -> None:
        """Append a tensor from memory; its dtype and shape must be the planned ones."""
        item = self._expect(name)
        expected = TORCH_DTYPES.get(item.dtype)
        if tensor.dtype != expected or tuple(tensor.shape) != item.shape:
            raise ValueError(
                f"{self.path}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned {item.dtype} {list(item.shape)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def copy_tensor(self, name: str, source: ShardLayout, entry: TensorEntry) -> None:
        """Append a tensor as the raw bytes it has in ``source`` (byte for byte)."""
        item = self._expect(name)
        if entry.nbytes != item.nbytes:
            raise ValueError(f"{self.path}: tensor {name} has {entry.nbytes} bytes in {source.path}, planned {item.nbytes}")
        with open(source.path, "rb") as src:
            src.seek(source.data_start + entry.start)
            left = entry.nbytes
            while left > 0:
                chunk = src.read(min(_COPY_CHUNK, left))
                if not chunk:
                    raise InputError(f"{source.path}: tensor {name} ends early (truncated file)")
                self._file.write(chunk)
                left -= len(chunk)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._planned):
            missing = self._planned[self._next].name
            raise ValueError(f"{self.path}: {len(self._planned) - self._next} planned tensors never written ({missing}, ...)")

    def abort(self) -> None:
        self._file.close()


def write_index(out_folder: Path, layout: CheckpointLayout, total_size: int) -> Path | None:
    """The source's ``model.safetensors.index.json`` with the new total size (None: one file)."""
    if layout.index is None:
        return None
    index = dict(layout.index)
    index["metadata"] = {**dict(index.get("metadata") or {}), "total_size": total_size}
    path = out_folder / SAFETENSORS_INDEX
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def copy_side_files(source: Path, out_folder: Path) -> list[str]:
    """Copy the files that travel with the weights: ``config.json`` and the sidecar files of
    :func:`csulora.io.adapters.is_sidecar_file` (generation config, tokenizer, chat template).

    Not the input's model card or training record (they describe the fine-tune, not this
    output), never weights of any format (uncorrected copies) or csulora reports. Returns the
    names copied.
    """
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name == CONFIG_JSON or is_sidecar_file(path.name)):
            shutil.copyfile(path, out_folder / path.name)
            copied.append(path.name)
    return copied


def files_not_copied(source: Path) -> list[str]:
    """The input's other files (model card, training record, ...), to name in the new card."""
    return [
        path.name
        for path in sorted(source.iterdir())
        if path.is_file()
        and not path.name.startswith(".")
        and path.name not in (CONFIG_JSON, SAFETENSORS_INDEX, DEFAULT_REPORT_NAME)
        and not is_sidecar_file(path.name)
        and path.suffix not in _WEIGHT_SUFFIXES
    ]
