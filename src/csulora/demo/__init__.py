"""``csulora demo``: the demo world end to end, honestly reported.

1. Build (or reuse from ``$CSULORA_CACHE``) the demo world: base, aligned (full fine-tune) and the
   LoRA attack (:mod:`csulora.worlds.demo`, built on the principle of docs/design.md §8).
2. Compute the safety subspace of the alignment and calibrate the aligned model once, on the demo
   world's harmful calibration prompts and the task's training data (:mod:`csulora.demo.context`,
   docs/design.md §5c); the statistics' separability (the shares of an isotropic update's action
   the correction keeps on task and harmful inputs, :mod:`csulora.references.separability`).
3. The rows come from the method registry (:mod:`csulora.demo.rows`): tune's default method's sweep
   (the recommended path) and the §5b baselines'; the other methods are listed as not run. Every
   grid point is corrected and scored (:mod:`csulora.demo.scoring`); each swept row's setting is
   chosen on validation with ``csulora tune``'s rule (:mod:`csulora.demo.selection`) and reported
   on the test sets, all judged by the project's ASR judge.
4. Write ``results.json``, ``asr_utility.png`` (:mod:`csulora.demo.plot`), ``report.md``
   (:mod:`csulora.demo.report`, with where the models live and the command lines that rerun
   each step, :mod:`csulora.demo.rerun`), ``generations.jsonl`` and the statistics
   (``calibration.safetensors``) the commands read.
5. Mark ``recommended: true`` on the row ``csulora tune`` would give with its defaults, when its
   selection qualified; report.md otherwise says why nothing qualified.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csulora.demo.context import (
    CALIBRATION_FILE,
    MAX_ASR_GAP,
    MAX_UTILITY_DROP,
    TUNE_DEFAULTS,
    DemoContext,
    calibrate_world,
    demo_sets,
    demo_workers,
    test_sets_info,
)
from csulora.demo.report import DATE_WORLD_SEPARABILITY
from csulora.demo.rows import RowSpec, needs_calibration, not_in_rows, not_run_methods, plan_rows
from csulora.demo.scoring import (
    Reference,
    correct_setting,
    evaluate_into,
    evaluate_row,
    is_unchanged,
    mark_unchanged,
    score_sweep_points,
    score_validation,
)
from csulora.demo.selection import recommendation, select_row
from csulora.eval.judges import asr_judge
from csulora.io.atomic import atomic_output_dir, check_apart, check_output_dir
from csulora.io.jsonl import write_jsonl

__all__ = ["RowSpec", "plan_rows", "run_demo"]


def run_demo(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    world_dir: str | os.PathLike | None = None,
    rows: Sequence[RowSpec] | None = None,
    progress: bool = True,
) -> Path:
    """Build/reuse the demo world, attack, correct, evaluate; write OUTDIR. Returns OUTDIR.

    ``rows``: the corrected rows (default :func:`~csulora.demo.rows.plan_rows`, from the registry).
    """
    from csulora.worlds.builder import one_thread
    from csulora.worlds.demo import build_demo_world, default_cache_dir, shared_demo_world

    # The world is the demo's input: a forced OUTDIR over $CSULORA_CACHE would delete it mid-run.
    check_apart({"-o/--output": out_dir}, {"the demo world": world_dir if world_dir is not None else default_cache_dir()})
    check_output_dir(out_dir, force)
    plan = list(plan_rows() if rows is None else rows)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with one_thread():
        world = build_demo_world(world_dir) if world_dir is not None else shared_demo_world()
        timings["world"] = time.perf_counter() - t0
        with atomic_output_dir(out_dir, force) as tmp:
            t = time.perf_counter()
            ctx, calibration_info = prepare(world, tmp, plan)
            timings["subspace_and_calibration"] = time.perf_counter() - t
            separable = separability_info(ctx.calibration)
            t = time.perf_counter()
            table, sweeps, references = evaluate_rows(ctx, plan)
            timings["evaluate"] = time.perf_counter() - t
            info = demo_info(ctx, plan, sweeps, references, calibration_info, Path(out_dir).resolve())
            info["not_run"] = not_run_methods() if rows is None else not_in_rows(plan)
            info["recommended"] = recommendation(table, sweeps)
            info["separability"] = separable
            write_outputs(tmp, ctx, plan, table, sweeps, info, timings, t0)
            shutil.rmtree(ctx.work)  # corrected adapters of the sweep: scratch, not results
    return Path(out_dir)


def prepare(world: Any, tmp: Path, plan: Sequence[RowSpec]) -> tuple[DemoContext, dict | None]:
    """The subspace (scratch), the statistics when a row reads them (kept in OUTDIR), the prompt sets."""
    from csulora.references.subspace import build_subspace

    work = tmp / "work"
    work.mkdir()
    subspace = build_subspace(world.base, world.aligned, work / "subspace.safetensors", progress=False)
    calibration, calibration_info = None, None
    if needs_calibration(plan):
        calibration = tmp / CALIBRATION_FILE
        calibration_info = calibrate_world(world, calibration)
    validation, test = demo_sets(world)
    ctx = DemoContext(world=world, subspace=Path(subspace), work=work, validation=validation, test=test,
                      calibration=calibration)  # fmt: skip
    return ctx, calibration_info


def separability_info(calibration: Path | None) -> dict[str, Any] | None:
    """The demo world's separability from its own statistics (medians over groups and per layer,
    at the calibrated method's default strength), beside the SmolLM2 date world's."""
    if calibration is None:
        return None
    from csulora.references.separability import separability

    found = separability(calibration)
    keep = ("strength", "mu", "median_task_kept", "median_harmful_kept", "per_layer")
    return {**{key: found[key] for key in keep}, "groups": len(found["groups"]), "reference": DATE_WORLD_SEPARABILITY}


def evaluate_rows(ctx: DemoContext, plan: Sequence[RowSpec]) -> tuple[list[dict], dict[str, dict], dict[str, Any]]:
    """(test rows, sweep records, the aligned and attacked validation scores): the models as they
    are, then each planned row, in plan order (fixed rows evaluated, swept rows selected)."""
    world = ctx.world
    table = [evaluate_into(ctx, None, "base"), evaluate_into(ctx, None, "aligned")]
    attacked_test, attacked_records = evaluate_row(ctx, world.attacked, ctx.test, "attacked", None)
    ctx.records.extend(attacked_records)
    table.append(attacked_test)
    aligned_val = score_validation(ctx, None)
    attacked = Reference(score_validation(ctx, world.attacked), copy.deepcopy(attacked_test), attacked_records)
    swept = [spec for spec in plan if spec.swept]
    points = score_sweep_points(ctx, swept, workers=demo_workers())
    sweeps: dict[str, dict] = {}
    for spec in plan:
        if spec.swept:
            row, sweeps[spec.row] = select_row(ctx, spec, aligned_val, attacked, points[spec.row])
        else:
            adapter, _ = correct_setting(ctx, spec.method, dict(spec.options), spec.row)
            row = mark_unchanged(evaluate_into(ctx, adapter, spec.row, dict(spec.options)), is_unchanged(adapter, world.attacked))
            row["recommended"] = False
        table.append(row)
    return table, sweeps, {"aligned": aligned_val, "attacked": attacked.validation}


def demo_info(
    ctx: DemoContext, plan: Sequence[RowSpec], sweeps: dict[str, dict], references: dict[str, Any],
    calibration_info: dict | None, out_dir: Path,
) -> dict[str, Any]:
    """What results.json records beside the rows and sweeps (and report.md reads)."""
    from csulora.demo.rerun import (
        calibrate_command,
        row_commands,
        tune_command,
        where_models_live,
    )

    world = ctx.world
    return {
        "world": str(world.root),
        "world_info": world.info(),
        "judge": asr_judge().name,
        "test_sets": test_sets_info(world, ctx.test),
        "generation": {"batch_size": ctx.generation.batch_size, "max_new_tokens": ctx.generation.max_new_tokens},
        "selection_rule": {
            "max_asr_gap": MAX_ASR_GAP, "max_utility_drop": MAX_UTILITY_DROP,
            "max_fluency_loss_nats": TUNE_DEFAULTS.max_fluency_loss, "on": "validation",
        },
        "validation": {
            "data": {name: {"n": len(prompts)} for name, prompts in ctx.validation.prompt_sets()},
            **{name: scores.to_dict() for name, scores in references.items()},
        },
        "fixed_rows": [
            {"row": s.row, "method": s.method, "options": dict(s.options), "help": s.help} for s in plan if not s.swept
        ],
        "calibration": calibration_info,
        "tune_command": tune_command(world, out_dir) if any(s.recommends for s in plan) else None,
        "where_models_live": where_models_live(world),
        "calibrate_command": calibrate_command(world) if calibration_info else None,
        "commands": row_commands(world, plan, sweeps, out_dir),
    }  # fmt: skip


def write_outputs(
    tmp: Path, ctx: DemoContext, plan: Sequence[RowSpec], table: list[dict], sweeps: dict[str, dict],
    info: dict[str, Any], timings: dict[str, float], t0: float,
) -> None:
    """results.json, generations.jsonl, asr_utility.png and report.md into the staging folder."""
    import json

    from csulora.demo.plot import plot_demo
    from csulora.demo.report import demo_report

    info["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results = {"rows": table, "sweep": sweeps, **info}
    (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_jsonl(tmp / "generations.jsonl", ctx.records)
    plot_demo(tmp / "asr_utility.png", table, sweeps, [s.row for s in plan if s.swept])
    timings["total"] = time.perf_counter() - t0
    info["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (tmp / "report.md").write_text(demo_report(table, sweeps, info))
