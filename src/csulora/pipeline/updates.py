"""The two kinds of update the pipeline corrects, behind one interface (docs/design.md §5d, §9).

- :class:`AdapterUpdate`: a PEFT LoRA folder; a module's update is the **factored**
  ``dW = s B A`` (small: the whole adapter is read at once);
- :class:`CheckpointUpdate`: a fully fine-tuned checkpoint; a module's update is the **dense**
  ``dW = W_ft - W_aligned``, formed by blocks from two memory maps when asked for, one module at a
  time. Tensors outside the targets (embeddings, norms, LM head) are measured, not corrected.

Which kind a folder is, is decided once by ``csulora.io.input_kind``. The pipeline asks an
update for its modules, their shapes, the order to stream them in (the order the output is
written), and each module's update in its form; everything else is shared.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.errors import InputError, OptionError
from csulora.io.adapters import LoraAdapter, read_adapter
from csulora.io.checkpoint_writer import CheckpointLayout, read_checkpoint_layout
from csulora.io.checkpoints import (
    CONFIG_JSON,
    CheckpointReader,
    check_finite,
    decoder_linear_modules,
    matches_target,
    read_displacement,
    weight_name,
)
from csulora.io.input_kind import ADAPTER, CHECKPOINT
from csulora.linalg.lowrank import rows_per_block
from csulora.types import LoraUpdate

FACTORED = "factored"  # LoRA factors: ModuleInput / ModuleResult
DENSE = "dense"  # an m x n update: DenseModuleInput / DenseModuleResult
# config.json keys that fix the tensors' shapes: a fine-tune of another model is refused on them.
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


class Update(ABC):
    """What is corrected: one kind of update, opened (headers and memory maps only)."""

    kind: str  # ADAPTER or CHECKPOINT (csulora.io.input_kind)
    form: str  # FACTORED or DENSE
    path: Path

    @abstractmethod
    def modules(self) -> list[str]:
        """Every module the update changes that a method may correct, in report order."""

    @abstractmethod
    def shape(self, module: str) -> tuple[int, int]:
        """``(out, in)`` of the weight a module's update applies to."""

    @abstractmethod
    def read(self, module: str) -> LoraUpdate | Tensor:
        """One module's update in the update's form (factors float64; a dense dW float32)."""

    @abstractmethod
    def where(self, module: str) -> str:
        """The file that holds a module's update, for messages."""

    def select(self, targets: Sequence[str] | None) -> list[str]:
        """The modules matching ``targets`` (all when None); OptionError when none does."""
        names = [name for name in self.modules() if matches_target(name, targets)]
        if not names:
            what = f"--targets {','.join(targets or [])} matches no module of" if targets else "no module to correct in"
            raise OptionError(f"{what} {self.path}")
        return names

    def stream_order(self, modules: Sequence[str]) -> list[str]:
        """The order the output is written in (report order unless the kind says otherwise)."""
        return list(modules)

    def check(self, modules: Sequence[str]) -> None:
        """Kind-specific checks of the targets before any weight is read (none by default)."""


class AdapterUpdate(Update):
    """A PEFT LoRA adapter read into memory (factors only: small)."""

    kind, form = ADAPTER, FACTORED

    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter
        self.path = adapter.path

    def modules(self) -> list[str]:
        return list(self.adapter.modules)

    def shape(self, module: str) -> tuple[int, int]:
        return self.adapter.modules[module].shape

    def read(self, module: str) -> LoraUpdate:
        return self.adapter.modules[module].update()

    def where(self, module: str) -> str:
        return str(self.adapter.weights_file)

    @property
    def recorded_base(self) -> str | None:
        """The model the adapter says it was trained on (``base_model_name_or_path``)."""
        return self.adapter.config.get("base_model_name_or_path")


class CheckpointUpdate(Update):
    """A fully fine-tuned checkpoint against its aligned model: dense ``dW`` per target module."""

    kind, form = CHECKPOINT, DENSE

    def __init__(self, finetuned: CheckpointReader, layout: CheckpointLayout, aligned: CheckpointReader,
                 aligned_layout: CheckpointLayout) -> None:  # fmt: skip
        self.finetuned, self.layout = finetuned, layout
        self.aligned, self.aligned_layout = aligned, aligned_layout
        self.path = Path(finetuned.folder)

    def modules(self) -> list[str]:
        return decoder_linear_modules(self.finetuned)

    def select(self, targets: Sequence[str] | None) -> list[str]:
        modules = decoder_linear_modules(self.finetuned, targets)
        if not modules:
            what = f"matching --targets {','.join(targets)}" if targets else "inside the decoder blocks"
            raise OptionError(f"{self.finetuned.folder}: no linear layers {what}")
        return modules

    def shape(self, module: str) -> tuple[int, int]:
        return tuple(self.finetuned.shape(weight_name(module)))  # type: ignore[return-value]

    def read(self, module: str) -> Tensor:
        return read_displacement(self.aligned, self.finetuned, module)  # W_ft - W_aligned, by blocks

    def where(self, module: str) -> str:
        return str(self.finetuned.files[weight_name(module)])

    def stream_order(self, modules: Sequence[str]) -> list[str]:
        """Targets in the order the shards hold them: the writer walks the shards once."""
        wanted = {weight_name(m): m for m in modules}
        return [wanted[name] for name in self.layout.tensor_names() if name in wanted]

    def unchanged(self, module: str) -> Tensor | None:
        """The update to write where a method left a module as it was: None, the fine-tuned tensor's
        own bytes are copied (a densified adapter has none: its ``s B A`` is formed again)."""
        return None

    def untargeted_names(self, modules: Sequence[str]) -> list[str]:
        targets = {weight_name(m) for m in modules}
        return [name for name in self.layout.tensor_names() if name not in targets]

    def check(self, modules: Sequence[str]) -> None:
        """The fine-tune and the aligned model hold the same tensors with the same shapes (headers only)."""
        ft, al = self.finetuned, self.aligned
        for key in _ARCH_KEYS:
            if key in ft.config and key in al.config and ft.config[key] != al.config[key]:
                raise InputError(
                    f"{ft.folder / CONFIG_JSON}: different architecture from the aligned model: {key} is "
                    f"{ft.config[key]!r} vs {al.config[key]!r} in {al.folder / CONFIG_JSON}"
                )
        for name in ft.keys():
            if name not in al:
                raise InputError(f"{ft.files[name]}: tensor {name} has no counterpart in the aligned model {al.folder}")
            if ft.shape(name) != al.shape(name):
                raise InputError(
                    f"{ft.files[name]}: tensor {name} has shape {list(ft.shape(name))} but the aligned model "
                    f"({al.files[name]}) has {list(al.shape(name))}"
                )
        extra = [name for name in al.keys() if name not in ft]
        if extra:
            raise InputError(f"{al.files[extra[0]]}: tensor {extra[0]} of the aligned model is missing from {ft.folder}")
        for module in modules:
            name = weight_name(module)
            for reader in (ft, al):
                if reader.dtype_name(name) not in ("F32", "F16", "BF16", "F64"):
                    raise InputError(f"{reader.files[name]}: tensor {name} has dtype {reader.dtype_name(name)} (float only)")

    def untargeted(self, name: str) -> dict[str, Any]:
        """How a tensor outside the targets moved: ``||W_ft - W_aligned|| / ||W_aligned||``.

        Both are memory-map views, compared by blocks; a NaN/Inf in either makes the sums
        non-finite, and only then are they checked whole (naming the file and tensor).
        """
        ft = self.finetuned.get(name, dtype=None, finite_check=False)
        al = self.aligned.get(name, dtype=None, finite_check=False)
        rel, changed = relative_change(ft, al)
        if rel is not None and not math.isfinite(rel) or (rel is None and ft.is_floating_point() and changed):
            for reader, tensor in ((self.finetuned, ft), (self.aligned, al)):
                check_finite(tensor, reader.files[name], name)
        return {"tensor": name, "shape": list(ft.shape), "rel_change": rel, "changed": changed}


class DensifiedAdapter(CheckpointUpdate):
    """A LoRA adapter seen as the dense update ``s B A`` it adds to the aligned model, for a method
    with only a dense form (Safe Delta, issue 22). The corrected update is no LoRA any more: the
    output is the corrected model (the aligned model's shards, its targets ``W_aligned + X``), or,
    with ``lora_rank``, its best rank-r LoRA (:func:`csulora.pipeline.correction.refactored`)."""

    kind, form = ADAPTER, DENSE

    def __init__(self, adapter: LoraAdapter, aligned: CheckpointReader, aligned_layout: CheckpointLayout) -> None:
        super().__init__(aligned, aligned_layout, aligned, aligned_layout)
        self.adapter = adapter
        self.path = adapter.path

    @property
    def recorded_base(self) -> str | None:
        return self.adapter.config.get("base_model_name_or_path")

    def modules(self) -> list[str]:
        return list(self.adapter.modules)

    def select(self, targets: Sequence[str] | None) -> list[str]:
        return Update.select(self, targets)

    def shape(self, module: str) -> tuple[int, int]:
        return self.adapter.modules[module].shape

    def read(self, module: str) -> Tensor:
        update = self.adapter.modules[module].update()  # float64 factors
        return (update.scale * (update.B @ update.A)).to(torch.float32)

    def where(self, module: str) -> str:
        return str(self.adapter.weights_file)

    def check(self, modules: Sequence[str]) -> None:
        """Every adapted module is a weight of the aligned model with the adapter's shape."""
        for module in modules:
            name = weight_name(module)
            if name not in self.aligned:
                raise InputError(f"{self.adapter.weights_file}: module {module} has no weight {name} in {self.aligned.folder}")
            if tuple(self.aligned.shape(name)) != self.shape(module):
                raise InputError(
                    f"{self.adapter.weights_file}: module {module} updates a {list(self.shape(module))} weight but "
                    f"{self.aligned.files[name]} has {list(self.aligned.shape(name))}"
                )

    def unchanged(self, module: str) -> Tensor:
        return self.read(module)  # W_aligned + s B A: the adapter merged, as the method left it

    def untargeted(self, name: str) -> dict[str, Any]:
        """The aligned model's other tensors are copied as they are: unchanged by the adapter."""
        return {"tensor": name, "shape": list(self.aligned.shape(name)), "rel_change": 0.0, "changed": False}


def relative_change(new: Tensor, old: Tensor) -> tuple[float | None, bool]:
    """``(||new - old|| / ||old||, new != old)`` by blocks of rows (None when ``old`` is 0 or not float)."""
    if not new.is_floating_point():
        return None, not torch.equal(new, old)
    rows = new.shape[0] if new.dim() else 1
    a, b = new.reshape(rows, -1), old.reshape(rows, -1)
    diff_sq = ref_sq = 0.0
    step = rows_per_block(a.shape[1])
    for start in range(0, a.shape[0], step):
        x, y = a[start : start + step].to(torch.float32), b[start : start + step].to(torch.float32)
        diff_sq += float((x - y).square().sum(dtype=torch.float64))
        ref_sq += float(y.square().sum(dtype=torch.float64))
    changed = diff_sq > 0.0
    if ref_sq == 0.0:
        return (0.0 if not changed else None), changed
    return math.sqrt(diff_sq / ref_sq), changed


def open_update(stack: ExitStack, path: Path, kind: str, aligned: CheckpointReader | None, *,
                dense: bool = False) -> Update:  # fmt: skip
    """Open ``path`` as its kind; a checkpoint needs the aligned model's reader (already open).

    ``dense``: an adapter for a method with only a dense form, seen as ``s B A`` (needs ALIGNED)."""
    if kind == ADAPTER and dense:
        assert aligned is not None
        return DensifiedAdapter(read_adapter(path), aligned, read_checkpoint_layout(aligned.folder))
    if kind == ADAPTER:
        return AdapterUpdate(read_adapter(path))
    assert kind == CHECKPOINT and aligned is not None
    layout = read_checkpoint_layout(path)  # missing/truncated shards, pickles: refused here
    aligned_layout = read_checkpoint_layout(aligned.folder)
    finetuned = stack.enter_context(CheckpointReader(path))
    return CheckpointUpdate(finetuned, layout, aligned, aligned_layout)
