"""What ``calibrate --update`` reads, checked before any model is loaded (docs/design.md §5c, docs/peers.md).

- **the update**: a PEFT adapter trained on ALIGNED, or a full fine-tune of it
  (:mod:`csulora.io.input_kind` decides which); an adapter must fit ALIGNED (every adapted
  module a weight of ALIGNED with the adapter's shape), a checkpoint must hold every target
  with ALIGNED's shape;
- **the targets**: by default the adapter's modules (Antidote prunes their factors) or, for a
  checkpoint, every linear layer of ALIGNED's decoder blocks; ``targets`` names them as for
  ``calibrate``;
- **the pairs**: JSONL of ``{"prompt", "response"}``, each a harmful prompt followed by a
  harmful answer (Antidote's realignment data; nothing is generated), neither empty, and no
  prompt one that ``tune`` or ``eval`` scores (the rule of every calibration set).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from csulora.errors import InputError
from csulora.eval.prompts import PYRIT_INSTALL, Prompt
from csulora.io.adapters import read_adapter
from csulora.io.checkpoints import CheckpointReader, find_safetensors_files, weight_name
from csulora.io.input_kind import ADAPTER, input_kind
from csulora.io.jsonl import read_jsonl
from csulora.references.calibration.data import pyrit_installed, target_modules

PAIR_FIELDS = ("prompt", "response")


@dataclass(frozen=True)
class UpdateInputs:
    """Everything ``calibrate_update`` reads, checked."""

    aligned: Path  # the local folder (a hub id resolved)
    aligned_given: str  # ALIGNED as the user gave it
    update: Path
    kind: str  # csulora.io.input_kind.ADAPTER or CHECKPOINT
    modules: list[str]
    pairs_file: Path
    prompts: list[Prompt]
    responses: list[str]

    @property
    def model_dir(self) -> Path:
        """The folder whose model (and tokenizer) runs: ALIGNED under an adapter, else the checkpoint."""
        return self.aligned if self.kind == ADAPTER else self.update


def read_update_inputs(
    aligned: Path, aligned_given: str, update: Path, pairs: str | os.PathLike, targets: Iterable[str] | str | None
) -> UpdateInputs:
    """The update's kind and modules, checked against ALIGNED's headers, and the pairs."""
    kind = input_kind(update)  # one line when it is neither an adapter nor a checkpoint
    find_safetensors_files(aligned)
    if kind == ADAPTER:
        adapter = read_adapter(update)
        shapes = {name: module.shape for name, module in adapter.modules.items()}
        check_fits_aligned(aligned, shapes, f"--update {adapter.weights_file}")
        modules = list(shapes) if targets is None else target_modules(aligned, targets)
    else:
        modules = target_modules(aligned, targets)
        check_checkpoint_fits(aligned, update, modules)
    prompts, responses = update_pairs(pairs)
    return UpdateInputs(aligned, aligned_given, update, kind, modules, Path(pairs), prompts, responses)


def check_fits_aligned(aligned: Path, shapes: Mapping[str, tuple[int, int]], where: str) -> None:
    """Every adapted module is a weight of ALIGNED with the adapter's ``(out, in)`` shape."""
    with CheckpointReader(aligned) as reader:
        for module, shape in shapes.items():
            name = weight_name(module)
            found = list(reader.shape(name)) if name in reader else None
            if found != list(shape):
                has = f"has shape {found}" if found is not None else "has no such tensor"
                raise InputError(
                    f"{where}: module {module} updates a {list(shape)} weight but ALIGNED {aligned} {has} "
                    "(an adapter of another model?)"
                )


def check_checkpoint_fits(aligned: Path, checkpoint: Path, modules: Iterable[str]) -> None:
    """The full fine-tune holds every target with ALIGNED's shape."""
    with CheckpointReader(aligned) as reference, CheckpointReader(checkpoint) as finetuned:
        for module in modules:
            name = weight_name(module)
            found = list(finetuned.shape(name)) if name in finetuned else None
            if found != list(reference.shape(name)):
                has = f"has shape {found}" if found is not None else "has no such tensor"
                raise InputError(
                    f"--update {checkpoint}: tensor {name} {has} but ALIGNED {aligned} has "
                    f"{list(reference.shape(name))} (a fine-tune of another model?)"
                )


def update_pairs(path: str | os.PathLike) -> tuple[list[Prompt], list[str]]:
    """The harmful prompts and their harmful answers, in file order; one line naming file:line
    for a missing, empty or malformed file or record, and for a prompt that is ever scored."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--pairs {file}: no such file (JSONL of {{\"prompt\", \"response\"}})")
    numbered = read_jsonl(file, what="pairs file")
    if not numbered:
        raise InputError(f"--pairs {file}: no pairs (empty file); give harmful prompts each with a harmful answer")
    for lineno, record in numbered:
        for key in PAIR_FIELDS:
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise InputError(
                    f"{file}:{lineno}: missing or empty {key!r} (each line: a harmful prompt and a harmful answer)"
                )
    prompts = [Prompt(id=f"{file.name}:{lineno}", text=r["prompt"], source=file.name) for lineno, r in numbered]
    check_never_scored(prompts)
    return prompts, [record["response"] for _, record in numbered]


def check_never_scored(prompts: list[Prompt]) -> None:
    """No pair's prompt is in a validation or test set (as for calibrate's harmful prompts)."""
    from csulora.eval.calibration_sets import check_disjoint, held_out_sets

    if not pyrit_installed():
        raise InputError(
            f"checking --pairs against the AdvBench/airt validation and test splits needs pyrit: run `{PYRIT_INSTALL}`"
        )
    check_disjoint(prompts, held_out_sets())
