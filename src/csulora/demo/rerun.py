"""Where the demo's models live and the command lines that rerun each step on them (issue 23):
written into results.json (``commands``) and report.md, with this run's actual paths.

Every row is one ``csulora correct`` (its chosen or fixed setting) and one ``csulora eval`` on the
test sets; the recommendation is one ``csulora tune`` on the demo world's validation files with the
statistics kept in OUTDIR. The commands use the demo's settings (CPU, float32, 24-token answers in
batches of 128), so they reproduce its numbers.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csulora.demo.context import (
    CALIBRATION_FILE,
    DEMO_GENERATION,
    DEMO_RUNS_ON,
    DEMO_TASK_TRAINING,
    calibration_harmful,
    report_specs,
    validation_specs,
)
from csulora.demo.rows import RowSpec
from csulora.methods.base import flag_name
from csulora.methods.registry import get_method, make_config

# `csulora eval`'s flag for each of the demo's test sets.
EVAL_FLAGS = {"harmful": "--harmful", "harmful_ood": "--ood", "benign": "--benign", "task": "--task"}
# The rows that are models as they are, not corrections: (row, model folder attribute, adapter or not).
REFERENCE_ROWS = (("base", "base", False), ("aligned", "aligned", False), ("attacked", "aligned", True))


def command(*words: Any) -> str:
    return " ".join(shlex.quote(str(word)) for word in words)


def generation_flags() -> list[str]:
    return ["--max-new-tokens", str(DEMO_GENERATION.max_new_tokens), "--device", DEMO_RUNS_ON["device"]]


def option_flags(options: dict[str, Any]) -> list[str]:
    """A method's options as `csulora correct` spells them (``num_layers=10`` -> ``--num-layers 10``)."""
    flags: list[str] = []
    for key, value in options.items():
        flags += [flag_name(key), f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def eval_command(world: Any, row: str, model: Path, adapter: Path | None) -> str:
    """`csulora eval` of one row on the demo's test sets."""
    sets = [word for name, spec in report_specs(world).items() for word in (EVAL_FLAGS[name], spec)]
    with_adapter = ["--adapter", adapter] if adapter is not None else []
    return command(
        "csulora", "eval", model, *with_adapter, *sets, "--batch-size", DEMO_GENERATION.batch_size,
        *generation_flags(), "--name", row, "-o", f"eval-{row}/",
    )  # fmt: skip


def correct_command(world: Any, spec: RowSpec, options: dict[str, Any], out_dir: Path) -> str:
    """`csulora correct` of the attacked adapter with one row's setting, with what the method reads."""
    impl = get_method(spec.method)
    sources: list[Any] = ["--base", world.base, "--aligned", world.aligned]  # the subspace, or the exact D
    if impl.needs_calibration(make_config(impl, options)):
        sources += ["--calibration", out_dir / CALIBRATION_FILE]
    return command(
        "csulora", "correct", world.attacked, "-o", f"fixed-{spec.row}/", "--method", spec.method,
        *option_flags(options), *sources,
    )  # fmt: skip


def calibrate_command(world: Any) -> str:
    """`csulora calibrate` as the demo ran it, on the attacked adapter's modules and the demo world's
    harmful calibration prompts, into the current folder (the demo's own statistics are
    OUTDIR/calibration.safetensors)."""
    from csulora.io.adapters import read_adapter

    targets = read_adapter(world.attacked).module_names()
    return command(
        "csulora", "calibrate", world.aligned, "--task", DEMO_TASK_TRAINING, "--harmful", calibration_harmful(world),
        "--targets", ",".join(targets), "--batch-size", DEMO_GENERATION.batch_size, *generation_flags(),
        "-o", CALIBRATION_FILE,
    )  # fmt: skip


def tune_command(world: Any, out_dir: Path) -> str:
    """The `csulora tune` command whose choice the recommended row reproduces: tune's defaults on
    the demo world's validation files, with the statistics the demo computed (kept in OUTDIR)."""
    chosen_on = validation_specs(world)
    return command(
        "csulora", "tune", world.attacked, "--aligned", world.aligned, "--calibration", out_dir / CALIBRATION_FILE,
        "--task", chosen_on["task"], "--harmful", *chosen_on["harmful"], "--benign", chosen_on["benign"],
        *generation_flags(), "-o", "tuned/",
    )  # fmt: skip


def row_commands(world: Any, plan: Sequence[RowSpec], sweeps: dict[str, dict], out_dir: Path) -> dict[str, list[str]]:
    """Row name -> the commands that rerun it: eval for the models as they are; correct, then eval
    of the corrected adapter, for each corrected row (a swept row at its chosen setting)."""
    commands = {
        row: [eval_command(world, row, getattr(world, model), world.attacked if adapter else None)]
        for row, model, adapter in REFERENCE_ROWS
    }
    for spec in plan:
        options = spec.setting(sweeps[spec.row]["chosen"]) if spec.swept else dict(spec.options)
        commands[spec.row] = [
            correct_command(world, spec, options, out_dir),
            eval_command(world, spec.row, world.aligned, Path(f"fixed-{spec.row}")),
        ]
    return commands


def where_models_live(world: Any) -> list[str]:
    """report.md's lines on the demo world's folders and the cache they are kept in."""
    from csulora.worlds.demo import default_cache_dir

    cache = os.environ.get("CSULORA_CACHE")
    shared = default_cache_dir()
    where = f"`$CSULORA_CACHE` is `{cache}`" if cache else "`$CSULORA_CACHE` is unset, so the temp dir"
    elsewhere = "" if Path(world.root).resolve() == shared.resolve() else " (this run was given another world folder)"
    folders = (
        f"- The demo world: `{world.root}`{elsewhere}: `base/` (the base model), `aligned/` (the aligned model, "
        "a full fine-tune of base), `attacked/` (the attack LoRA on aligned), `data/` (their training data and "
        "the prompt files the commands below read)."
    )
    cached = (
        f"- `csulora demo` keeps it in `$CSULORA_CACHE/demo-world-<fingerprint>` ({where}: `{shared}`), builds it "
        "on the first run and reuses it after; delete that folder to build it again."
    )
    return [folders, cached]


def rerun_lines(info: dict) -> list[str]:
    """report.md's section: where the models live, and each step's command line."""
    lines = ["## Where the models live, and how to rerun a step", "", *info["where_models_live"], ""]
    if info.get("calibrate_command"):
        lines += [f"The aligned model's statistics are kept as `{CALIBRATION_FILE}` here; they were computed as by:", "",
                  "```", info["calibrate_command"], "```", ""]  # fmt: skip
    intro = (
        "Each row, from any folder (the corrected adapters of the sweep are not kept; the recommendation's "
        "`csulora tune` line is in its section above):"
    )
    lines += [intro, "", "```"]
    for row, commands in info["commands"].items():
        lines += [f"# {row}", *commands]
    return lines + ["```"]
