"""`tune_adapter`: sweep a correction's strength, score each setting, keep the chosen one.

Order of work, cheapest checks first so a bad input costs nothing:
1. options, paths and data files are checked (one-line errors, nothing written);
2. the aligned model is loaded ONCE and scored bare; the uncorrected adapter is attached
   with PEFT and scored (the utility reference);
3. each grid value, weakest first, is written as a corrected adapter into a temporary
   folder beside OUTDIR, attached to the same in-memory model under its own adapter
   name, scored, and detached -- the base weights are never reloaded;
4. :func:`~csulora.tuning.selection.select_setting` decides; OUTDIR is written in one
   atomic rename: the chosen adapter (if any), tune.json, tune.png and the raw answers.
"""

from __future__ import annotations

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
from csulora.io.atomic import atomic_output_dir, check_output_dir
from csulora.methods.registry import get_method
from csulora.tuning.config import TuneConfig, build_method_config
from csulora.tuning.report import plot_sweep, tune_record, write_tune_json
from csulora.tuning.scoring import TuneData, score_model
from csulora.tuning.selection import ScoredSetting, Selection, SettingScores, select_setting

TUNE_JSON = "tune.json"
TUNE_PNG = "tune.png"
GENERATIONS = "tune-generations.jsonl"

# Named validation sets used when --harmful is not given: two sources, so a correction
# that only repairs prompts like its alignment data is caught (docs/design.md §5b).
DEFAULT_HARMFUL = ("advbench:validation", "airt:val")
# Specs that contain a test split: tune must never see them (numbers reported on the
# test split would no longer be held out).
TEST_SPECS = frozenset({"advbench", "advbench:test", "airt", "airt:test", "airt:airt-test", "date", "date:test"})
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


@dataclass(frozen=True)
class LoadedData:
    data: TuneData
    description: dict[str, Any]


def tune_adapter(
    adapter_dir: PathLike,
    out_dir: PathLike,
    *,
    aligned: PathLike,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    config: TuneConfig | None = None,
    harmful: Sequence[str] | None = None,
    task: str | None = None,
    benign: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Sweep ``config.method``'s knob over ``config.grid`` and write the chosen adapter.

    ``harmful``: prompt specs/files, one source each (default: AdvBench validation split
    and airt-val, which need pyrit). ``task``: JSONL of {prompt, response} (or
    ``date:validation``) for the utility check; ``benign``: prompts for over-refusal.
    Returns a :class:`TuneResult`; when no setting qualifies nothing but tune.json,
    tune.png and the answers are written, and ``result.qualified`` is False.
    """
    config = config or TuneConfig()
    adapter_path, aligned_path = _check_model_paths(adapter_dir, aligned, subspace, base)
    config = _with_source_defaults(config, base)
    loaded = load_tune_data(harmful, task, benign)
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.candidates-", dir=out.parent) as scratch:
        scratch_dir = Path(scratch)
        source = _correction_source(scratch_dir, adapter_path, aligned_path, subspace, base, config, timing)
        sweep = _run_sweep(adapter_path, aligned_path, scratch_dir, source, config, loaded.data, progress, timing)
        selection = select_setting(sweep.settings, sweep.aligned, config, adapter=sweep.adapter)
        inputs = {
            "adapter": str(adapter_path.resolve()),
            "aligned": str(aligned_path.resolve()),
            "subspace": str(Path(subspace).resolve()) if subspace is not None else None,
            "base": str(Path(base).resolve()) if base is not None else None,
        }
        record = tune_record(
            config=config,
            settings=sweep.settings,
            aligned=sweep.aligned,
            adapter=sweep.adapter,
            selection=selection,
            inputs=inputs,
            datasets=loaded.description,
            timing=timing,
        )
        for row, same in zip(record["settings"], sweep.same_as_adapter):
            row["same_as_adapter"] = same
        record["not_scored"] = list(config.grid[len(sweep.settings) :])  # stop_at_first skipped these
        record["warnings"] = _warnings(loaded.data)
        with atomic_output_dir(out, force=force) as staging:
            if selection.index is not None:
                _copy_adapter(sweep.candidate_dirs[selection.index], staging)
            write_tune_json(staging / TUNE_JSON, record)
            plot_sweep(
                staging / TUNE_PNG,
                config=config,
                settings=sweep.settings,
                aligned=sweep.aligned,
                adapter=sweep.adapter,
                selection=selection,
            )
            _write_generations(staging / GENERATIONS, sweep.answers)
    return TuneResult(out, selection, record)


# --------------------------------------------------------------------------- input checks


def _check_model_paths(
    adapter_dir: PathLike, aligned: PathLike, subspace: PathLike | None, base: PathLike | None
) -> tuple[Path, Path]:
    from csulora.io.checkpoints import find_safetensors_files
    from csulora.modeling import check_adapter_dir

    if (subspace is None) == (base is None):
        raise OptionError("give exactly one of --subspace FILE or --base BASE (with --aligned ALIGNED)")
    adapter_path = check_adapter_dir(adapter_dir)
    find_safetensors_files(aligned)
    if subspace is not None and not Path(subspace).is_file():
        raise InputError(f"{subspace}: no such subspace file")
    if base is not None:
        find_safetensors_files(base)
    return adapter_path, Path(aligned)


def _with_source_defaults(config: TuneConfig, base: PathLike | None) -> TuneConfig:
    """The method's own defaults for the sources given (Safe LoRA: its projection), under the user's options."""
    defaults = get_method(config.method).tune_options(has_displacement=base is not None)
    missing = {key: value for key, value in defaults.items() if key not in config.method_options}
    if not missing:
        return config
    return dataclasses.replace(config, method_options={**config.method_options, **missing})


def load_tune_data(harmful: Sequence[str] | None, task: str | None, benign: str | None) -> LoadedData:
    """Read every prompt set before any model is loaded; refuse test splits."""
    from csulora.eval.prompts import load_prompts
    from csulora.eval.tasks import load_task

    specs = list(harmful) if harmful else list(DEFAULT_HARMFUL)
    for spec in specs + [s for s in (task, benign) if s is not None]:
        if spec.strip().lower() in TEST_SPECS:
            raise OptionError(
                f"{spec}: contains a test split; tune chooses on validation data only "
                "(e.g. advbench:validation, airt:val, date:validation, or your own file)"
            )
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
        name = _unique(_source_name(spec), sources)
        sources[name] = [p.text for p in prompts]
        described[name] = {"spec": spec, "n": len(prompts)}
    task_items: list[dict[str, str]] = []
    task_desc = None
    if task is not None:
        task_items = [{"prompt": item["prompt"], "response": item["response"]} for item in load_task(task)]
        task_desc = {"spec": task, "n": len(task_items)}
    benign_prompts: list[str] = []
    benign_desc = None
    if benign is not None:
        benign_prompts = [p.text for p in load_prompts(benign)]
        benign_desc = {"spec": benign, "n": len(benign_prompts)}
    data = TuneData(harmful=sources, task=task_items, benign=benign_prompts)
    return LoadedData(data, {"harmful": described, "task": task_desc, "benign": benign_desc})


def _source_name(spec: str) -> str:
    path = Path(spec)
    if path.is_file():
        return path.stem
    head, sep, tail = spec.rpartition(":")
    if sep and Path(head).is_file():
        return f"{Path(head).stem}:{tail}"
    name, _, split = spec.partition(":")
    if name == "airt" and split:
        return split if split.startswith("airt-") else f"airt-{split}"
    return f"{name}-{split}" if split else name


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


# --------------------------------------------------------------------------- the sweep


@dataclass
class _Sweep:
    aligned: SettingScores
    adapter: SettingScores
    settings: list[ScoredSetting]
    candidate_dirs: list[Path]
    same_as_adapter: list[bool]
    answers: list[dict[str, Any]]


def _correction_source(
    scratch: Path,
    adapter_path: Path,
    aligned_path: Path,
    subspace: PathLike | None,
    base: PathLike | None,
    config: TuneConfig,
    timing: dict[str, float],
) -> dict[str, Any]:
    """Where each correction reads D from: the cache, or (with --base) a subspace built once.

    Building the subspace once with --base spares streaming both checkpoints again for
    every grid value; only Safe LoRA's approximate projection needs the full D each time.
    """
    if subspace is not None:
        return {"subspace": Path(subspace)}
    impl = get_method(config.method)
    weakest = build_method_config(config.method, config.grid[0], config.method_options)
    if impl.needs_displacement(weakest) or not impl.needs_subspace(weakest):
        return {"base": Path(base), "aligned": aligned_path}
    from csulora.api import build_subspace
    from csulora.io.adapters import read_adapter

    start = time.perf_counter()
    cache = scratch / "subspace.safetensors"
    targets = read_adapter(adapter_path).module_names()
    build_subspace(base, aligned_path, cache, targets=targets, progress=False)
    timing["subspace"] = round(time.perf_counter() - start, 3)
    return {"subspace": cache}


def _run_sweep(
    adapter_path: Path,
    aligned_path: Path,
    scratch: Path,
    source: Mapping[str, Any],
    config: TuneConfig,
    data: TuneData,
    progress: bool,
    timing: dict[str, float],
) -> _Sweep:
    from peft import PeftModel

    from csulora.api import correct_adapter
    from csulora.modeling import load_model

    knob = config.knob
    bar = tqdm(
        total=2 + len(config.grid),
        desc=f"tune {config.method}",
        unit="setting",
        disable=None if progress else True,
    )
    answers: list[dict[str, Any]] = []

    def score(model, state: str, value: float | None) -> SettingScores:
        start = time.perf_counter()
        outputs = score_model(
            model,
            tokenizer,
            data,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            desc=state,
        )
        timing[state] = round(time.perf_counter() - start, 3)
        for set_name, prompts in data.prompt_sets():
            for prompt, response in zip(prompts, outputs.answers[set_name]):
                answers.append({"state": state, knob: value, "set": set_name, "prompt": prompt, "response": response})
        bar.set_postfix_str(f"{state}: ASR " + ", ".join(f"{v.value:.2f}" for v in outputs.scores.asr.values()))
        bar.update(1)
        return outputs.scores

    try:
        start = time.perf_counter()
        model, tokenizer = load_model(aligned_path)
        timing["load_aligned"] = round(time.perf_counter() - start, 3)
        aligned_scores = score(model, "aligned", None)
        model = PeftModel.from_pretrained(model, str(adapter_path), adapter_name=UNCORRECTED)
        model.eval()
        adapter_scores = score(model, UNCORRECTED, None)
        settings, dirs, same = [], [], []
        for i, value in enumerate(config.grid):
            candidate = scratch / f"setting-{i:02d}"
            correct_adapter(
                adapter_path, candidate, config.method, progress=False, **source, **config.setting_options(value)
            )
            dirs.append(candidate)
            identity = config.is_identity(value)
            same.append(identity)
            if identity:
                scores = adapter_scores  # the same update: no need to generate again
                bar.update(1)
            else:
                name = f"setting-{i:02d}"
                model.load_adapter(str(candidate), adapter_name=name)
                model.set_adapter(name)
                model.eval()
                scores = score(model, f"{knob}={value:g}", value)
                model.set_adapter(UNCORRECTED)
                model.delete_adapter(name)
            settings.append(ScoredSetting(value, scores))
            if config.stop_at_first and select_setting(
                settings, aligned_scores, config, adapter=adapter_scores
            ).qualified:
                bar.update(len(config.grid) - 1 - i)  # the stronger settings are not needed for the choice
                break
    finally:
        bar.close()
    return _Sweep(aligned_scores, adapter_scores, settings, dirs, same, answers)


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
    """Copy the chosen candidate: PEFT files and its correction report (path-free, so it moves as is)."""
    for item in candidate.iterdir():
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)


def _write_generations(path: Path, answers: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in answers:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
