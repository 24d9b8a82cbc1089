"""`tune_adapter`: sweep a correction's strength, score each setting, keep the chosen one.

Order of work, cheapest checks first so a bad input costs nothing:
1. options, paths and data files are checked, and each method to sweep is matched with
   the inputs it needs (:func:`plan_methods`; one-line errors, nothing written);
2. the statistics are calibrated first when ``calibration_task`` is given (into OUTDIR's
   staging folder, so they appear with the output in one atomic rename), and a subspace
   is built once when ``--base`` is given and a method needs one;
3. every setting is written as a corrected adapter into a scratch folder beside OUTDIR
   (so a bad calibration or subspace file fails before any model is loaded);
4. the aligned model is loaded ONCE and scored bare; the uncorrected adapter is attached
   with PEFT and scored (the utility reference); each setting is attached to the same
   in-memory model under its own adapter name, scored, and detached -- the base weights
   are never reloaded, and ``disable_adapter`` gives back the aligned model to measure
   how likely it finds each setting's benign answers (the fluency condition);
5. :mod:`csulora.tuning.selection` decides; OUTDIR is written in one atomic rename: the
   chosen adapter (if any), tune.json, tune.png, the raw answers and the statistics.

A fully fine-tuned checkpoint instead of an adapter (docs/design.md §5d) takes the same
path with two differences, both in how a model state is reached
(:class:`csulora.tuning.checkpoint.CheckpointStates`): no setting is written beforehand (a
7B candidate folder would be ~14 GB); the fine-tuned model is loaded once, each setting's
corrected weights are copied into it and the fine-tuned ones read back afterwards, and
the aligned reference is its weights swapped in. Only the chosen checkpoint is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csulora.errors import InputError, OptionError
from csulora.eval.specs import (
    DEFAULT_BENIGN,
    DEFAULT_HARMFUL,
    check_not_held_out,
    load_prompts,
    source_name,
    unique_name,
)
from csulora.io.atomic import atomic_output_dir, check_output_dir
from csulora.io.hub import resolve_model_dir
from csulora.io.input_kind import is_checkpoint
from csulora.methods.registry import get_method
from csulora.tuning.config import TuneConfig, build_method_config
from csulora.tuning.report import plot_sweep, tune_record, write_tune_json
from csulora.tuning.score_cache import ScoreCache
from csulora.tuning.scoring import TuneData, score_model
from csulora.tuning.selection import (
    CALIBRATION_FROM_TASK,
    CALIBRATION_GIVEN,
    MethodSweep,
    ScoredSetting,
    Selection,
    SettingScores,
    select_across_methods,
    select_setting,
)

TUNE_JSON = "tune.json"
TUNE_PNG = "tune.png"
GENERATIONS = "tune-generations.jsonl"
CALIBRATION_FILE = "calibration.safetensors"  # written by --calibration-task

UNCORRECTED = "uncorrected"
PathLike = str | os.PathLike


@dataclass(frozen=True)
class TuneResult:
    """What `tune` decided and where it wrote it."""

    out_dir: Path
    selection: Selection
    record: dict[str, Any]

    @property
    def qualified(self) -> bool:
        return self.selection.qualified

    @property
    def adapter_dir(self) -> Path | None:
        """OUTDIR itself holds the chosen PEFT adapter; None when nothing qualified."""
        return self.out_dir if self.qualified else None

    @property
    def chosen_params(self) -> dict[str, Any] | None:
        return self.record["choice"]["params"]

    @property
    def chosen_method(self) -> str | None:
        return self.record["choice"]["method"]


@dataclass(frozen=True)
class LoadedData:
    data: TuneData
    description: dict[str, Any]


@dataclass(frozen=True)
class SourceFiles:
    """What the user gave besides the adapter and the aligned model (checked paths)."""

    subspace: Path | None = None
    base: Path | None = None
    calibration: Path | None = None  # --calibration FILE
    calibration_task: str | None = None  # --calibration-task FILE: calibrate first

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
) -> TuneResult:
    """Sweep ``config.method``'s knob (or every method's, ``method="all"``) and write the chosen adapter.

    ``subspace`` / ``base``: where D comes from, for the methods that need it;
    ``calibration``: a statistics file from `csulora calibrate`, or ``calibration_task``:
    the adapter's training data (JSONL), to calibrate first into OUTDIR -- for the methods
    that need activation statistics. ``harmful``: prompt specs/files, one source each
    (default: AdvBench validation split and airt-val, which need pyrit). ``task``: JSONL
    of {prompt, response} (or ``date:validation``) for the utility check; ``benign``:
    prompts for over-refusal, short answers and fluency (default ``benign:validation``).
    ``device``/``dtype``: where and in what precision the aligned model runs. The adapter,
    ``aligned`` and ``base`` may be hub ids (fetched, or found in the hub cache: io/hub.py).
    ``score_cache``: a folder keeping every scored state (:mod:`csulora.tuning.score_cache`),
    so a killed run resumes and a rerun on the same data scores nothing twice.
    Returns a :class:`TuneResult`; when no setting qualifies no adapter is written, only
    tune.json, tune.png, the answers (and the statistics), and ``result.qualified`` is False.
    """
    from csulora.io.modeling import resolve_device, resolve_dtype

    config = config or TuneConfig()
    adapter_path, aligned_path, files = _check_paths(adapter_dir, aligned, subspace, base, calibration, calibration_task)
    dense = is_checkpoint(adapter_path)  # a full fine-tune: its settings are applied in memory
    plans, skipped = plan_methods(config, files, dense=dense)
    loaded = load_tune_data(harmful, task, benign)
    if config.is_all and not loaded.data.task:
        raise OptionError("--method all ranks the methods by utility: give --task with validation data")
    calibration_desc = _check_calibration_task(files.calibration_task, task, loaded)
    run = {"device": resolve_device(device), "dtype": resolve_dtype(dtype)}
    out = check_output_dir(out_dir, force)
    timing: dict[str, float] = {}
    with atomic_output_dir(out, force=force) as staging, tempfile.TemporaryDirectory(
        prefix=f".{out.name}.candidates-", dir=out.parent
    ) as scratch:
        scratch_dir = Path(scratch)
        calibration_file = _calibration_statistics(files, aligned_path, adapter_path, staging, config, run, progress, timing)
        subspace_file = _subspace_for(plans, files, aligned_path, adapter_path, scratch_dir, timing)
        sources = {
            plan.config.method: _correction_sources(plan, files, aligned_path, subspace_file, calibration_file)
            for plan in plans
        }
        if dense:
            from csulora.tuning.checkpoint import CheckpointStates

            candidates = _setting_candidates(plans)
            states: Any = CheckpointStates(adapter_path, aligned_path, sources)
        else:
            candidates = _write_candidates(adapter_path, scratch_dir, plans, sources, progress)
            states = _AdapterStates(adapter_path, aligned_path)
        cache = _score_cache(score_cache, aligned_path, loaded.data, plans[0].config, run)
        sweep = _run_sweep(states, plans, candidates, loaded.data, run, progress, timing, cache)
        selection = _select(config, sweep, files, skipped)
        inputs = {
            "adapter": str(adapter_path.resolve()),
            "aligned": str(aligned_path.resolve()),
            "subspace": str(files.subspace.resolve()) if files.subspace is not None else None,
            "base": str(files.base.resolve()) if files.base is not None else None,
            "calibration": _calibration_input(files, calibration_desc),
            "device": run["device"].type,
            "dtype": str(run["dtype"]).removeprefix("torch."),
        }
        record = tune_record(
            config=config,
            sweeps=sweep.sweeps,
            aligned=sweep.aligned,
            adapter=sweep.adapter,
            selection=selection,
            inputs=inputs,
            datasets=loaded.description,
            timing=timing,
        )
        for row, candidate in zip(record["settings"], sweep.candidates, strict=True):
            row["same_as_adapter"] = candidate.identity
        record["not_scored"] = [  # stop_at_first skipped these
            {"method": s.config.method, "value": v} for s in sweep.sweeps for v in s.config.grid[len(s.settings) :]
        ]
        record["skipped_methods"] = dict(skipped)
        record["warnings"] = _warnings(loaded.data)
        if cache is not None:  # which scores were read back, not generated (their timing_s is the read)
            record["score_cache"] = {"folder": str(cache.folder.resolve()), "read": list(cache.read_states)}
        if selection.index is not None:
            states.write_chosen(sweep.candidates[selection.index], staging, scratch_dir)
            _point_report_at_output(staging, out, {staging: out, scratch_dir: None})
        write_tune_json(staging / TUNE_JSON, record)
        plot_sweep(
            staging / TUNE_PNG,
            config=config,
            sweeps=sweep.sweeps,
            aligned=sweep.aligned,
            adapter=sweep.adapter,
            selection=selection,
        )
        _write_generations(staging / GENERATIONS, sweep.answers)
    return TuneResult(out, selection, record)


# --------------------------------------------------------------------------- input checks


def _check_paths(
    adapter_dir: PathLike,
    aligned: PathLike,
    subspace: PathLike | None,
    base: PathLike | None,
    calibration: PathLike | None,
    calibration_task: str | None,
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
    if calibration is not None:
        if not Path(calibration).is_file():
            raise InputError(f"{calibration}: no such calibration file (write one with `csulora calibrate`)")
        if Path(calibration).suffix != ".safetensors":
            raise InputError(f"{calibration}: calibration statistics must be a .safetensors file from `csulora calibrate`")
    files = SourceFiles(
        subspace=Path(subspace) if subspace is not None else None,
        base=Path(base) if base is not None else None,
        calibration=Path(calibration) if calibration is not None else None,
        calibration_task=str(calibration_task) if calibration_task is not None else None,
    )
    return adapter_path, Path(aligned), files


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
        method_config = _with_source_defaults(method_config, files.base)
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
    if files.has_calibration and not any(_reads_calibration(plan) for plan in plans):
        flag = "--calibration-task" if files.calibration_task is not None else "--calibration"
        raise OptionError(f"{flag} does not apply to --method {config.method} (it reads no activation statistics)")
    return plans, skipped


def _reads_calibration(plan: MethodPlan) -> bool:
    from csulora.methods.base import CALIBRATION

    return CALIBRATION in plan.needs


def _with_source_defaults(config: TuneConfig, base: PathLike | None) -> TuneConfig:
    """The method's own defaults for the sources given (Safe LoRA: its projection), under the user's options."""
    defaults = get_method(config.method).tune_options(has_displacement=base is not None)
    missing = {key: value for key, value in defaults.items() if key not in config.method_options}
    if not missing:
        return config
    return dataclasses.replace(config, method_options={**config.method_options, **missing})


def load_tune_data(harmful: Sequence[str] | None, task: str | None, benign: str | None) -> LoadedData:
    """Read every prompt set before any model is loaded; refuse test splits."""
    from csulora.eval.tasks import load_task

    specs = list(harmful) if harmful else list(DEFAULT_HARMFUL)
    for spec in specs + [s for s in (task, benign) if s is not None]:
        check_not_held_out(spec)
    sources: dict[str, list[str]] = {}
    described: dict[str, Any] = {}
    for spec in specs:
        try:
            prompts = load_prompts(spec)
        except InputError as exc:
            if harmful:
                raise
            raise InputError(
                f"no --harmful given and the default validation sets ({', '.join(DEFAULT_HARMFUL)}) "
                f"are unavailable: {exc}; or give --harmful FILE ..."
            ) from None
        name = unique_name(source_name(spec), sources)
        sources[name] = [p.text for p in prompts]
        described[name] = {"spec": spec, "n": len(prompts)}
    task_items: list[dict[str, str]] = []
    task_desc = None
    if task is not None:
        task_items = [{"prompt": item["prompt"], "response": item["response"]} for item in load_task(task)]
        task_desc = {"spec": task, "n": len(task_items)}
    benign_spec = benign if benign is not None else DEFAULT_BENIGN
    benign_prompts = [p.text for p in load_prompts(benign_spec)]
    benign_desc = {"spec": benign_spec, "n": len(benign_prompts), "default": benign is None}
    data = TuneData(harmful=sources, task=task_items, benign=benign_prompts)
    return LoadedData(data, {"harmful": described, "task": task_desc, "benign": benign_desc})


def _check_calibration_task(calibration_task: str | None, task: str | None, loaded: LoadedData) -> dict | None:
    """The calibration task data must be the adapter's training data, never what tune selects on."""
    if calibration_task is None:
        return None
    from csulora.eval.prompts import normalise_prompt
    from csulora.eval.tasks import load_task

    check_not_held_out(calibration_task)
    items = load_task(calibration_task)
    validation = {normalise_prompt(item["prompt"]): item["prompt"] for item in loaded.data.task}
    for item in items:
        shared = validation.get(normalise_prompt(item["prompt"]))
        if shared is not None:
            raise OptionError(
                f"{calibration_task}: prompt {shared[:60]!r} is also in the validation task {task}; "
                "calibrate on the adapter's training data, never on the data tune selects on"
            )
    return {"spec": calibration_task, "n": len(items)}


# --------------------------------------------------------------------------- inputs the corrections read


def _calibration_statistics(
    files: SourceFiles,
    aligned_path: Path,
    adapter_path: Path,
    staging: Path,
    config: TuneConfig,
    run: Mapping[str, Any],
    progress: bool,
    timing: dict[str, float],
) -> Path | None:
    """The statistics file: the one given, or (``calibration_task``) one calibrated into OUTDIR."""
    if files.calibration_task is None:
        return files.calibration
    from csulora.references.calibration import calibrate

    start = time.perf_counter()
    out_file = staging / CALIBRATION_FILE
    calibrate(
        aligned_path,
        out_file,
        task=files.calibration_task,
        targets=_input_modules(adapter_path),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        device=run["device"],
        dtype=run["dtype"],
        force=False,
        progress=progress,
    )
    timing["calibration"] = round(time.perf_counter() - start, 3)
    return out_file


def _calibration_input(files: SourceFiles, task_desc: dict | None) -> dict[str, Any] | None:
    """Where the statistics came from, for tune.json."""
    if files.calibration_task is not None:
        return {"file": CALIBRATION_FILE, "written_by": "tune --calibration-task", "task": task_desc}
    if files.calibration is not None:
        return {"file": str(files.calibration.resolve()), "written_by": "csulora calibrate (given)"}
    return None


def _subspace_for(
    plans: Sequence[MethodPlan],
    files: SourceFiles,
    aligned_path: Path,
    adapter_path: Path,
    scratch: Path,
    timing: dict[str, float],
) -> Path | None:
    """The subspace cache given, or (``--base``) one built once for every setting that needs it.

    Building it once spares streaming both checkpoints again for every grid value; only
    Safe LoRA's approximate projection needs the full D each time (docs/design.md §10).
    """
    from csulora.methods.base import SUBSPACE

    if files.subspace is not None or files.base is None:
        return files.subspace
    if not any(SUBSPACE in plan.needs for plan in plans):
        return None
    from csulora.references.subspace import build_subspace

    start = time.perf_counter()
    cache = scratch / "subspace.safetensors"
    build_subspace(files.base, aligned_path, cache, targets=_input_modules(adapter_path), progress=False)
    timing["subspace"] = round(time.perf_counter() - start, 3)
    return cache


def _input_modules(adapter_path: Path) -> list[str] | None:
    """The modules an input updates: an adapter's; None (every decoder linear layer) for a checkpoint."""
    if is_checkpoint(adapter_path):
        return None
    from csulora.io.adapters import read_adapter

    return read_adapter(adapter_path).module_names()


def _correction_sources(
    plan: MethodPlan, files: SourceFiles, aligned_path: Path, subspace: Path | None, calibration: Path | None
) -> dict[str, Any]:
    """The ``correct_adapter`` keyword arguments for what this method reads.

    A method that reads nothing besides the adapter (``scale``) still gets the subspace
    or the pair when given: its report then carries the audit numbers.
    """
    from csulora.methods.base import CALIBRATION, DISPLACEMENT, SUBSPACE

    sources: dict[str, Any] = {}
    if DISPLACEMENT in plan.needs:
        sources.update(base=files.base, aligned=aligned_path)
    if SUBSPACE in plan.needs:
        sources["subspace"] = subspace
    if CALIBRATION in plan.needs:
        sources["calibration"] = calibration
    if not sources:
        if files.subspace is not None:
            sources["subspace"] = files.subspace
        elif files.base is not None:
            sources.update(base=files.base, aligned=aligned_path)
    return sources


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class _Candidate:
    plan: MethodPlan
    index: int  # position in the method's grid (weakest first)
    value: float
    folder: Path | None  # the corrected adapter written for it (None: a checkpoint's, applied in memory)
    identity: bool  # the adapter's own update: scored once, as the uncorrected adapter

    @property
    def options(self) -> dict[str, Any]:
        return self.plan.config.setting_options(self.value)


@dataclass
class _Sweep:
    aligned: SettingScores
    adapter: SettingScores
    sweeps: list[MethodSweep]
    candidates: list[_Candidate]  # flat, in the order of the sweeps' settings
    answers: list[dict[str, Any]]


def _setting_candidates(plans: Sequence[MethodPlan]) -> list[_Candidate]:
    """Every setting, nothing written (a full checkpoint's settings are applied in memory)."""
    return [
        _Candidate(plan, i, value, None, plan.config.is_identity(value))
        for plan in plans
        for i, value in enumerate(plan.config.grid)
    ]


class _AdapterStates:
    """The model states of an adapter's sweep: the aligned model loaded once, the adapter and
    each setting attached with PEFT under their own names (``disable_adapter`` shows aligned)."""

    def __init__(self, adapter_path: Path, aligned_path: Path) -> None:
        self.adapter_path, self.aligned_path = adapter_path, aligned_path
        self.model: Any = None
        self._settings = 0

    def load(self, run: Mapping[str, Any]) -> tuple[Any, Any]:
        from csulora.io.modeling import load_model

        self.model, tokenizer = load_model(self.aligned_path, device=run["device"], dtype=run["dtype"])
        return self.model, tokenizer

    @contextlib.contextmanager
    def aligned(self):
        yield contextlib.nullcontext

    @contextlib.contextmanager
    def uncorrected(self):
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, str(self.adapter_path), adapter_name=UNCORRECTED)
        self.model.eval()
        yield self.model.disable_adapter  # stays attached: the settings sit beside it

    @contextlib.contextmanager
    def setting(self, candidate: _Candidate):
        name = f"setting-{self._settings:03d}"
        self._settings += 1
        self.model.load_adapter(str(candidate.folder), adapter_name=name)
        self.model.set_adapter(name)
        self.model.eval()
        try:
            yield self.model.disable_adapter
        finally:
            self.model.set_adapter(UNCORRECTED)
            self.model.delete_adapter(name)

    def write_chosen(self, candidate: _Candidate, staging: Path, scratch: Path) -> None:
        assert candidate.folder is not None
        _copy_adapter(candidate.folder, staging)


def _write_candidates(
    adapter_path: Path,
    scratch: Path,
    plans: Sequence[MethodPlan],
    sources: Mapping[str, Mapping[str, Any]],
    progress: bool,
) -> list[_Candidate]:
    """Every setting as a corrected adapter, before any model is loaded (bad inputs fail early)."""
    from csulora.pipeline.api import correct_adapter

    jobs = [(plan, i, value) for plan in plans for i, value in enumerate(plan.config.grid)]
    candidates = []
    for plan, i, value in tqdm(jobs, desc="write settings", unit="setting", disable=None if progress else True):
        method = plan.config.method
        folder = scratch / f"{method}-{i:02d}"
        correct_adapter(
            adapter_path, folder, method, progress=False, **sources[method], **plan.config.setting_options(value)
        )
        candidates.append(_Candidate(plan, i, value, folder, plan.config.is_identity(value)))
    return candidates


def _run_sweep(
    states: Any,
    plans: Sequence[MethodPlan],
    candidates: Sequence[_Candidate],
    data: TuneData,
    run: Mapping[str, Any],
    progress: bool,
    timing: dict[str, float],
    cache: ScoreCache | None = None,
) -> _Sweep:
    """Score the aligned model, the uncorrected input and each setting, reached through ``states``
    (:class:`_AdapterStates`, or ``csulora.tuning.checkpoint.CheckpointStates`` for a checkpoint)."""
    methods = ", ".join(plan.config.method for plan in plans)
    bar = tqdm(total=2 + len(candidates), desc=f"tune {methods}", unit="setting", disable=None if progress else True)
    answers: list[dict[str, Any]] = []

    def score(model, state: str, where: Mapping[str, Any], aligned_view, files: Path | None | bool = None) -> SettingScores:
        """``files``: the state's adapter folder (None: the aligned model; False: no files, not cached)."""
        start = time.perf_counter()
        batch = plans[0].config.batch_size
        tokens, seed = plans[0].config.max_new_tokens, plans[0].config.seed
        key = cache.key(files) if cache is not None and files is not False else None
        outputs = cache.load(key, [name for name, _ in data.prompt_sets()], state) if key is not None else None
        if outputs is None:
            outputs = score_model(
                model, tokenizer, data, batch_size=batch, max_new_tokens=tokens, seed=seed, desc=state,
                aligned_view=aligned_view,
            )  # fmt: skip
            if key is not None:
                cache.save(key, outputs, state)
        timing[state] = round(time.perf_counter() - start, 3)
        for set_name, prompts in data.prompt_sets():
            for prompt, response in zip(prompts, outputs.answers[set_name]):
                answers.append({"state": state, **where, "set": set_name, "prompt": prompt, "response": response})
        bar.set_postfix_str(f"{state}: ASR " + ", ".join(f"{v.value:.2f}" for v in outputs.scores.asr.values()))
        bar.update(1)
        return outputs.scores

    settings: dict[str, list[ScoredSetting]] = {plan.config.method: [] for plan in plans}
    scored: list[_Candidate] = []
    try:
        start = time.perf_counter()
        _, tokenizer = states.load(run)
        timing["load_aligned"] = round(time.perf_counter() - start, 3)
        with states.aligned() as aligned_view:
            aligned_scores = score(states.model, "aligned", {}, aligned_view, None)
        with states.uncorrected() as aligned_view:
            adapter_scores = score(states.model, UNCORRECTED, {}, aligned_view, _adapter_files(states))
        done: set[str] = set()  # methods whose stop_at_first already found their setting
        for candidate in candidates:
            config = candidate.plan.config
            if config.method in done:
                bar.update(1)
                continue
            if candidate.identity:
                scores = adapter_scores  # the same update: no need to generate again
                bar.update(1)
            else:
                state = f"{config.method} {config.knob}={candidate.value:g}"
                where = {"method": config.method, config.knob: candidate.value}
                with states.setting(candidate) as aligned_view:
                    scores = score(states.model, state, where, aligned_view, candidate.folder or False)
            settings[config.method].append(ScoredSetting(candidate.value, scores))
            scored.append(candidate)
            if config.stop_at_first and select_setting(
                settings[config.method], aligned_scores, config, adapter=adapter_scores
            ).qualified:
                done.add(config.method)  # the stronger settings are not needed for the choice
    finally:
        bar.close()
    sweeps = [MethodSweep(plan.config, tuple(settings[plan.config.method])) for plan in plans]
    order = {plan.config.method: k for k, plan in enumerate(plans)}
    scored.sort(key=lambda c: (order[c.plan.config.method], c.index))  # the sweeps' flat order
    return _Sweep(aligned_scores, adapter_scores, sweeps, scored, answers)


def _score_cache(folder: PathLike | None, aligned: Path, data: TuneData, config: TuneConfig, run: Mapping[str, Any]):
    """The on-disk store of scored states (``--score-cache``), or None."""
    if folder is None:
        return None
    generation = {"batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
                  "device": run["device"].type, "dtype": run["dtype"]}  # fmt: skip
    return ScoreCache(folder, aligned, data, generation)


def _adapter_files(states: Any) -> Path | bool:
    """The uncorrected input's adapter folder, or False for a full checkpoint (not cached)."""
    return states.adapter_path if isinstance(states, _AdapterStates) else False


def _select(config: TuneConfig, sweep: _Sweep, files: SourceFiles, skipped: Mapping[str, str]) -> Selection:
    if config.is_all:
        return select_across_methods(
            sweep.sweeps, sweep.aligned, config, adapter=sweep.adapter,
            calibration_source=files.calibration_source, skipped=skipped,
        )  # fmt: skip
    (only,) = sweep.sweeps
    return select_setting(
        only.settings, sweep.aligned, only.config, adapter=sweep.adapter, calibration_source=files.calibration_source
    )


# --------------------------------------------------------------------------- output


def _warnings(data: TuneData) -> list[str]:
    out = []
    if len(data.harmful) < 2:
        out.append(
            "only one harmful source: a correction can look repaired on prompts like its alignment data "
            "and not on others; give a second, differently phrased source with --harmful"
        )
    return out


def _copy_adapter(candidate: Path, staging: Path) -> None:
    """Copy the chosen candidate: PEFT files and its correction report."""
    for item in candidate.iterdir():
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)


def _point_report_at_output(staging: Path, out: Path, moved: Mapping[Path, Path | None]) -> None:
    """Rewrite the chosen report's source paths that pointed into tune's temporary folders.

    The statistics calibrated into the staging folder end up in OUTDIR; a subspace built
    in the scratch folder is not kept, and the report says it was built by tune.
    """
    from csulora.io.adapters import DEFAULT_REPORT_NAME
    from csulora.pipeline.reports import dump_json

    report_file = staging / DEFAULT_REPORT_NAME
    if not report_file.is_file():
        return
    report = json.loads(report_file.read_text())
    sources = report.get("sources") or {}
    changed = False
    for key, value in sources.items():
        for folder, final in moved.items():
            if isinstance(value, str) and Path(value).resolve().is_relative_to(folder.resolve()):
                rest = Path(value).resolve().relative_to(folder.resolve())
                sources[key] = str(final.resolve() / rest) if final is not None else f"built by csulora tune ({rest})"
                changed = True
    if changed:
        dump_json(report, report_file)


def _write_generations(path: Path, answers: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in answers:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
