"""`tune_adapter`: sweep a correction's strength, score each setting, keep the chosen one.

Order of work, cheapest checks first so a bad input costs nothing:

1. options, paths and data files are checked and each method to sweep is matched with the
   inputs it needs (:mod:`csulora.tuning.plan`, :mod:`csulora.tuning.data`; one-line errors,
   nothing written);
2. the statistics are calibrated first when ``calibration_task`` is given, and a subspace is built
   once when ``--base`` is given and a method reads one -- both into OUTDIR's staging folder, so
   they appear with the output in one atomic rename;
3. the states are prepared (an adapter's settings written as corrected adapters into a scratch
   folder, so a bad calibration or subspace file fails before any model is loaded);
4. the model is loaded once and the sweep scores the aligned model, the uncorrected update and
   the settings (:mod:`csulora.tuning.sweep`: lazily by default, every setting with ``--full-sweep``);
5. :mod:`csulora.tuning.selection` decides; OUTDIR gets the chosen correction (written by the
   pipeline itself, so its report and card name the files as they end up), tune.json (the
   decision, byte-identical on a rerun), tune.png, the answers, and ``run.json`` (timings and
   machine facts: the one file that differs between identical runs).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.errors import OptionError
from csulora.eval.specs import spec_file
from csulora.io.atomic import atomic_output_dir, check_apart, check_output_dir
from csulora.methods.base import SUBSPACE
from csulora.tuning.config import TuneConfig
from csulora.tuning.data import (
    LoadedData,
    check_calibration_file,
    check_calibration_task,
    check_update_statistics_file,
    load_tune_data,
)
from csulora.tuning.plan import MethodPlan, SourceFiles, check_paths, correction_sources, plan_methods
from csulora.tuning.report import plot_sweep, tune_record, write_answers, write_tune_json
from csulora.tuning.score_cache import ScoreCache
from csulora.tuning.selection import Selection, select_across_methods, select_setting
from csulora.tuning.states import AdapterStates, CheckpointStates, ModelStates
from csulora.tuning.sweep import Sweep, SweepResult, candidates_of
from csulora.version import __version__

TUNE_JSON = "tune.json"
TUNE_PNG = "tune.png"
GENERATIONS = "tune-generations.jsonl"
RUN_RECORD = "run.json"  # timings and machine facts: the one output file allowed to differ on a rerun
CALIBRATION_FILE = "calibration.safetensors"  # written by --calibration-task
SUBSPACE_FILE = "subspace.safetensors"  # written by --base when a swept method reads a subspace
PathLike = str | os.PathLike


@dataclass(frozen=True)
class TuneResult:
    """What `tune` decided and where it wrote it."""

    out_dir: Path
    selection: Selection
    record: dict[str, Any]
    run: dict[str, Any]  # the run record (run.json): timings, machine, score-cache reads

    @property
    def qualified(self) -> bool:
        return self.selection.qualified

    @property
    def adapter_dir(self) -> Path | None:
        """OUTDIR itself holds the chosen correction; None when nothing qualified."""
        return self.out_dir if self.qualified else None

    @property
    def chosen_params(self) -> dict[str, Any] | None:
        return self.record["choice"]["params"]

    @property
    def chosen_method(self) -> str | None:
        return self.record["choice"]["method"]


@dataclass(frozen=True)
class TuneInputs:
    """Everything checked before any model is loaded."""

    update: Path
    aligned: Path
    files: SourceFiles
    plans: list[MethodPlan]
    skipped: dict[str, str]
    loaded: LoadedData
    calibration_task: dict[str, Any] | None
    run: dict[str, Any]  # device, dtype


def tune_adapter(
    adapter_dir: PathLike,
    out_dir: PathLike,
    *,
    aligned: PathLike,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    calibration: PathLike | None = None,
    calibration_task: str | None = None,
    config: TuneConfig | None = None,
    harmful: Sequence[str] | None = None,
    task: str | None = None,
    benign: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    score_cache: PathLike | None = None,
    update_statistics: PathLike | None = None,
    framing: str | None = None,
) -> TuneResult:
    """Sweep ``config.method``'s knob (or every method's, ``method="all"``) and write the chosen correction.

    ADAPTER is a PEFT adapter or a full fine-tune of ALIGNED (its settings applied in memory;
    only the chosen checkpoint is written). ``subspace`` / ``base``: where D comes from, for the
    methods that need it; ``calibration``: a statistics file from `csulora calibrate`, or
    ``calibration_task``: the update's training data (JSONL), to calibrate first into OUTDIR.
    ``harmful``: prompt specs/files, one source each (default: AdvBench validation, the objectives'
    validation split and airt-val); ``task``: validation task data for the utility check;
    ``benign``: prompts for over-refusal, short answers and fluency (default ``benign:validation``).
    ``device``/``dtype``: where and in what precision the model runs. ``score_cache``: a folder
    keeping every scored state (:mod:`csulora.tuning.score_cache`). ``update_statistics``: the
    fine-tuned model's statistics (Antidote). ``framing``: the chat form of every validation set (a
    name or JSON file, None: plain); a harmful ``SPEC@FRAMING`` keeps its own, so ``harmful=
    ["advbench:validation", "advbench:validation@aoa"]`` selects on both forms (:mod:`csulora.training.framing`);
    ``calibration_task`` is calibrated plain. No setting qualifies: tune.json, tune.png, answers, run record only.
    """
    config = config or TuneConfig()
    sources = {"subspace": subspace, "base": base, "calibration": calibration, "calibration_task": calibration_task,
               "update_statistics": update_statistics}  # fmt: skip
    inputs = check_inputs(adapter_dir, aligned, sources, config, harmful, task, benign, device, dtype, framing)
    out = check_output_dir(out_dir, force)
    check_apart({"-o/--output": out, "--score-cache": score_cache}, _input_paths(inputs, harmful, task, benign))
    started = time.perf_counter()
    timing: dict[str, float] = {}
    with atomic_output_dir(out, force=force) as staging, tempfile.TemporaryDirectory(
        prefix=f".{out.name}.candidates-", dir=out.parent
    ) as scratch:
        states = _states(inputs, config, staging, Path(scratch), progress, timing)
        cache = _score_cache(score_cache, inputs, config)
        candidates = states.prepare(candidates_of(inputs.plans), Path(scratch), progress)
        sweep = Sweep(states, inputs.plans, candidates, inputs.loaded.data, inputs.run, config, cache=cache,
                      progress=progress, timing=timing).run()  # fmt: skip
        selection = _select(config, sweep, inputs)
        record = _record(config, sweep, selection, inputs)
        if selection.index is not None:
            states.write_chosen(sweep.candidates[selection.index], staging)
        run = _run_record(inputs, timing, cache, started)
        _write_outputs(staging, record, run, config, sweep, selection)
    return TuneResult(out, selection, record, run)


def check_inputs(adapter_dir: PathLike, aligned: PathLike, sources: Mapping[str, Any], config: TuneConfig,
                 harmful: Sequence[str] | None, task: str | None, benign: str | None, device: str | None,
                 dtype: str | None, framing: str | None = None) -> TuneInputs:  # fmt: skip
    """Every check that needs no model: paths, plans, data, the calibration's provenance.
    ``sources``: subspace, base, calibration, calibration_task, update_statistics."""
    from csulora.io.modeling import resolve_device, resolve_dtype

    update, aligned_path, files = check_paths(adapter_dir, aligned, **sources)
    plans, skipped = plan_methods(config, files, dense=_is_checkpoint(update))
    loaded = load_tune_data(harmful, task, benign, framing)
    if config.is_all and not loaded.data.task:
        raise OptionError("--method all ranks the methods by utility: give --task with validation data")
    task_desc = check_calibration_task(files.calibration_task, task, loaded)
    check_calibration_file(files.calibration, aligned_path, task, loaded)
    check_update_statistics_file(files.update_statistics, aligned_path, update)
    run = {"device": resolve_device(device), "dtype": resolve_dtype(dtype)}
    return TuneInputs(update, aligned_path, files, plans, skipped, loaded, task_desc, run)


def _is_checkpoint(path: Path) -> bool:
    from csulora.io.input_kind import is_checkpoint

    return is_checkpoint(path)


def _input_paths(inputs: TuneInputs, harmful: Sequence[str] | None, task: str | None,
                 benign: str | None) -> dict[str, PathLike | None]:  # fmt: skip
    """Every input file or folder, for the rule that an output never touches one."""
    files = inputs.files
    paths: dict[str, PathLike | None] = {
        "ADAPTER": inputs.update, "--aligned": inputs.aligned, "--subspace": files.subspace, "--base": files.base,
        "--calibration": files.calibration, "--calibration-task": files.calibration_task, "--task": task,
        "--benign": benign, "--update-statistics": files.update_statistics,
    }  # fmt: skip
    for i, spec in enumerate(harmful or ()):
        paths[f"--harmful {i + 1}"] = spec_file(spec)  # a SPEC@FRAMING's file too
    return {flag: p for flag, p in paths.items() if p is None or Path(p).exists()}


# --------------------------------------------------------------------------- references, states


def _states(inputs: TuneInputs, config: TuneConfig, staging: Path, scratch: Path, progress: bool,
            timing: dict[str, float]) -> ModelStates:  # fmt: skip
    """The statistics and subspace the corrections read (built once, into OUTDIR), then the states."""
    calibration = _calibration_statistics(inputs, staging, config, progress, timing)
    subspace = _subspace_for(inputs, staging, timing)
    sources = {
        plan.config.method: correction_sources(plan, inputs.files, inputs.aligned, subspace, calibration)
        for plan in inputs.plans
    }
    kind = CheckpointStates if _is_checkpoint(inputs.update) else AdapterStates
    return kind(inputs.update, inputs.aligned, sources)


def _calibration_statistics(inputs: TuneInputs, staging: Path, config: TuneConfig, progress: bool,
                            timing: dict[str, float]) -> Path | None:  # fmt: skip
    """The statistics file: the one given, or (``calibration_task``) one calibrated into OUTDIR,
    with calibrate's own defaults (its answers' length included: one code path, issue 23)."""
    files = inputs.files
    if files.calibration_task is None:
        return files.calibration
    from csulora.references.calibration import calibrate

    started = time.perf_counter()
    out_file = staging / CALIBRATION_FILE
    calibrate(inputs.aligned, out_file, task=files.calibration_task, targets=_input_modules(inputs.update),
              batch_size=config.batch_size, device=inputs.run["device"], dtype=inputs.run["dtype"], force=False,
              progress=progress)  # fmt: skip
    timing["calibration"] = round(time.perf_counter() - started, 3)
    return out_file


def _subspace_for(inputs: TuneInputs, staging: Path, timing: dict[str, float]) -> Path | None:
    """The subspace cache given, or (``--base``) one built once into OUTDIR for every setting that
    reads one (only Safe LoRA's approximate projection needs the full D each time, docs/design.md §10)."""
    files = inputs.files
    if files.subspace is not None or files.base is None:
        return files.subspace
    if not any(SUBSPACE in plan.needs for plan in inputs.plans):
        return None
    from csulora.references.subspace import build_subspace

    started = time.perf_counter()
    cache = staging / SUBSPACE_FILE
    build_subspace(files.base, inputs.aligned, cache, targets=_input_modules(inputs.update), progress=False)
    timing["subspace"] = round(time.perf_counter() - started, 3)
    return cache


def _input_modules(update: Path) -> list[str] | None:
    """The modules an input updates: an adapter's; None (every decoder linear layer) for a checkpoint."""
    if _is_checkpoint(update):
        return None
    from csulora.io.adapters import read_adapter

    return read_adapter(update).module_names()


def _score_cache(folder: PathLike | None, inputs: TuneInputs, config: TuneConfig) -> ScoreCache | None:
    """The on-disk store of scored states (``--score-cache``), or None."""
    if folder is None:
        return None
    run = inputs.run
    generation = {"batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
                  "stop_early": not config.full_sweep, "device": run["device"].type, "dtype": run["dtype"]}  # fmt: skip
    return ScoreCache(folder, inputs.aligned, inputs.loaded.data, generation)


# --------------------------------------------------------------------------- decision and records


def _select(config: TuneConfig, sweep: SweepResult, inputs: TuneInputs) -> Selection:
    source = inputs.files.calibration_source
    if config.is_all:
        return select_across_methods(sweep.sweeps, sweep.aligned, config, adapter=sweep.adapter,
                                     calibration_source=source, skipped=inputs.skipped)  # fmt: skip
    (only,) = sweep.sweeps
    return select_setting(only.settings, sweep.aligned, only.config, adapter=sweep.adapter, calibration_source=source)


def _record(config: TuneConfig, sweep: SweepResult, selection: Selection, inputs: TuneInputs) -> dict[str, Any]:
    """tune.json: the decision and every number behind it; nothing that differs between identical runs."""
    files = inputs.files
    described = {
        "adapter": str(inputs.update.resolve()),
        "aligned": str(inputs.aligned.resolve()),
        "subspace": str(files.subspace.resolve()) if files.subspace is not None else None,
        "base": str(files.base.resolve()) if files.base is not None else None,
        "calibration": _calibration_input(files, inputs.calibration_task),
        "device": inputs.run["device"].type,
        "dtype": str(inputs.run["dtype"]).removeprefix("torch."),
    }
    record = tune_record(config=config, sweeps=sweep.sweeps, aligned=sweep.aligned, adapter=sweep.adapter,
                         selection=selection, inputs=described, datasets=inputs.loaded.description)  # fmt: skip
    for row, candidate in zip(record["settings"], sweep.candidates, strict=True):
        row["same_as_adapter"] = candidate.identity
    record["not_scored"] = sweep.not_scored
    record["output"] = _output_kind(selection, inputs)
    record["skipped_methods"] = dict(inputs.skipped)
    record["warnings"] = _warnings(inputs.loaded)
    return record


def _output_kind(selection: Selection, inputs: TuneInputs) -> str | None:
    """What OUTDIR holds: an adapter, or a checkpoint (a full fine-tune's; or an adapter corrected by a
    method with only a dense form, whose corrected update is no LoRA any more); None if nothing qualified."""
    if selection.method is None:
        return None
    from csulora.methods.registry import get_method

    if _is_checkpoint(inputs.update) or not get_method(selection.method).has_factored_form:
        return "checkpoint"
    return "adapter"


def _calibration_input(files: SourceFiles, task_desc: dict | None) -> dict[str, Any] | None:
    """Where the statistics came from, for tune.json."""
    if files.calibration_task is not None:
        return {"file": CALIBRATION_FILE, "written_by": "tune --calibration-task", "task": task_desc}
    if files.calibration is not None:
        return {"file": str(files.calibration.resolve()), "written_by": "csulora calibrate (given)"}
    return None


def _warnings(loaded: LoadedData) -> list[str]:
    if len(loaded.data.harmful) >= 2:
        return []
    return [
        "only one harmful source: a correction can look repaired on prompts like its alignment data "
        "and not on others; give a second, differently phrased source with --harmful"
    ]


def _run_record(inputs: TuneInputs, timing: Mapping[str, float], cache: ScoreCache | None,
                started: float) -> dict[str, Any]:  # fmt: skip
    """run.json: how long each step took, on what, and which states the score cache gave back."""
    import torch

    return {
        "csulora": __version__,
        "wall_s": round(time.perf_counter() - started, 3),
        "timing_s": dict(timing),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},  # fmt: skip
        "score_cache": None if cache is None else {"folder": str(cache.folder.resolve()), "read": cache.read_states},
    }


def _write_outputs(staging: Path, record: dict[str, Any], run: dict[str, Any], config: TuneConfig,
                   sweep: SweepResult, selection: Selection) -> None:  # fmt: skip
    write_tune_json(staging / TUNE_JSON, record)
    (staging / RUN_RECORD).write_text(json.dumps(run, indent=2, allow_nan=False) + "\n")
    plot_sweep(staging / TUNE_PNG, config=config, sweeps=sweep.sweeps, aligned=sweep.aligned,
               adapter=sweep.adapter, selection=selection)  # fmt: skip
    write_answers(staging / GENERATIONS, sweep.answers)
