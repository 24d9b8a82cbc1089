"""Correct the attacked adapter at one setting and score it: on validation with tune's own
scoring (:func:`csulora.tuning.scoring.score_state`, to choose) and on the test sets with eval's
harness (to report and plot). The grid points of every sweep are independent, so they are
scored on a small pool of single-threaded processes.

A setting that leaves the adapter unchanged bit for bit is not generated again: it scores what
the attacked adapter scores (:func:`with_reference`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.demo.context import DEMO_RUNS_ON, TUNE_DEFAULTS, DemoContext
from csulora.demo.rows import RowSpec
from csulora.eval.harness import EvalSets, evaluate_loaded
from csulora.methods.registry import get_method, make_config
from csulora.tuning.scores import SettingScores

# Report keys ending so are shares of the update's action kept on one kind of input
# (``harmful_action_kept``: the calibrated method's, docs/design.md §5c); the demo tabulates
# whichever of its columns a method declares this way.
ACTION_KEPT_SUFFIX = "_action_kept"


@dataclass(frozen=True)
class Reference:
    """The attacked adapter's scores, reused for every setting that leaves it unchanged."""

    validation: SettingScores
    test: dict
    records: list[dict]


def evaluate_row(
    ctx: DemoContext, adapter: Path | None, sets: EvalSets, name: str, params: dict | None = None
) -> tuple[dict, list[dict]]:
    """A test row (the base model when ``name`` is "base", else the aligned model with the adapter)
    and its generations."""
    from csulora.io.modeling import load_model, model_identity

    model_dir = ctx.world.aligned if name != "base" else ctx.world.base
    model, tokenizer = load_model(model_dir, adapter, **DEMO_RUNS_ON)
    return evaluate_loaded(
        model, tokenizer, sets, name=name, params=params, identity=model_identity(model_dir, adapter),
        generation=ctx.generation, with_margin=True, progress=False,
    )  # fmt: skip


def evaluate_into(ctx: DemoContext, adapter: Path | None, name: str, params: dict | None = None) -> dict:
    """A test row; its generations go to generations.jsonl."""
    row, records = evaluate_row(ctx, adapter, ctx.test, name, params)
    ctx.records.extend(records)
    return row


def score_validation(ctx: DemoContext, adapter: Path | None) -> SettingScores:
    """tune's scores of the aligned model (``adapter`` None) or of an adapter on it.

    As tune does it: the adapter attached with PEFT, not merged, so that switching it off
    gives the aligned model, which judges how likely the benign answers are (fluency).
    """
    from csulora.io.modeling import load_model
    from csulora.tuning.scoring import score_state

    model, tokenizer = load_model(ctx.world.aligned, adapter, merge=False, **DEMO_RUNS_ON)
    aligned_view = contextlib.nullcontext if adapter is None else model.disable_adapter
    return score_state(
        model, tokenizer, ctx.validation, batch_size=ctx.generation.batch_size,
        max_new_tokens=ctx.generation.max_new_tokens, seed=TUNE_DEFAULTS.seed, with_margin=False,
        aligned_view=aligned_view,
    ).scores  # fmt: skip


def correction_sources(ctx: DemoContext, method: str, options: dict) -> dict[str, Any]:
    """What the method reads: the subspace always (the report's audit numbers), the exact D and
    the statistics when it needs them."""
    impl = get_method(method)
    config = make_config(impl, options)
    sources: dict[str, Any] = {"subspace": ctx.subspace}
    if impl.needs_displacement(config):
        sources.update(base=ctx.world.base, aligned=ctx.world.aligned)
    if impl.needs_calibration(config):
        sources["calibration"] = ctx.calibration
    return sources


def correct_setting(ctx: DemoContext, method: str, options: dict, tag: str) -> tuple[Path, Any]:
    """The attacked adapter corrected with these options, in the scratch dir; (folder, report)."""
    from csulora.pipeline import api

    out = ctx.work / tag
    sources = correction_sources(ctx, method, options)
    report = api.correct_adapter(ctx.world.attacked, out, method, progress=False, **sources, **options)
    return out, report


def action_kept(method: str, report: Any) -> dict[str, dict[str, float]] | None:
    """The shares of the update's action kept per kind of input (harmful, task, ...) among the
    method's report columns: mean, min and max over modules; None when it declares none."""
    keys = [key for key, _, _ in get_method(method).report_columns if key.endswith(ACTION_KEPT_SUFFIX)]
    shares: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [m[key] for m in report.modules if m.get(key) is not None]
        if values:
            kind = key[: -len(ACTION_KEPT_SUFFIX)]
            shares[kind] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return shares or None


def is_unchanged(adapter: Path, attacked: Path) -> bool:
    """Whether a corrected adapter is the attacked one, bit for bit (a setting that changes nothing)."""
    from csulora.io.adapters import ADAPTER_WEIGHTS

    return (adapter / ADAPTER_WEIGHTS).read_bytes() == (attacked / ADAPTER_WEIGHTS).read_bytes()


def mark_unchanged(row: dict, unchanged: bool) -> dict:
    """Rows equal to the attacked adapter say so in the table (``same_as``), not only in fine print."""
    if unchanged:
        row["same_as"] = "attacked"
    return row


def sweep_point(ctx: DemoContext, spec: RowSpec, value: float) -> dict:
    """Correct at one grid value; score it on validation (to choose) and test (to plot).

    A setting that leaves the adapter unchanged is not scored here: it scores what the
    attacked adapter scores (:func:`with_reference`)."""
    from csulora.worlds.builder import one_thread

    with one_thread():
        options = spec.setting(value)
        adapter, report = correct_setting(ctx, spec.method, options, f"{spec.row}-{spec.knob}-{value:g}")
        unchanged = is_unchanged(adapter, ctx.world.attacked)
        point = {"value": value, "unchanged": unchanged, "action_kept": action_kept(spec.method, report)}
        if unchanged:
            return point
        point["validation"] = score_validation(ctx, adapter)
        # Every point is scored on test for the plot's curve; the chosen one's row and
        # generations are reused by the selection rather than generated a second time.
        point["test"], point["records"] = evaluate_row(ctx, adapter, ctx.test, spec.row, options)
    return point


def with_reference(point: dict, spec: RowSpec, attacked: Reference) -> dict:
    """A point that left the adapter unchanged gets the attacked adapter's scores, row and
    generations under its own row name and options."""
    if not point["unchanged"] or "validation" in point:
        return point
    test = copy.deepcopy(attacked.test)
    test.update(name=spec.row, params=spec.setting(point["value"]))
    records = [{**copy.deepcopy(r), "row": spec.row} for r in attacked.records]
    return {**point, "validation": attacked.validation, "test": test, "records": records}


def score_sweep_points(ctx: DemoContext, specs: Sequence[RowSpec], workers: int) -> dict[str, list[dict]]:
    """All grid points of all swept rows, on ``workers`` processes (each single-threaded).

    The points are independent, so two processes use both cores of a small machine where
    one single-threaded process would leave one idle; results come back in grid order.
    """
    jobs = [(spec, value) for spec in specs for value in spec.grid]
    if workers <= 1:
        scored = [sweep_point(ctx, spec, value) for spec, value in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        light = dataclasses.replace(ctx, records=[])  # workers return their records instead
        # spawn, not fork: forking a process whose torch thread pools already ran can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(sweep_point, light, spec, value) for spec, value in jobs]
            scored = [f.result() for f in futures]
    points: dict[str, list[dict]] = {spec.row: [] for spec in specs}
    for (spec, _), point in zip(jobs, scored):
        points[spec.row].append(point)
    return points
