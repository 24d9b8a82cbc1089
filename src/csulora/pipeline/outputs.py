"""Writing a correction: the corrected update in its own kind, with its report and model card.

- an **adapter** is small: every module's result is kept (in the file's dtype, so three copies
  never coexist, docs/benchmarks.md issue 15) and the PEFT folder is written at the end;
- a **checkpoint** is written shard by shard in the input's layout (docs/design.md §5d): the
  writer walks the fine-tuned checkpoint's tensors once and takes each target's result from the
  stream in the same order (``Update.stream_order``); a target a method leaves unchanged and
  every untargeted tensor are copied as raw bytes (from ALIGNED with ``reset_others``), and the
  untargeted ones are measured for the report.

Both are written into the staging folder of :func:`csulora.io.atomic.atomic_output_dir`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csulora.io.adapters import LoraAdapter, as_stored_update, write_adapter
from csulora.io.checkpoint_writer import PlannedTensor, ShardLayout, ShardWriter, TensorEntry, copy_side_files, write_index
from csulora.io.checkpoints import weight_name
from csulora.pipeline.correction import Correction, Result, refactored
from csulora.pipeline.updates import AdapterUpdate, CheckpointUpdate
from csulora.types import DenseModuleResult, ModuleResult


def write_corrected(correction: Correction, staging: Path, *, progress: bool, base_model: str | None,
                    card: Any) -> list[dict[str, Any]] | None:  # fmt: skip
    """Correct and write into ``staging``; the untargeted tensors' records of a checkpoint (None
    for an adapter). ``card(correction, untargeted)`` renders the model card once every module is
    corrected (its summary needs all of them)."""
    if isinstance(correction.update, AdapterUpdate) or correction.lora_rank is not None:
        _write_adapter(correction, staging, progress=progress, base_model=base_model, card=card)
        return None
    return _write_checkpoint(correction, staging, progress=progress, card=card)


def _write_adapter(correction: Correction, staging: Path, *, progress: bool, base_model: str | None, card: Any) -> None:
    """An adapter folder: the adapter's own corrected factors, or (``lora_rank``) a dense
    correction of it refactored into a rank-r LoRA."""
    adapter = correction.update.adapter  # type: ignore[attr-defined]
    kept: dict[str, ModuleResult] = {}
    for result in correction.corrected(correction.modules, progress=progress):
        if isinstance(result, DenseModuleResult):
            result = refactored(result, adapter.modules[result.name], correction.lora_rank)  # type: ignore[arg-type]
        kept[result.name] = _in_file_form(adapter, result)
        correction.results[result.name] = kept[result.name]
    correction.ordered_results()  # every target has a result
    write_adapter(
        adapter, staging, {name: kept[name].update for name in correction.modules},
        base_model_name_or_path=base_model, model_card=card(correction, None),
    )  # fmt: skip


def _in_file_form(adapter: LoraAdapter, result: ModuleResult) -> ModuleResult:
    """A result as it waits for the single-file write: its factors already in the file's form.

    The methods hand back float64 factors; kept as they are until every module is done, they
    held twice the fp32 output's bytes, and the write's cast added a third copy
    (docs/benchmarks.md, issue 15). An unknown module is left for write_adapter to refuse.
    """
    module = adapter.modules.get(result.name)
    if module is None:
        return result
    return dataclasses.replace(result, update=as_stored_update(module, result.update))


def _write_checkpoint(correction: Correction, staging: Path, *, progress: bool, card: Any) -> list[dict[str, Any]]:
    update = correction.update
    assert isinstance(update, CheckpointUpdate)
    results = correction.corrected()
    others: list[dict[str, Any]] = []
    bar = tqdm(total=len(update.layout.tensor_names()), desc=f"correct ({correction.method.name})",  # type: ignore[union-attr]
               unit="tensor", disable=None if progress else True)  # fmt: skip
    total_size = 0
    for shard in update.layout.shards:
        plan = [_planned(correction, entry) for entry in shard.entries]
        writer = ShardWriter(staging / shard.path.name, plan, shard.metadata)
        try:
            for entry in shard.entries:
                _write_one(correction, writer, shard, entry, results, others)
                bar.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        total_size += writer.total_bytes
    bar.close()
    correction.ordered_results()
    write_index(staging, update.layout, total_size)
    copy_side_files(update.layout.folder, staging)
    (staging / "README.md").write_text(card(correction, others), encoding="utf-8")
    return others


def _planned(correction: Correction, entry: TensorEntry) -> PlannedTensor:
    """A tensor of the output shard: the fine-tuned one's, or the aligned one's with reset_others."""
    update = correction.update
    assert isinstance(update, CheckpointUpdate)
    if correction.reset_others and entry.name not in correction.targets:
        _, entry = update.aligned_layout.locate(entry.name)
    return PlannedTensor(name=entry.name, dtype=entry.dtype, shape=entry.shape, nbytes=entry.nbytes)


def _write_one(correction: Correction, writer: ShardWriter, shard: ShardLayout, entry: TensorEntry,
               results: Iterator[Result], others: list[dict[str, Any]]) -> None:  # fmt: skip
    """One tensor of the output: a corrected target, or an untargeted tensor's raw bytes (measured)."""
    update = correction.update
    assert isinstance(update, CheckpointUpdate)
    name = entry.name
    if name in correction.targets:
        result = next(results)
        assert weight_name(result.name) == name, f"stream order: expected {name}, got {result.name}"
        X = result.update if result.update is not None else update.unchanged(result.name)
        if X is None:
            writer.copy_tensor(name, shard, entry)  # unchanged: W_ft byte for byte
        else:
            writer.write_tensor(name, correction.output_weight(result.name, X))  # type: ignore[arg-type]
        del result
        return
    written_from = "aligned" if correction.reset_others else "fine-tuned"
    others.append({**update.untargeted(name), "written_from": written_from})
    if correction.reset_others:
        writer.copy_tensor(name, *update.aligned_layout.locate(name))
    else:
        writer.copy_tensor(name, shard, entry)
