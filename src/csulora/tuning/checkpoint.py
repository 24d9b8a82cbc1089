"""Corrections of a full fine-tune applied to a loaded model in memory (docs/design.md §5d).

``tune`` scores many settings of one method. For an adapter each setting is a small
corrected adapter attached with PEFT; for a full checkpoint a candidate folder per setting
would be a whole model (~14 GB at 7B), so instead the fine-tuned model is loaded once and
each setting's corrected weights are copied into it, scored, and the fine-tuned weights
read back from the checkpoint afterwards::

    model, tokenizer = load_model("ft/")
    with corrected_in_memory(model, "ft/", "resta", aligned="aligned/", base="base/", restore=1.0):
        ...  # score the corrected model
    # here the model is the fine-tuned one again

The weights are exactly those ``correct_adapter`` writes for a checkpoint (the same stream,
``csulora.pipeline.correction.Correction.weights``), one tensor at a time, so memory stays
the model plus one tensor triple. :func:`weights_from` does the same for another checkpoint
of the same architecture (the aligned model, scored as the reference).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.pipeline.correction import Correction, open_correction
from csulora.pipeline.options import SourcePaths
from csulora.errors import InputError
from csulora.io.checkpoints import CheckpointReader

PathLike = str | os.PathLike


def model_tensors(model: Any) -> dict[str, Tensor]:
    """The model's parameters and buffers by their checkpoint names (tied weights once).

    A layer PEFT has wrapped keeps its weight as ``<module>.base_layer.weight``; it is listed under
    the checkpoint's name ``<module>.weight`` too, so a correction reaches it in a model that has
    adapters attached (a dense correction of an adapter, scored by tune with the adapters off)."""
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    for name, tensor in list(tensors.items()):
        if ".base_layer." in name:
            tensors.setdefault(name.replace(".base_layer.", "."), tensor)
    return tensors


@torch.no_grad()
def copy_into(model: Any, named: Iterable[tuple[str, Tensor]], *, source: PathLike) -> list[str]:
    """Copy each ``(name, tensor)`` into the model's tensor of that name; the names copied.

    A name the model does not have is a one-line InputError naming ``source``.
    """
    tensors = model_tensors(model)
    copied = []
    for name, value in named:
        target = tensors.get(name)
        if target is None:
            raise InputError(f"{source}: tensor {name} has no counterpart in the loaded model")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        copied.append(name)
    return copied


def _read_back(model: Any, checkpoint: PathLike, names: list[str]) -> None:
    """Restore the named tensors from ``checkpoint`` (one at a time)."""
    with CheckpointReader(checkpoint) as reader:
        copy_into(model, ((name, reader.get(name, dtype=None)) for name in names), source=checkpoint)


@contextmanager
def corrected_in_memory(
    model: Any,
    update: PathLike,
    method: str,
    *,
    aligned: PathLike,
    restore_from: PathLike | None = None,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    calibration: PathLike | None = None,
    targets: Any = None,
    reset_others: bool = False,
    progress: bool = False,
    update_statistics: PathLike | None = None,
    **method_options: Any,
) -> Iterator[Correction]:
    """``model`` with one setting's corrected weights, restored on exit from ``restore_from``.

    ``update``: a full checkpoint (the model was loaded from it: ``restore_from`` defaults to it),
    or an adapter corrected by a dense-only method (``s B A``; the model is the aligned one, with
    its adapters off, and ``restore_from`` is ALIGNED). ``update_statistics``: the fine-tuned model's
    statistics (Antidote's), checked against ``update``. Yields the opened correction: its
    ``results`` hold each module's report. Options and inputs are checked as by
    ``correct_adapter`` before any weight of the model changes.
    """
    restore_from = update if restore_from is None else restore_from
    changed: list[str] = []
    try:
        with ExitStack() as stack:
            correction = _opened(stack, update, method, aligned=aligned, subspace=subspace, base=base,
                                 calibration=calibration, targets=targets, reset_others=reset_others,
                                 progress=progress, method_options=method_options,
                                 update_statistics=update_statistics)  # fmt: skip
            _apply(model, correction, restore_from, changed)
            yield correction
    finally:
        _read_back(model, restore_from, changed)


def _opened(stack: ExitStack, checkpoint: PathLike, method: str, *, aligned: PathLike, subspace: PathLike | None,
            base: PathLike | None, calibration: PathLike | None, targets: Any, reset_others: bool, progress: bool,
            method_options: Any, update_statistics: PathLike | None = None) -> Correction:  # fmt: skip
    paths = SourcePaths(subspace=subspace, base=base, aligned=aligned, calibration=calibration,
                        update_statistics=update_statistics)  # fmt: skip
    return open_correction(stack, Path(checkpoint), method, paths=paths, targets=targets, reset_others=reset_others,
                           method_options=method_options, progress=progress)  # fmt: skip


def _apply(model: Any, correction: Correction, checkpoint: PathLike, changed: list[str]) -> list[str]:
    def tracked() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in correction.weights():
            changed.append(name)  # recorded before the copy: a failure half-way still restores it
            yield name, tensor

    copy_into(model, tracked(), source=checkpoint)
    return changed


def correct_loaded_model(model: Any, checkpoint: PathLike, method: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Correct ``model`` (loaded from ``checkpoint``) in place, for good: each module's report.

    The keyword arguments are those of :func:`corrected_in_memory`. For evaluating one
    setting without writing a checkpoint (the SmolLM2 pipeline's rows).
    """
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SOURCE_KWARGS}
    kwargs.setdefault("progress", False)
    with ExitStack() as stack:
        sources = {k: kwargs.get(k) for k in ("subspace", "base", "calibration", "targets", "update_statistics")}
        correction = _opened(stack, checkpoint, method, aligned=kwargs["aligned"], reset_others=kwargs.get("reset_others", False),
                             progress=kwargs["progress"], method_options=options, **sources)  # fmt: skip
        _apply(model, correction, checkpoint, [])
        return {name: result.report for name, result in correction.results.items()}


_SOURCE_KWARGS = ("aligned", "subspace", "base", "calibration", "targets", "reset_others", "progress", "update_statistics")


@contextmanager
def weights_from(model: Any, source: PathLike, *, restore_from: PathLike) -> Iterator[None]:
    """``model`` with every tensor of checkpoint ``source`` (e.g. the aligned model), then
    ``restore_from``'s tensors (the checkpoint the model was loaded from) on exit."""
    names: list[str] = []
    try:
        with CheckpointReader(source) as reader:
            names = reader.keys()
            copy_into(model, ((name, reader.get(name, dtype=None)) for name in names), source=source)
        yield
    finally:
        _read_back(model, restore_from, names)


def same_weights(model: Any, checkpoint: PathLike) -> bool:
    """Whether every tensor of ``checkpoint`` equals the model's (tests and sanity checks)."""
    tensors = model_tensors(model)
    with CheckpointReader(Path(checkpoint)) as reader:
        return all(
            torch.equal(tensors[name].detach().cpu(), reader.get(name, dtype=None).to(tensors[name].dtype))
            for name in reader.keys()
        )
