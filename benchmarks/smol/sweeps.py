"""Validation sweeps of every correction's knob, and the selection of each row's setting."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.smol.calibrated import TUNED_ROWS, tuned_row
from benchmarks.smol.corrections import corrected_variant
from benchmarks.smol.evaluation import (
    VAL_SETS, Variant, job_variant, generations, reference_variants, setting_scores,
)
from benchmarks.smol.pipeline import Context, worker_ctx, run_jobs, stage, write_json


@dataclass(frozen=True)
class Sweep:
    """One knob swept weakest first. ``identity``: the knob value that is the adapter itself."""

    row: str  # results row this sweep chooses
    method: str  # registry method, or "resta-full" (dense, in the benchmark)
    knob: str
    grid: tuple[float, ...]  # weakest first
    fixed: dict = field(default_factory=dict)
    identity: float | None = None
    tune_method: str = "resta"  # whose TuneConfig rules select (selection logic is knob-agnostic)
    full_curve: bool = True  # False: stop at the first qualifying setting (same choice, less compute)
    adapter: str = "attacked"
    prefetch: int = 2  # early-stopping sweeps: points evaluated up front, in parallel


def sweeps(ctx: Context, restore_for_csulora: float) -> list[Sweep]:
    from csulora.methods.registry import get_method

    resta_grid = get_method("resta").tuning.grid
    r = ctx.recipe
    return [
        # RESTA over tune's default RESTA grid (the calibrated rows are tune's own runs:
        # benchmarks/smol/calibrated.py)
        Sweep("resta", "resta", "restore", resta_grid, identity=0.0, tune_method="resta",
              full_curve=False, prefetch=5),
        Sweep("scale", "scale", "factor", r.scale_grid, identity=1.0, tune_method="scale"),
        Sweep("csulora", "csulora", "gamma", r.csulora_grid, fixed={"schedule": "energy"}, identity=0.0,
              tune_method="csulora"),
        Sweep("csulora-ratio", "csulora", "gamma", r.csulora_ratio_grid, fixed={"schedule": "ratio"}, identity=0.0,
              tune_method="csulora"),
        Sweep("csulora-constant", "csulora", "gamma", r.csulora_constant_grid, fixed={"schedule": "constant"},
              identity=0.0, tune_method="csulora"),
        Sweep("safelora", "safelora", "threshold", r.safelora_threshold_grid,
              fixed={"select": "threshold", "projection": "approx"}, tune_method="safelora"),
        Sweep("safelora-number", "safelora", "num_layers", r.safelora_num_layers_grid,
              fixed={"select": "number", "projection": "approx"}, tune_method="safelora"),
        Sweep("csulora+restore", "csulora", "gamma", r.csulora_restore_gamma_grid,
              fixed={"schedule": "energy", "restore": restore_for_csulora}, tune_method="csulora", full_curve=False,
              prefetch=3),
        Sweep("resta-full", "resta-full", "restore", r.resta_full_grid, identity=0.0, full_curve=False, prefetch=3),
    ]


def sweep_variant(ctx: Context, sw: Sweep, value: float) -> Variant:
    if sw.identity is not None and value == sw.identity and not sw.fixed.get("restore"):
        return Variant(sw.adapter, "aligned", f"adapters/{sw.adapter}")
    if sw.method == "resta-full":
        return Variant(f"{sw.adapter}__resta-full_restore={value:g}", "aligned", f"adapters/{sw.adapter}", dense_restore=value)
    return corrected_variant(ctx, sw.adapter, sw.method, {**sw.fixed, sw.knob: value})


def tune_config(method: str):
    """tune's default rules (max ASR gap 0.05 per source, max utility drop 5%)."""
    from csulora.tuning.config import TuneConfig

    return TuneConfig(method=method)


def run_sweep(ctx: Context, sw: Sweep) -> dict:
    """Score every grid value on validation (or stop at the first that qualifies) and select."""
    from csulora.tuning.scores import ScoredSetting
    from csulora.tuning.selection import select_setting

    refs = reference_variants()
    aligned = setting_scores(ctx, refs["aligned"], VAL_SETS)
    adapter = setting_scores(ctx, refs[sw.adapter], VAL_SETS)
    config = tune_config(sw.tune_method)
    scored, points = [], []
    for value in sw.grid:
        v = sweep_variant(ctx, sw, value)
        start = time.perf_counter()
        sc = setting_scores(ctx, v, VAL_SETS)
        scored.append(ScoredSetting(value, sc))
        points.append({"value": value, "variant": v.key, "scores": sc.to_dict(), "seconds": round(time.perf_counter() - start, 1)})
        if not sw.full_curve and select_setting(scored[-1:], aligned, config, adapter=adapter).qualified:
            break
    selection = select_setting(scored, aligned, config, adapter=adapter)
    chosen, why = selection.chosen, selection.summary
    if chosen is None:
        chosen, why = fallback_choice(scored, aligned, adapter, config), "no setting qualified; " + selection.summary
    verdicts = {v.value: v.to_dict() for v in selection.verdicts}
    for point in points:
        point["verdict"] = verdicts.get(point["value"])
    return {
        "row": sw.row, "method": sw.method, "knob": sw.knob, "fixed": sw.fixed, "adapter": sw.adapter,
        "grid": list(sw.grid), "full_curve": sw.full_curve, "points": points,
        "qualified": selection.qualified, "chosen": chosen, "why": why, "notes": list(selection.notes),
    }


def fallback_choice(scored, aligned, adapter, config) -> float:
    """When nothing qualifies under tune's rule, the row still needs a setting; safety first:
    among settings whose ASR is within the gap on every source, the one with the highest
    validation utility (weakest on ties); if none is safe, the one with the lowest worst-source
    ASR gap (higher utility on ties). The sweep records that no setting qualified."""

    def worst_gap(s):
        return max(s.scores.asr[n].value - aligned.asr[n].value for n in aligned.asr)

    def util(s):
        return s.scores.utility.value if s.scores.utility is not None else 0.0

    safe = [s for s in scored if worst_gap(s) <= config.max_asr_gap + 1e-9]
    if safe:
        return max(safe, key=util).value  # max keeps the first (weakest) of equals
    return min(scored, key=lambda s: (round(worst_gap(s), 9), -util(s))).value


def job_sweep_point(paths: tuple[str, str, str], row: str, value: float, set_names: tuple[str, ...]) -> str:
    ctx = worker_ctx(*paths)
    sw = {s.row: s for s in sweeps(ctx, ctx.recipe.csulora_restore)}[row]
    v = sweep_variant(ctx, sw, value)
    generations(ctx, v, set_names)
    return v.key


def rows_needing(sweep_row: str) -> tuple[str, ...]:
    """The table rows chosen from a sweep: its own, or the row whose mode it sweeps."""
    rows = tuple(row for row, modes in MODE_SWEEPS.items() if sweep_row in modes) or (sweep_row,)
    return rows + (("safelora-default",) if sweep_row == "safelora-number" else ())


def wanted_sweeps(ctx: Context) -> list[Sweep]:
    """The sweeps the rows of this run need."""
    return [sw for sw in sweeps(ctx, ctx.recipe.csulora_restore) if ctx.wants(*rows_needing(sw.row))]


def prefetch_sweeps(ctx: Context) -> None:
    """Evaluate every point the sweeps will certainly need, in parallel, before selecting."""
    adapters = {sw.adapter for sw in wanted_sweeps(ctx)}
    jobs: list[tuple[Callable, tuple]] = [
        (job_variant, (name, VAL_SETS)) for name in ("aligned", "attacked", "benign") if name == "aligned" or name in adapters
    ]
    for sw in wanted_sweeps(ctx):
        if ctx.path("sweeps", f"{sw.row}.json").exists():
            continue
        values = [v for v in sw.grid if v != sw.identity or sw.fixed.get("restore")]
        for value in values if sw.full_curve else values[: sw.prefetch]:
            jobs.append((job_sweep_point, (sw.row, value, VAL_SETS)))
    run_jobs(ctx, jobs)


@stage("sweeps", "sweep every correction's knob on the validation sets", needs=("subspace", "benign_adapter"))
def stage_sweeps(ctx: Context) -> dict:
    prefetch_sweeps(ctx)
    out = {}
    for sw in wanted_sweeps(ctx):
        path = ctx.path("sweeps", f"{sw.row}.json")
        if path.exists():
            out[sw.row] = json.loads(path.read_text())["chosen"]
            continue
        start = time.perf_counter()
        ctx.log(f"[smol] sweep {sw.row}: {sw.method} {sw.knob} over {list(sw.grid)}")
        result = run_sweep(ctx, sw)
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(path, result)
        out[sw.row] = result["chosen"]
        ctx.log(f"[smol] sweep {sw.row}: chose {sw.knob}={result['chosen']} ({result['why']})")
    return {"chosen": out}


def load_sweep(ctx: Context, row: str) -> dict:
    return json.loads(ctx.path("sweeps", f"{row}.json").read_text())


def val_point(sweep: dict, value: float) -> dict:
    return next(p for p in sweep["points"] if p["value"] == value)


@stage("select", "each row's setting, chosen on validation only", needs=("sweeps", "tune"))
def stage_select(ctx: Context) -> dict:
    rows: dict[str, dict] = {
        name: {"variant": name, "params": {}} for name in ("base", "aligned", "attacked", "benign") if ctx.wants(name)
    }
    by_row = {sw.row: sw for sw in sweeps(ctx, ctx.recipe.csulora_restore)}
    for row in ("scale", "resta", "csulora+restore", "resta-full"):
        if ctx.wants(row):
            rows[row] = selected_row(ctx, by_row[row], load_sweep(ctx, row))
    for row in TUNED_ROWS:  # tune's own picks (the calibrated method, its default)
        if ctx.wants(row):
            rows[row] = tuned_row(ctx, row)
    # Rows whose method has a discrete mode: each mode's knob was swept on its own; the row
    # takes the validation-best mode (Safe LoRA: threshold vs number; CSULoRA: its schedules).
    for row, mode_rows in MODE_SWEEPS.items():
        if not ctx.wants(row):
            continue
        best_row, best = choose_mode({name: load_sweep(ctx, name) for name in mode_rows})
        rows[row] = selected_row(ctx, by_row[best_row], best)
        rows[row]["why"] = f"{best_row} sweep (best of {', '.join(mode_rows)}): {best['why']}"
    if ctx.wants("safelora-default"):
        rows["safelora-default"] = {
            "variant": sweep_variant(ctx, by_row["safelora-number"], 10).key,
            "params": {"method": "safelora", "select": "number", "num_layers": 10, "projection": "approx"},
            "why": "the published default (number mode, N = 10); not tuned",
        }
    write_json(ctx.path("select", "rows.json"), rows)
    return {"rows": rows}


# row -> the sweeps of its modes (the first one is the row's own sweep)
MODE_SWEEPS = {
    "safelora": ("safelora", "safelora-number"),
    "csulora": ("csulora", "csulora-ratio", "csulora-constant"),
}


def selected_row(ctx: Context, sw: Sweep, sweep: dict) -> dict:
    return {
        "variant": sweep_variant(ctx, sw, sweep["chosen"]).key,
        "params": {"method": sw.method, **sw.fixed, sw.knob: sweep["chosen"]},
        "qualified_on_validation": sweep["qualified"], "why": sweep["why"],
    }


def choose_mode(sweeps_by_row: dict[str, dict]) -> tuple[str, dict]:
    """Prefer a mode whose choice qualified; among those, the higher validation utility;
    if none qualified, the lower worst-source validation ASR, then the higher utility (as
    ``fallback_choice`` breaks ties within one sweep). Full ties: the first listed."""

    def key(sweep: dict):
        point = val_point(sweep, sweep["chosen"])
        util = (point["scores"].get("utility") or {}).get("value") or 0.0
        worst_asr = max(a["value"] for a in point["scores"]["asr"].values())
        return (True, util, 0.0) if sweep["qualified"] else (False, -round(worst_asr, 9), util)

    best = max(sweeps_by_row, key=lambda name: key(sweeps_by_row[name]))  # max keeps the first of equals
    return best, sweeps_by_row[best]
