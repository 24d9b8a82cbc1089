"""What `tune` will sweep, decided before any model is loaded: the inputs given and each method's plan.

Every path is checked (hub ids resolved first, as everywhere: io/hub.py), each method to sweep is
matched with the inputs it needs (one method: a missing input is an OptionError; ``all``: the
method is skipped with a note), and statistics given to a run where no method reads them are
refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.errors import InputError, OptionError
from csulora.io.hub import resolve_model_dir
from csulora.io.input_kind import is_checkpoint
from csulora.methods.base import CALIBRATION, DISPLACEMENT, SUBSPACE, UPDATE_STATISTICS
from csulora.methods.registry import get_method
from csulora.tuning.config import TuneConfig, build_method_config
from csulora.tuning.hints import CALIBRATION_FROM_TASK, CALIBRATION_GIVEN

PathLike = str | os.PathLike


@dataclass(frozen=True)
class SourceFiles:
    """What the user gave besides the adapter and the aligned model (checked paths)."""

    subspace: Path | None = None
    base: Path | None = None
    calibration: Path | None = None  # --calibration FILE
    calibration_task: str | None = None  # --calibration-task FILE: calibrate first
    update_statistics: Path | None = None  # --update-statistics FILE: the fine-tuned model's (Antidote)

    @property
    def has_calibration(self) -> bool:
        return self.calibration is not None or self.calibration_task is not None

    @property
    def calibration_source(self) -> str | None:
        if self.calibration_task is not None:
            return CALIBRATION_FROM_TASK
        return CALIBRATION_GIVEN if self.calibration is not None else None


@dataclass(frozen=True)
class MethodPlan:
    """One method to sweep: its config (with the defaults for the sources given) and inputs."""

    config: TuneConfig
    needs: frozenset[str]  # CorrectionMethod.needs(...) of its weakest setting


def check_paths(
    adapter_dir: PathLike,
    aligned: PathLike,
    subspace: PathLike | None,
    base: PathLike | None,
    calibration: PathLike | None,
    calibration_task: str | None,
    update_statistics: PathLike | None = None,
) -> tuple[Path, Path, SourceFiles]:
    from csulora.io.checkpoints import find_safetensors_files
    from csulora.io.modeling import check_adapter_dir

    if subspace is not None and base is not None:
        raise OptionError("give --subspace FILE or --base BASE, not both")
    if calibration is not None and calibration_task is not None:
        raise OptionError("give --calibration FILE or --calibration-task FILE, not both")
    # Hub ids become folders before anything is read, as in the API (io/hub.py): a checkpoint
    # on the hub is then recognised as one, and every later step sees local folders.
    adapter_dir = resolve_model_dir(adapter_dir, "ADAPTER")
    aligned = resolve_model_dir(aligned, "ALIGNED")
    base = None if base is None else resolve_model_dir(base, "BASE")
    if is_checkpoint(adapter_dir):  # a full fine-tune (docs/design.md §5d)
        find_safetensors_files(adapter_dir)
        adapter_path = Path(adapter_dir)
    else:
        adapter_path = check_adapter_dir(adapter_dir)
    find_safetensors_files(aligned)
    if subspace is not None and not Path(subspace).is_file():
        raise InputError(f"{subspace}: no such subspace file")
    if base is not None:
        find_safetensors_files(base)
    files = SourceFiles(
        subspace=Path(subspace) if subspace is not None else None,
        base=Path(base) if base is not None else None,
        calibration=_statistics_file(calibration, "--calibration"),
        calibration_task=str(calibration_task) if calibration_task is not None else None,
        update_statistics=_statistics_file(update_statistics, "--update-statistics"),
    )
    return adapter_path, Path(aligned), files


def _statistics_file(path: PathLike | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such statistics file (write one with `csulora calibrate`)")
    if Path(path).suffix != ".safetensors":
        raise InputError(f"{flag} {path}: statistics must be a .safetensors file from `csulora calibrate`")
    return Path(path)


def plan_methods(
    config: TuneConfig, files: SourceFiles, *, dense: bool = False
) -> tuple[list[MethodPlan], dict[str, str]]:
    """Each method to sweep with the inputs it needs; (plans, skipped: method -> why).

    One method: a missing input is an OptionError. ``all``: a method whose inputs are
    missing is skipped with a note, unless that leaves nothing. Statistics given to a
    run where no method reads them are refused rather than silently ignored. ``dense``:
    a full checkpoint, whose methods need their dense form (and RESTA the exact D when
    ``--base`` is given, docs/design.md §5d).
    """
    plans: list[MethodPlan] = []
    skipped: dict[str, str] = {}
    for method_config in config.method_configs():
        method_config = with_source_defaults(method_config, files.base)
        impl = get_method(method_config.method)
        weakest = build_method_config(method_config.method, method_config.grid[0], method_config.method_options)
        try:
            if dense:
                impl.check_dense_options(weakest)
            impl.check_sources(
                weakest,
                has_displacement=files.base is not None,
                has_subspace=files.base is not None or files.subspace is not None,
                has_calibration=files.has_calibration,
                has_update_statistics=files.update_statistics is not None,
            )
        except OptionError as exc:
            if not config.is_all:
                raise
            skipped[method_config.method] = str(exc)
            continue
        needs = impl.dense_inputs(weakest, has_displacement=files.base is not None) if dense else impl.needs(weakest)
        plans.append(MethodPlan(method_config, needs))
    if not plans:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise OptionError(f"--method all: no method has the inputs it needs ({why})")
    if files.has_calibration and not any(reads_calibration(plan) for plan in plans):
        flag = "--calibration-task" if files.calibration_task is not None else "--calibration"
        raise OptionError(f"{flag} does not apply to --method {config.method} (it reads no activation statistics)")
    return plans, skipped


def reads_calibration(plan: MethodPlan) -> bool:
    return CALIBRATION in plan.needs


def with_source_defaults(config: TuneConfig, base: PathLike | None) -> TuneConfig:
    """The method's own defaults for the sources given (Safe LoRA: its projection), under the user's options."""
    defaults = get_method(config.method).tune_options(has_displacement=base is not None)
    missing = {key: value for key, value in defaults.items() if key not in config.method_options}
    if not missing:
        return config
    return dataclasses.replace(config, method_options={**config.method_options, **missing})


def correction_sources(
    plan: MethodPlan, files: SourceFiles, aligned_path: Path, subspace: Path | None, calibration: Path | None
) -> dict[str, Any]:
    """The ``correct_adapter`` keyword arguments for what this method reads.

    A method that reads nothing besides the adapter (``scale``) still gets the subspace
    or the pair when given: its report then carries the audit numbers.
    """
    sources: dict[str, Any] = {}
    if DISPLACEMENT in plan.needs:
        sources.update(base=files.base, aligned=aligned_path)
    if SUBSPACE in plan.needs:
        sources["subspace"] = subspace
    if CALIBRATION in plan.needs:
        sources["calibration"] = calibration
    if UPDATE_STATISTICS in plan.needs:
        sources["update_statistics"] = files.update_statistics
    if not sources:
        if files.subspace is not None:
            sources["subspace"] = files.subspace
        elif files.base is not None:
            sources.update(base=files.base, aligned=aligned_path)
    return sources


