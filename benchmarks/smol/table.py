"""Every method on every update of a world, chosen by `csulora tune` on validation (issue 22 §4).

- ``table_tune`` (the triage world's ``triage_table_tune``): ``csulora tune UPDATE --method all``
  once per update of the world (the date world: the attacked adapter, the benign adapter, the
  full fine-tune), every other option at its default: the harmful sources AdvBench validation,
  the objectives' validation split and airt-val, the benign validation half, the world's task's
  validation split (``date:validation``, ``triage:validation``). The world's attack adapter is
  swept with ``--full-sweep``, so the Pareto plot draws every method's whole validation curve;
  the others lazily, as a user runs tune. An update attacking in a framing (the triage world's
  ``triage-aoa``: ``aoa``) is tuned with the main sources' validation splits in that framing as
  two more harmful sources (``advbench:validation@aoa``, ``objectives:validation@aoa``), so its
  pick is bounded in both forms; its record says so (``harmful``). One score cache per world
  serves its runs (the aligned model is scored once) and any rerun (nothing is scored twice).
- ``table_picks``: each method's own pick (tune.json ``choice.per_method``), written by
  ``csulora correct`` with the sources tune gave that method; a method with no qualifying
  setting is shown at its strongest setting, marked so. The overall pick is checked to be byte
  for byte what tune wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.smol.evaluation import Variant
from benchmarks.smol.pipeline import RUNS_ON, Context, world_stage, write_json
from benchmarks.smol.worlds import TABLE_METHODS, Update
from benchmarks.smol.statistics import calibration_file, update_folder, update_statistics_file

SCORE_CACHE = ("table", "score-cache")  # in the world's folder


def tune_task(ctx: Context) -> str:
    return f"{ctx.world.task}:validation"  # the task's validation split: never test data


def tune_harmful(update: Update) -> list[str] | None:
    """tune's harmful sources for ``update``: its defaults (None), plus, for an update attacking in
    a framing, AdvBench's and the objectives' validation splits in it (issue 24: tune selects on both)."""
    from csulora.eval.specs import DEFAULT_HARMFUL, OBJECTIVES_VALIDATION_SPEC
    from csulora.training.framing import FRAMING_SEPARATOR

    if update.framing is None:
        return None
    framed = (f"{spec}{FRAMING_SEPARATOR}{update.framing}" for spec in ("advbench:validation", OBJECTIVES_VALIDATION_SPEC))
    return [*DEFAULT_HARMFUL, *framed]


def tune_dir(ctx: Context, update: str) -> Path:
    return ctx.world_path("table", "tune", update)


def wanted_updates(ctx: Context) -> list[str]:
    return [u for u in ctx.world.update_names if ctx.wants(*ctx.world.correction_rows(u))]


@world_stage("table_tune", "csulora tune --method all on each update (the attack adapter: --full-sweep)",
             needs=lambda w: (w.stage_name("calibration"), w.stage_name("update_statistics")),
             for_rows=lambda w: w.corrections)
def stage_table_tune(ctx: Context) -> dict:
    return {update: tune_update(ctx, update) for update in wanted_updates(ctx)}


def tune_update(ctx: Context, update: str) -> dict:
    """One update's tune run (reused when its record is written: the stage resumes per update)."""
    from csulora.eval.specs import DEFAULT_HARMFUL
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.runner import tune_adapter

    done = ctx.world_path("table", "tune", f"{update}.done.json")
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    harmful = tune_harmful(ctx.world.update(update))
    result = tune_adapter(
        update_folder(ctx, update), tune_dir(ctx, update), aligned=ctx.path("aligned"), base=ctx.path("base"),
        calibration=calibration_file(ctx), update_statistics=update_statistics_file(ctx, update),
        config=TuneConfig(method="all", full_sweep=update == ctx.world.attack.name), harmful=harmful,
        task=tune_task(ctx), force=True, progress=False, score_cache=ctx.world_path(*SCORE_CACHE), **RUNS_ON,
    )  # fmt: skip
    info = {"seconds": round(time.perf_counter() - start, 1), "qualified": result.qualified,
            "method": result.chosen_method, "params": result.chosen_params, "summary": result.selection.summary,
            "scored": result.run.get("score_cache"),
            "harmful": harmful or list(DEFAULT_HARMFUL)}  # fmt: skip
    write_json(done, info)
    ctx.log(f"[smol] tune {update}: {result.selection.summary} ({info['seconds']:.0f} s)")
    return info


def tune_record(ctx: Context, update: str) -> dict:
    return json.loads((tune_dir(ctx, update) / "tune.json").read_text())


def method_pick(record: dict, method: str) -> dict:
    """A method's own pick in a tune.json: its qualifying setting, else its strongest scored one."""
    own = record["choice"]["per_method"].get(method)
    settings = [s for s in record["settings"] if s["method"] == method]
    if own is None or not settings:
        raise RuntimeError(f"tune.json has no {method} sweep (was it skipped? see its 'inputs')")
    if own["qualified"]:
        setting = next(s for s in settings if s["value"] == own["chosen"])
    else:
        setting = settings[-1]  # weakest first: the last scored is the strongest
    return {"method": method, "knob": setting["knob"], "value": setting["value"], "params": setting["params"],
            "qualified_on_validation": own["qualified"], "summary": own["summary"],
            "tune_pick": record["choice"]["method"] == method and record["choice"]["qualified"]}  # fmt: skip


@world_stage("table_picks", "each method's pick on each update, written by csulora correct",
             needs=lambda w: (w.stage_name("table_tune"),), for_rows=lambda w: w.corrections)
def stage_table_picks(ctx: Context) -> dict:
    picks = {}
    for update in wanted_updates(ctx):
        record = tune_record(ctx, update)
        for method in TABLE_METHODS:
            pick = method_pick(record, method)
            pick["variant"] = write_pick(ctx, update, pick).to_dict()
            picks[f"{update}+{method}"] = {"update": update, **pick}
            if pick["tune_pick"]:
                check_same_as_tune(ctx, update, Variant.from_dict(pick["variant"]))
    write_json(ctx.world_path("table", "picks.json"), picks)
    return {"rows": len(picks), "qualified": sum(p["qualified_on_validation"] for p in picks.values())}


def write_pick(ctx: Context, update: str, pick: dict) -> Variant:
    """``csulora correct`` at the pick (cached: rewritten only when the pick changed)."""
    from csulora.io.input_kind import is_checkpoint
    from csulora.pipeline.api import correct_adapter

    row = f"{update}+{pick['method']}"
    out = ctx.world_path("table", "picks", row)
    spec = {"method": pick["method"], "params": pick["params"]}
    spec_file = ctx.world_path("table", "picks", f"{row}.json")
    if not (spec_file.exists() and json.loads(spec_file.read_text()) == spec):
        start = time.perf_counter()
        correct_adapter(update_folder(ctx, update), out, pick["method"], force=True, progress=False,
                        **pick_sources(ctx, update, pick["method"]), **pick["params"])  # fmt: skip
        write_json(spec_file, spec)
        ctx.log(f"[smol]   {row}: corrected in {time.perf_counter() - start:.1f} s")
    relative = out.relative_to(ctx.cache).as_posix()
    if is_checkpoint(out):  # a full fine-tune's correction, or a dense method's on an adapter
        return Variant(f"table-{row}", relative)
    return Variant(f"table-{row}", "aligned", relative)


def pick_sources(ctx: Context, update: str, method: str) -> dict[str, Any]:
    """What tune gave ``method`` (csulora.tuning.plan): the same files, so the same correction."""
    from csulora.io.input_kind import is_checkpoint
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.plan import check_paths, correction_sources, plan_methods
    from csulora.tuning.runner import SUBSPACE_FILE

    folder = update_folder(ctx, update)
    _, aligned, files = check_paths(
        folder, ctx.path("aligned"), subspace=None, base=ctx.path("base"), calibration=calibration_file(ctx),
        calibration_task=None, update_statistics=update_statistics_file(ctx, update),
    )  # fmt: skip
    plans, _ = plan_methods(TuneConfig(method="all"), files, dense=is_checkpoint(folder))  # as tune planned them
    plan = next(p for p in plans if p.config.method == method)
    subspace = tune_dir(ctx, update) / SUBSPACE_FILE
    return correction_sources(plan, files, aligned, subspace if subspace.exists() else None, files.calibration)


def check_same_as_tune(ctx: Context, update: str, variant: Variant) -> None:
    """The pick `correct` wrote is the correction tune wrote: the same weight files, byte for byte."""
    ours = ctx.path(variant.adapter or variant.model)
    theirs = tune_dir(ctx, update)
    for weights in sorted(p.name for p in ours.glob("*.safetensors")):
        if (ours / weights).read_bytes() != (theirs / weights).read_bytes():
            raise RuntimeError(f"{update}: tune's {weights} differs from correct's at the same setting")


def picks(ctx: Context) -> dict[str, dict]:
    path = ctx.world_path("table", "picks.json")
    return json.loads(path.read_text()) if path.exists() else {}
