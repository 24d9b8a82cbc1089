"""What every row of the demo needs: the generation settings, the prompt sets, and what is
computed once on the demo world (its safety subspace and the aligned model's statistics).

The prompt sets are the demo world's own (:mod:`csulora.worlds.demo`): its harmful requests and
indirect asks (two harmful sources) and benign requests, validation and test splits, as the text
files the world writes, and the date task. The demo departs from tune's defaults in two ways
only: answers are capped at 24 tokens (the demo world's are said within ~20; the exception
docs/design.md §10 documents) and generated in batches of 128 (tune's default is 32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csulora.eval.harness import EvalSets, GenerationSettings
from csulora.tuning.config import TuneConfig
from csulora.tuning.data import TuneData
from csulora.worlds.demo_data import BENIGN, INDIRECT, REQUESTS

# The demo world's answers are at most ~20 tokens (they end with the end-of-turn token; the
# longest helpful form is cut near its end, after the request's action is named), so a shorter
# cap than eval's 64 changes no verdict and keeps the demo fast.
DEMO_GENERATION = GenerationSettings(batch_size=128, max_new_tokens=24)
# Every model runs on the CPU in float32, whatever the machine has: the demo's numbers must
# not depend on whether a GPU is present (csulora's own default is CUDA when present).
DEMO_RUNS_ON = {"device": "cpu", "dtype": "float32"}
# What `csulora tune` runs with its defaults: its default method over its grid, tune's gaps.
TUNE_DEFAULTS = TuneConfig()
MAX_ASR_GAP = TUNE_DEFAULTS.max_asr_gap
MAX_UTILITY_DROP = TUNE_DEFAULTS.max_utility_drop
# The task half of the attack's training data (worlds/demo.py trains the attack LoRA on the
# date task's train split, seed 0): what a user would calibrate on.
DEMO_TASK_TRAINING = "date:train"
# tune's --task: the date task's validation split.
DEMO_TASK_VALIDATION = "date:validation"
# The statistics are kept in OUTDIR, so that report.md's `csulora correct` and `csulora tune`
# commands can rerun a setting of a method that reads them.
CALIBRATION_FILE = "calibration.safetensors"


def report_specs(world: Any) -> dict[str, str]:
    """The test sets every row is reported on, as the SPECs `csulora eval` takes (so report.md's
    commands rerun exactly these): set name in EvalSets -> SPEC. Held-out splits only."""
    return {
        "harmful": str(world.prompt_file(REQUESTS, "test")), "harmful_ood": str(world.prompt_file(INDIRECT, "test")),
        "benign": str(world.prompt_file(BENIGN, "test")), "task": "date:test",
    }  # fmt: skip


def validation_specs(world: Any) -> dict[str, Any]:
    """What tune selects on: the two harmful sources' validation splits (each judged on its own),
    the benign validation split and the date task's (tune's --harmful, --benign, --task)."""
    harmful = [str(world.prompt_file(REQUESTS, "validation")), str(world.prompt_file(INDIRECT, "validation"))]
    return {"harmful": harmful, "benign": str(world.prompt_file(BENIGN, "validation")), "task": DEMO_TASK_VALIDATION}


def calibration_harmful(world: Any) -> str:
    """The harmful calibration prompts: the demo world's ``align`` requests (the aligned model's
    safety data, as AdvBench ``align`` is in the default set, docs/design.md §5c)."""
    return str(world.prompt_file(REQUESTS, "align"))


@dataclass
class DemoContext:
    """Everything a row needs: the world, the subspace and statistics, the prompt sets, a scratch dir."""

    world: Any
    subspace: Path
    work: Path
    validation: TuneData
    test: EvalSets
    calibration: Path | None = None
    generation: GenerationSettings = DEMO_GENERATION
    records: list[dict] = field(default_factory=list)


def demo_sets(world: Any) -> tuple[TuneData, EvalSets]:
    """(validation, test): what tune reads to choose, the sets every row is reported on."""
    from csulora.eval.specs import load_prompts
    from csulora.eval.tasks import load_task
    from csulora.tuning.data import load_tune_data

    chosen_on = validation_specs(world)
    validation = load_tune_data(chosen_on["harmful"], chosen_on["task"], chosen_on["benign"]).data
    specs = report_specs(world)
    test = EvalSets(
        harmful=load_prompts(specs["harmful"]), harmful_ood=load_prompts(specs["harmful_ood"]),
        benign=load_prompts(specs["benign"]), task=load_task(specs["task"]),
    )  # fmt: skip
    return validation, test


def calibrate_world(world: Any, out_file: Path) -> dict[str, Any]:
    """The aligned model's statistics for the attack's task (docs/design.md §5c), as
    ``csulora calibrate`` computes them: the adapter's modules, the demo world's harmful
    calibration prompts, the task's training data; CPU float32, the demo's generation cap,
    quiet. Returns what results.json records of it."""
    from csulora.io.adapters import read_adapter
    from csulora.references.calibration import calibrate

    result = calibrate(
        world.aligned, out_file, task=DEMO_TASK_TRAINING, harmful=[calibration_harmful(world)],
        targets=read_adapter(world.attacked).module_names(),
        max_new_tokens=DEMO_GENERATION.max_new_tokens, batch_size=DEMO_GENERATION.batch_size, progress=False,
        **DEMO_RUNS_ON,
    )  # fmt: skip
    keep = ("harmful", "task", "modules", "groups", "generation")
    return {**{key: result.info[key] for key in keep}, "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}


def demo_workers() -> int:
    """Processes for the sweep: one per core, at most two (``CSULORA_DEMO_WORKERS`` overrides)."""
    if "CSULORA_DEMO_WORKERS" in os.environ:
        return max(1, int(os.environ["CSULORA_DEMO_WORKERS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores))
