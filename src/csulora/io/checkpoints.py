"""Hub-style checkpoint folders on disk, read lazily one tensor at a time.

Only safetensors are read: pickled formats (``.bin``, ``.pt``) can run code when loaded,
so they are refused with a hint instead of being unpickled.

The reader follows mergekit's lazy loader: each shard is opened once with ``safe_open``
(a memory map, nothing read yet) and tensors are materialised one at a time on request,
so the peak memory of streaming two checkpoints is one pair of tensors, never two models.
Every tensor handed out is checked for NaN/Inf, and every problem (a truncated shard, a
tensor missing from its shard, a shape mismatch) is one line naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.errors import EXCERPT_CHARS, InputError, OptionError, excerpt
from csulora.linalg.lowrank import small_math

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
CONFIG_JSON = "config.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Input dtypes we read; everything is computed in float32 (float64 for small LoRA math).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

CONVERT_HINT = (
    "csulora reads safetensors only (pickled weights can run code when loaded); convert once "
    "in a trusted environment with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
    "safe_serialization=True)`"
)

# A decoder block's tensors carry the block index as a path segment: model.layers.3.mlp...
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


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


def open_safetensors(path: Path) -> Any:
    """``safe_open`` one file, turning header/truncation errors into one-line InputErrors.

    safetensors checks at open time that the header is valid and that the data section
    covers the whole file, so a truncated or corrupt shard fails here, before any math.
    """
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:
        raise InputError(f"{path}: truncated or corrupt safetensors file ({_one_line(exc)})") from None


def check_finite(tensor: Tensor, path: Path | str, name: str) -> None:
    """Refuse NaN/Inf: they would silently poison every norm and SVD downstream.

    Fast path: any NaN/Inf makes the float32 sum non-finite, and the sum needs no
    tensor-sized boolean mask (the exact check cost half of a 7B Safe LoRA run). Only a
    non-finite sum — a bad value, or an overflow of large finite ones — pays the exact check.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise InputError(f"{path}: tensor {name} contains {bad} values")


def read_tensor(
    handle: Any, path: Path, name: str, dtype: torch.dtype | None = torch.float32, *, finite_check: bool = True
) -> Tensor:
    """Read one tensor from an open file, check it is finite, cast it (None keeps the dtype).

    ``finite_check=False`` is for callers that check a result computed from the tensor
    instead (:func:`read_displacement` checks D, which any NaN/Inf of its inputs reaches).
    """
    try:
        tensor = handle.get_tensor(name)
    except Exception as exc:
        raise InputError(f"{path}: cannot read tensor {name} ({_one_line(exc)})") from None
    if tensor.is_floating_point() and tensor.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{path}: tensor {name} has unsupported dtype {tensor.dtype} (fp32/fp16/bf16 only)")
    if finite_check:
        check_finite(tensor, path, name)
    return tensor if dtype is None else tensor.to(dtype)


class CheckpointReader:
    """Lazy, shard-aware access to one checkpoint folder.

    ``reader.get(name)`` reads a single tensor (float32 by default); shapes and dtypes
    come from the headers without reading data, so every consistency check can run
    before the first byte of weights is loaded. Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, model_dir: str | Path):
        self.folder = Path(model_dir)
        self.files = find_safetensors_files(self.folder)
        self._handles: dict[Path, Any] = {}
        self._config: dict[str, Any] | None = None

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their memory map when dropped

    # -- metadata (headers only) ---------------------------------------------------------
    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            handle = open_safetensors(path)
            self._handles[path] = handle
        return handle

    def _file_of(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise InputError(f"{self.folder}: no tensor {name} in this checkpoint") from None

    def keys(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def _slice(self, name: str) -> Any:
        path = self._file_of(name)
        handle = self._handle(path)
        try:
            return handle.get_slice(name)
        except Exception:
            raise InputError(f"{path}: tensor {name} is listed in the index but missing from the shard") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors names it (F32, F16, BF16, ...)."""
        return str(self._slice(name).get_dtype())

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` of the folder ({} when absent: bare safetensors dumps are allowed)."""
        if self._config is None:
            path = self.folder / CONFIG_JSON
            if not path.exists():
                self._config = {}
            else:
                try:
                    self._config = json.loads(path.read_text())
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: not valid JSON ({exc})") from None
                if not isinstance(self._config, dict):
                    raise InputError(f"{path}: expected a JSON object")
        return self._config

    # -- data ------------------------------------------------------------------------------
    def get(self, name: str, dtype: torch.dtype | None = torch.float32, *, finite_check: bool = True) -> Tensor:
        """Read one tensor, check it for NaN/Inf, cast to ``dtype`` (None keeps the stored one).

        When no cast happens the result is a view of the file's copy-on-write memory map:
        treat it as read-only (an in-place edit would show up in later reads of this handle).
        ``finite_check=False`` leaves the NaN/Inf check to the caller (see :func:`read_tensor`).
        """
        path = self._file_of(name)
        self._slice(name)  # a clear message when the index lies about the shard's contents
        return read_tensor(self._handle(path), path, name, dtype, finite_check=finite_check)


# -- module names ---------------------------------------------------------------------------
def weight_name(module: str) -> str:
    """Tensor name of a linear module's weight: ``model.layers.0.self_attn.q_proj.weight``."""
    return f"{module}.weight"


def target_list(targets: Iterable[str] | str | None) -> list[str] | None:
    """``--targets`` as a list; a comma-separated string (the CLI spelling) is accepted too."""
    if targets is None:
        return None
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = [str(t).strip() for t in items if str(t).strip()]
    if not cleaned:
        raise OptionError("--targets is empty")
    return cleaned


def matches_target(module: str, targets: Iterable[str] | None) -> bool:
    """PEFT-style target matching: the full name, or its last dotted components."""
    if targets is None:
        return True
    return any(module == t or module.endswith("." + t) for t in targets)


def decoder_linear_modules(reader: CheckpointReader, targets: Iterable[str] | None = None) -> list[str]:
    """Linear layers inside decoder blocks (2-D ``*.N.*.weight`` tensors), naturally sorted.

    Embeddings, the LM head and norms are outside the blocks or 1-D, so they never count.
    """
    target_list = list(targets) if targets is not None else None
    modules = []
    for name in reader.keys():
        if not name.endswith(".weight") or not _BLOCK_INDEX.search(name):
            continue
        module = name[: -len(".weight")]
        if "embed" in module.split(".")[-1]:
            continue
        if len(reader.shape(name)) != 2:
            continue
        if matches_target(module, target_list):
            modules.append(module)
    return sorted(modules, key=natural_key)


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.2`` before ``layers.10`` so reports read top to bottom."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_index(module: str) -> int | None:
    """The decoder block index of a module name (None outside the blocks)."""
    match = _BLOCK_INDEX.search(module)
    return int(match.group(1)) if match else None


# -- base vs aligned ---------------------------------------------------------------------------
def check_same_architecture(base: CheckpointReader, aligned: CheckpointReader, modules: Iterable[str]) -> None:
    """Refuse base/aligned pairs that are not the same architecture, before reading weights.

    Compares ``config.json`` (model_type and the shape-defining sizes) when both folders
    have one, then every target weight's presence and shape from the headers.
    """
    _check_configs(base, aligned)
    for module in modules:
        name = weight_name(module)
        if name not in base:
            raise InputError(f"{base.folder}: no tensor {name} (module {module} is missing from the base model)")
        if name not in aligned:
            raise InputError(f"{aligned.folder}: no tensor {name} (module {module} is missing from the aligned model)")
        b_shape, a_shape = base.shape(name), aligned.shape(name)
        if b_shape != a_shape:
            raise InputError(
                f"{aligned.folder}: tensor {name} has shape {list(a_shape)} but the base model "
                f"({base.folder}) has {list(b_shape)}"
            )


_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def _check_configs(base: CheckpointReader, aligned: CheckpointReader) -> None:
    b_cfg, a_cfg = base.config, aligned.config
    if not b_cfg or not a_cfg:
        return
    for key in _ARCH_KEYS:
        if key in b_cfg and key in a_cfg and b_cfg[key] != a_cfg[key]:
            raise InputError(
                f"{aligned.folder / CONFIG_JSON}: different architecture from the base model: "
                f"{key} is {a_cfg[key]!r} vs {b_cfg[key]!r} in {base.folder / CONFIG_JSON}"
            )


# Elements per block when D is formed: a block of D plus the converted base block stay in
# the core's cache (2 x 512 KB of float32) while they are subtracted and summed.
_DISPLACEMENT_BLOCK_ELEMENTS = 1 << 17


def read_displacement(base: CheckpointReader, aligned: CheckpointReader, module: str) -> Tensor:
    """``D = W_aligned - W_base`` for one module, in float32, one tensor pair in memory.

    D is filled one block of rows at a time (convert both inputs, subtract, while the
    block is in cache), never through a whole float32 copy of either input. The NaN/Inf
    check is made once, on D's block sums, as D is formed: a NaN or Inf in either input
    reaches D, and checking the two stored tensors separately (bf16 sums are slow on CPU)
    cost a third of a 7B Safe LoRA run (docs/benchmarks.md). Only a non-finite sum pays
    the exact checks, which name the tensor at fault.
    """
    name = weight_name(module)
    w_base = base.get(name, dtype=None, finite_check=False)
    w_aligned = aligned.get(name, dtype=None, finite_check=False)
    if w_base.shape != w_aligned.shape:
        raise InputError(
            f"{aligned.folder}: tensor {name} has shape {list(w_aligned.shape)} but the base model "
            f"has {list(w_base.shape)}"
        )
    displacement = torch.empty(w_aligned.shape, dtype=torch.float32)
    # Stored tensors are contiguous: view every shape as rows (a 1-D weight is one row).
    D_rows = displacement.view(-1, w_aligned.shape[-1]) if w_aligned.dim() else displacement.view(1, 1)
    base_rows, aligned_rows = w_base.reshape(D_rows.shape), w_aligned.reshape(D_rows.shape)
    step = max(1, _DISPLACEMENT_BLOCK_ELEMENTS // max(1, D_rows.shape[1]))
    scratch = torch.empty(min(step, D_rows.shape[0]), D_rows.shape[1], dtype=torch.float32)
    total = 0.0
    with small_math():  # thousands of cache-sized ops: one thread (csulora.linalg.lowrank)
        for start in range(0, D_rows.shape[0], step):
            block = D_rows[start : start + step]
            converted = scratch[: block.shape[0]]
            block.copy_(aligned_rows[start : start + step])  # the stored tensors are never written
            converted.copy_(base_rows[start : start + step])
            block.sub_(converted)
            total += float(block.sum())
    if not math.isfinite(total):
        _refuse_non_finite(displacement, (base, w_base), (aligned, w_aligned), name=name)
    return displacement


def _refuse_non_finite(
    displacement: Tensor, *pairs: tuple[CheckpointReader, Tensor], name: str
) -> None:
    """Name the input with NaN/Inf values, or D's overflow; return if D is finite after all.

    A finite D can have a non-finite sum (huge entries whose sum overflows float32).
    """
    if bool(torch.isfinite(displacement).all()):
        return
    for reader, tensor in pairs:
        check_finite(tensor, reader.files[name], name)
    raise InputError(
        f"{pairs[-1][0].folder}: tensor {name} minus the base model's overflows float32 (values near 3e38)"
    )


def _one_line(exc: BaseException) -> str:
    # safetensors quotes the header it could not parse (its list of dtypes, a key): cut it short.
    return excerpt(exc, 2 * EXCERPT_CHARS)
