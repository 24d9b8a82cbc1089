"""The validation data `tune` scores every model state on, read before any model is loaded.

Harmful sources (each judged on its own; default: AdvBench validation, the objectives'
validation split and airt-val, :mod:`csulora.eval.specs`), the task's validation items, and
benign prompts (default ``benign:validation``). Test splits are refused (:func:`check_not_held_out`),
and so is calibration task data that shares a prompt with the validation task, or that is the
very file the given statistics were calibrated on (docs/design.md §10).

Each set is given in a framing (:mod:`csulora.training.framing`): ``--framing`` for every set,
or a harmful source's own (``SPEC@FRAMING``), so tune can select on the plain and the framed
harmful validation prompts as separate sources (issue 24).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any

from csulora.errors import InputError, OptionError
from csulora.eval.specs import (
    DEFAULT_BENIGN,
    DEFAULT_HARMFUL,
    check_not_held_out,
    framed_prompts,
    load_prompts,
    named_sources,
)
from csulora.training.framing import PLAIN, Framing, load_framing

PathLike = str | os.PathLike


@dataclass(frozen=True)
class TuneData:
    """The validation data every setting is scored on (never a test split), and each set's
    framing by set name (``harmful:<source>``, ``task``, ``benign``; absent: plain)."""

    harmful: Mapping[str, Sequence[str]]  # source name -> prompts, each judged separately
    task: Sequence[Mapping[str, str]] = field(default=())  # {"prompt", "response"} items
    benign: Sequence[str] = field(default=())
    framings: Mapping[str, Framing] = field(default_factory=dict)

    def framing_of(self, set_name: str) -> Framing:
        return self.framings.get(set_name, PLAIN)

    def framing_keys(self) -> dict[str, dict]:
        """The framed sets' framings, for cache keys: empty when every set is plain."""
        return {name: f.key() for name, f in sorted(self.framings.items()) if not f.is_plain}

    def prompt_count(self) -> int:
        return sum(len(p) for p in self.harmful.values()) + len(self.task) + len(self.benign)

    def prompt_sets(self) -> list[tuple[str, list[str]]]:
        """Every prompt set by name: ``harmful:<source>``, ``task``, ``benign``."""
        sets = [(f"harmful:{name}", list(ps)) for name, ps in self.harmful.items()]
        if self.task:
            sets.append(("task", [item["prompt"] for item in self.task]))
        if self.benign:
            sets.append(("benign", list(self.benign)))
        return sets


@dataclass(frozen=True)
class LoadedData:
    data: TuneData
    description: dict[str, Any]


def load_tune_data(harmful: Sequence[str] | None, task: str | None, benign: str | None,
                   framing: str | None = None) -> LoadedData:  # fmt: skip
    """Read every prompt set before any model is loaded; refuse test splits. ``framing`` (a name or
    JSON file, None: plain): the chat form of every set but a harmful SPEC@FRAMING, which keeps its own."""
    from csulora.eval.tasks import load_task

    default = load_framing(framing)
    specs = list(harmful) if harmful else list(DEFAULT_HARMFUL)
    for spec in specs + [s for s in (task, benign) if s is not None]:
        check_not_held_out(spec)
    sources: dict[str, list[str]] = {}
    described: dict[str, Any] = {}
    framings: dict[str, Framing] = {}
    for name, spec in named_sources(specs, framing=framing).items():
        try:
            prompts, ref = framed_prompts(spec)
        except InputError as exc:
            if harmful:
                raise
            raise InputError(
                f"no --harmful given and the default validation sets ({', '.join(DEFAULT_HARMFUL)}) "
                f"are unavailable: {exc}; or give --harmful FILE ..."
            ) from None
        sources[name] = [p.text for p in prompts]
        framings[f"harmful:{name}"] = load_framing(ref) if ref is not None else default
        described[name] = {"spec": spec, "n": len(prompts), "framing": framings[f"harmful:{name}"].name}
    task_items: list[dict[str, str]] = []
    task_desc = None
    if task is not None:
        task_items = [{"prompt": item["prompt"], "response": item["response"]} for item in load_task(task)]
        task_desc = {"spec": task, "n": len(task_items)}
    benign_spec = benign if benign is not None else DEFAULT_BENIGN
    benign_prompts = [p.text for p in load_prompts(benign_spec)]
    benign_desc = {"spec": benign_spec, "n": len(benign_prompts), "default": benign is None}
    framings.update({"task": default, "benign": default})
    data = TuneData(harmful=sources, task=task_items, benign=benign_prompts,
                    framings={k: f for k, f in framings.items() if not f.is_plain})  # fmt: skip
    description = {"harmful": described, "task": task_desc, "benign": benign_desc, "framing": default.key()}
    return LoadedData(data, description)


def check_calibration_task(calibration_task: str | None, task: str | None, loaded: LoadedData) -> dict | None:
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




def check_calibration_file(calibration: PathLike | None, aligned: PathLike, task: str | None,
                           loaded: LoadedData) -> None:  # fmt: skip
    """A statistics file given with ``--calibration``: from the aligned model (its fingerprint), and
    not calibrated on the very validation data tune selects on (the task's sha256 in its record)."""
    if calibration is None:
        return
    from csulora.io.calibration_file import ROLE_ALIGNED, load_calibration
    from csulora.io.fingerprint import model_fingerprint
    from csulora.references.calibration.data import set_digest

    stats = load_calibration(calibration)
    try:
        stats.check_role(ROLE_ALIGNED)
        stats.check_model(model_fingerprint(aligned)["digest"], aligned)
        calibrated_on = (stats.info.get("task") or {}).get("sha256")
    finally:
        stats.close()
    if not loaded.data.task or calibrated_on is None:
        return
    validation = set_digest({"prompt": item["prompt"], "response": item["response"]} for item in loaded.data.task)
    if validation == calibrated_on:
        raise OptionError(
            f"--task {task}: it is the very data {calibration} was calibrated on (same sha256); tune would select on "
            "its training data: give held-out validation data"
        )


def check_update_statistics_file(update_statistics: PathLike | None, aligned: PathLike, update: PathLike) -> None:
    """A file given with ``--update-statistics``: the fine-tuned model's statistics (role ``update``),
    measured on this very update fine-tuned from this aligned model (checked before any model loads,
    as ``correct`` checks it: :func:`csulora.pipeline.references.check_update_statistics`)."""
    if update_statistics is None:
        return
    from csulora.io.calibration_file import ROLE_UPDATE, load_calibration
    from csulora.pipeline.references import check_update_statistics

    stats = load_calibration(update_statistics)
    try:
        stats.check_role(ROLE_UPDATE)
        check_update_statistics(stats, Path(update), Path(aligned))
    finally:
        stats.close()
