"""``calibrate_update``: the fine-tuned model's statistics for Antidote, written to one file
(``csulora calibrate ALIGNED --update UPDATE --pairs FILE``; docs/design.md §5c, docs/peers.md).

Antidote scores each weight by ``|W_ij| * ||x_j||`` with x the inputs of its module when the
**fine-tuned** model reads harmful prompts followed by harmful answers. This mode of calibrate
runs that model on those pairs -- each through the chat template exactly as calibrate's harmful
sequences (:func:`~csulora.references.calibration.data.harmful_sequences`), every non-padding token
of prompt and answer counted -- through calibrate's own machinery (groups, passes, statistics
pass, output staging), with no task pass and nothing generated:

- **the model run**: an adapter is attached to ALIGNED with :func:`csulora.io.modeling.load_model`
  (the one way an adapter is attached) and **merged**: ``W + s B A`` is the fine-tuned model's
  weight, its forward is the unmerged one up to float rounding (dropout is off at inference), the
  modules keep ALIGNED's names and stay ``nn.Linear`` (so the Gram groups are found as for the
  aligned model), and the forward costs what the aligned model's does. A full fine-tune is
  loaded itself, with its own tokenizer; ALIGNED is then still read, for provenance and targets;
- **the file**: role ``update`` (:data:`csulora.io.calibration_file.ROLE_UPDATE`), one moment a
  group (``harmful``; :func:`csulora.linalg.gram.update_moment`), read back as
  ``ModuleCalibration`` with ``task`` None. Its ``info`` records ALIGNED's fingerprint (the key
  ``check_model`` reads), the update's identity (:func:`csulora.io.fingerprint.update_fingerprint`,
  which ``correct``/``tune --update-statistics`` compare with the update they are given), and the
  pairs' sha256 and count. A rerun writes the same bytes; timings go to the run record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from csulora.eval.generation import DEFAULT_BATCH_SIZE
from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, ROLE_UPDATE, UPDATE_KEY, save_calibration
from csulora.io.checkpoints import target_list
from csulora.io.fingerprint import model_fingerprint, update_fingerprint
from csulora.io.hub import resolve_model_dir
from csulora.io.input_kind import ADAPTER
from csulora.io.modeling import load_model, resolve_device, resolve_dtype
from csulora.references.calibration.api import (
    CalibrationResult,
    dtype_name,
    logger,
    machine_facts,
    model_text,
    timed,
)
from csulora.references.calibration.data import CALIBRATION_MAX_NEW_TOKENS, check_options, harmful_sequences, set_digest
from csulora.references.calibration.groups import linear_modules
from csulora.references.calibration.outputs import RUN_RECORD_FORMAT, OutputPaths, publish, staged_output
from csulora.references.calibration.passes import StatisticsPlan, statistics_pass
from csulora.references.calibration.statistics import product_dtype_for
from csulora.references.calibration.update_inputs import UpdateInputs, read_update_inputs
from csulora.types import ModuleCalibration
from csulora.version import __version__

# How the model run is built from the update, as the file records it (info.update.model).
MODEL_RUN = {ADAPTER: "ALIGNED with the adapter attached and merged", "checkpoint": "the checkpoint itself"}


@dataclass
class UpdateMeasured:
    """What the run computed."""

    aligned_fingerprint: dict[str, Any]
    update_fingerprint: dict[str, Any]
    plan: StatisticsPlan
    calibrations: dict[str, ModuleCalibration]
    tokens: int
    budget: int
    seconds: dict[str, float] = field(default_factory=dict)


def load_fine_tuned(inputs: UpdateInputs, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) of the fine-tuned model: ALIGNED + the adapter, merged; or the checkpoint."""
    if inputs.kind == ADAPTER:
        return load_model(inputs.aligned, inputs.update, device=device, dtype=dtype, merge=True)
    return load_model(inputs.update, device=device, dtype=dtype)


def measure_update(inputs: UpdateInputs, *, batch_size: int, memory_budget_gb: float | None, device: torch.device,
                   dtype: torch.dtype, progress: bool, log) -> UpdateMeasured:  # fmt: skip
    """Fingerprint both folders, load the fine-tuned model, run the statistics pass (harmful set only)."""
    seconds: dict[str, float] = {}
    with timed(seconds, "fingerprint_and_load"):
        aligned_fingerprint = model_fingerprint(inputs.aligned)
        fingerprint = update_fingerprint(inputs.update)
        model, tokenizer = load_fine_tuned(inputs, device, dtype)
        linears = linear_modules(model, inputs.modules, inputs.model_dir)
    with timed(seconds, "statistics"):
        sequences = harmful_sequences(tokenizer, inputs.prompts, inputs.responses)
        plan, calibrations, budget = statistics_pass(
            model, tokenizer, linears, sequences, None, memory_budget_gb=memory_budget_gb, device=device,
            dtype=dtype, batch_size=batch_size, progress=progress, log=log,
        )  # fmt: skip
    return UpdateMeasured(
        aligned_fingerprint, fingerprint, plan, calibrations, tokens=sum(len(e["input_ids"]) for e in sequences),
        budget=budget, seconds=seconds,
    )  # fmt: skip


def update_info(inputs: UpdateInputs, measured: UpdateMeasured, *, targets, batch_size: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """The file's metadata: what the statistics were computed from (nothing that differs between
    identical runs: that goes to the run record)."""
    return {
        "csulora_version": __version__,
        MODEL_FINGERPRINT_KEY: measured.aligned_fingerprint,
        "aligned": model_text(inputs.aligned_given),
        UPDATE_KEY: {
            "kind": inputs.kind,
            "path": str(inputs.update.resolve()),
            "fingerprint": measured.update_fingerprint,
            "model": MODEL_RUN[inputs.kind],
        },
        "targets": target_list(targets),
        "modules": len(inputs.modules),
        "groups": len(measured.plan.groups),
        "sequences": {"chat_template": True, "counted": "prompt + response, every non-padding token",
                      "batch_size": batch_size},  # fmt: skip
        "device": device.type,
        "dtype": dtype_name(dtype),
        "products": dtype_name(product_dtype_for(device, dtype)),
        "accumulation": "float64",
        "pairs": {
            "file": str(inputs.pairs_file.resolve()),
            "examples": len(inputs.prompts),
            "sha256": set_digest({"prompt": p.text, "response": r} for p, r in zip(inputs.prompts, inputs.responses)),
            "tokens": measured.tokens,
        },
    }


def update_run_record(paths: OutputPaths, measured: UpdateMeasured, device: torch.device) -> dict[str, Any]:
    """How this run went: the only file of a rerun allowed to differ (issue 23)."""
    return {
        "format": RUN_RECORD_FORMAT,
        "role": ROLE_UPDATE,
        "statistics_file": paths.statistics.name,
        "seconds": {k: round(v, 3) for k, v in measured.seconds.items()},
        "memory_budget_bytes": measured.budget,
        "passes": len(measured.plan.passes),
        "passes_resume_from_cached_hidden_states": measured.plan.blocks is not None,
        "machine": machine_facts(device),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def calibrate_update(
    aligned: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    update: str | os.PathLike,
    pairs: str | os.PathLike,
    targets: Iterable[str] | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget_gb: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
    run_record_file: bool = True,
) -> CalibrationResult:
    """Write Antidote's statistics -- the **fine-tuned** model's input Grams on harmful prompts
    followed by harmful answers -- to ``out_file`` (role ``update``; docs/peers.md).

    ``aligned``: the aligned model (folder or hub id); ``update``: a PEFT adapter trained on it
    (run merged into it) or a full fine-tune of it (run itself); ``pairs``: JSONL of
    ``{"prompt", "response"}``, harmful prompt and harmful answer, read as given (nothing is
    generated); ``targets``: default the adapter's modules, or every decoder linear layer for a
    checkpoint. Every bad input is refused in one line before a model is loaded. The output is
    written atomically (an existing one needs ``force``); beside it ``<out_file>.run.json``
    records timings and machine facts. The result's ``answers`` is empty and ``task_tokens`` 0.
    """
    log = logger(progress)
    check_options(CALIBRATION_MAX_NEW_TOKENS, batch_size, memory_budget_gb)  # nothing is generated: the length is moot
    paths = OutputPaths.checked(out_file, run_record_file, force)
    aligned_dir, update_dir = resolve_model_dir(aligned, "ALIGNED"), resolve_model_dir(update, "UPDATE")
    paths.check_apart({"ALIGNED": aligned_dir, "--update": update_dir, "--pairs": pairs})
    run_device, model_dtype = resolve_device(device), resolve_dtype(dtype)
    settings = {"batch_size": batch_size, "device": run_device, "dtype": model_dtype}
    with staged_output(paths.statistics) as staging:
        inputs = read_update_inputs(aligned_dir, os.fspath(aligned), update_dir, pairs, targets)
        measured = measure_update(inputs, memory_budget_gb=memory_budget_gb, progress=progress, log=log, **settings)
        info = update_info(inputs, measured, targets=targets, **settings)
        modules = {m: g.name for g in measured.plan.groups for m in g.modules}
        save_calibration(staging, measured.calibrations, modules, info, force=True, role=ROLE_UPDATE)
        record = update_run_record(paths, measured, run_device)
        publish(staging, paths, record)
    return CalibrationResult(
        path=paths.statistics, modules=modules, groups=measured.plan.groups, harmful_tokens=measured.tokens,
        task_tokens=0, passes=len(measured.plan.passes), seconds=measured.seconds, answers=[], info=info,
        record_path=paths.record, run=record,
    )  # fmt: skip
