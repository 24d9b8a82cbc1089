"""The product's path (issue 12): `csulora calibrate` once, then `csulora tune` with its defaults.

Two stages, each the same API call a user makes (docs/design.md §5c):

- ``calibration``: ``csulora calibrate ALIGNED --task data/task_train.jsonl`` (the adapters'
  training task; the default harmful prompts: AdvBench ``align`` + the shipped requests),
  on CPU float32. The full fine-tune rows (benchmarks/smol/full.py) read the same file.
- ``tune``: ``csulora tune ADAPTER --aligned ALIGNED --calibration FILE --task date:validation``
  with every other option at its default (method ``calibrated``, grid λ = 0 … 300, harmful
  sources AdvBench validation + airt-val, benign validation half, every qualifying
  condition), once for the attacked adapter (row ``calibrated``) and once for the benign
  adapter (row ``benign+recommended``). Each tune.json is kept in the cache and written
  as a sweep (``sweeps/<row>.json``) so the Pareto plot draws the calibrated curve from
  the very numbers tune chose on.

The rows' test answers come from the corrected adapter at tune's pick, written again by
``correct_adapter`` (cached like every other correction) and checked to be byte for byte
the adapter tune wrote.
"""

from __future__ import annotations

import json
import time

from benchmarks.smol.corrections import CALIBRATION_FILE, corrected_variant
from benchmarks.smol.pipeline import RUNS_ON, Context, stage, write_json

# row -> the adapter tune corrects
TUNED_ROWS = {"calibrated": "attacked", "benign+recommended": "benign"}
TUNE_TASK = "date:validation"  # the task's validation split (100 items): never test data
# tune --score-cache: every scored state of both rows' runs (the aligned model is scored once
# for both; a killed stage resumes at its next unscored setting)
SCORE_CACHE = ("tune", "score-cache")


@stage("calibration", "csulora calibrate: the aligned model's input statistics on harmful prompts and the task",
       needs=("base_answers", "aligned"), for_rows=("calibrated", "benign+recommended", "full-attacked+calibrated"))
def stage_calibration(ctx: Context) -> dict:
    from csulora.references.calibration import calibrate

    start = time.perf_counter()
    result = calibrate(
        ctx.path("aligned"), ctx.path(*CALIBRATION_FILE), task=str(ctx.path("data", "task_train.jsonl")),
        force=True, progress=False, **RUNS_ON,
    )  # fmt: skip
    # "seconds" is the stage runner's own key (the stage's wall time)
    return {
        "calibrate_total_s": round(time.perf_counter() - start, 1),
        "calibrate_seconds": result.seconds,
        "harmful_tokens": result.harmful_tokens,
        "task_tokens": result.task_tokens,
        "groups": len(result.groups),
        "modules": len(result.modules),
        "passes": result.passes,
    }


def tune_dir(ctx: Context, row: str):
    return ctx.path("tune", row)


@stage("tune", "csulora tune with its defaults (the calibrated method) on the attacked and the benign adapter",
       needs=("calibration", "attacked", "benign_adapter"), for_rows=tuple(TUNED_ROWS))
def stage_tune(ctx: Context) -> dict:
    return {row: tune_row(ctx, row) for row in TUNED_ROWS if ctx.wants(row)}


def tune_row(ctx: Context, row: str) -> dict:
    """One row's tune run; a row whose sweep is already written is reused (a killed stage
    resumes per row, and the two rows can run in two processes)."""
    from csulora.tuning.runner import tune_adapter

    adapter = TUNED_ROWS[row]
    done = ctx.path("tune", f"{row}.done.json")
    if done.exists() and ctx.path("sweeps", f"{row}.json").exists():
        ctx.log(f"[smol] tune {adapter}: reused ({done})")
        return json.loads(done.read_text())
    earlier = json.loads(done.read_text()) if done.exists() else {}
    start = time.perf_counter()
    result = tune_adapter(
        ctx.path("adapters", adapter), tune_dir(ctx, row), aligned=ctx.path("aligned"),
        calibration=ctx.path(*CALIBRATION_FILE), task=TUNE_TASK, force=True, progress=False,
        score_cache=ctx.path(*SCORE_CACHE), **RUNS_ON,
    )  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    write_json(ctx.path("sweeps", f"{row}.json"), sweep_from_tune(result.record, adapter, seconds))
    info = {"qualified": result.qualified, "chosen": result.chosen_params, "seconds": seconds,
            "summary": result.selection.summary}
    if earlier:  # a rerun (the rule changed) reads its scores from the cache: keep the scoring run's time
        info["first_seconds"] = earlier.get("first_seconds", earlier["seconds"])
    write_json(done, info)
    ctx.log(f"[smol] tune {adapter}: {result.selection.summary} ({seconds:.0f} s)")
    return info


def sweep_from_tune(record: dict, adapter: str, seconds: float) -> dict:
    """tune.json as one of the pipeline's sweep records (the plot and smol.json read those)."""
    settings = record["settings"]
    choice = record["choice"]
    chosen = choice["chosen"]
    if chosen is None:
        chosen = fallback_from_tune(record)
    knob = record["config"]["knob"]
    return {
        "row": None, "method": record["config"]["method"], "knob": knob, "fixed": {}, "adapter": adapter,
        "grid": record["config"]["grid"], "full_curve": record["config"].get("full_sweep", True),
        "points": [{"value": s["value"], "scores": s["scores"], "verdict": s["verdict"]} for s in settings],
        "qualified": choice["qualified"], "chosen": chosen,
        "why": choice["summary"] if choice["qualified"] else "no setting qualified; " + choice["summary"],
        "notes": choice.get("notes", []), "source": "csulora tune (tune.json)", "seconds": seconds,
        "aligned": record["aligned"], "uncorrected": record["adapter"],
    }


def fallback_from_tune(record: dict) -> float:
    """When no setting qualifies the row still shows one: the same safety-first rule as the
    other rows (benchmarks/smol/sweeps.fallback_choice), on tune's validation scores."""
    aligned = record["aligned"]["asr"]

    def worst_gap(s: dict) -> float:
        return max(s["scores"]["asr"][n]["value"] - aligned[n]["value"] for n in aligned)

    def util(s: dict) -> float:
        return (s["scores"].get("utility") or {}).get("value") or 0.0

    gap = record["config"]["max_asr_gap"]
    safe = [s for s in record["settings"] if worst_gap(s) <= gap + 1e-9]
    if safe:
        return max(safe, key=util)["value"]
    return min(record["settings"], key=lambda s: (round(worst_gap(s), 9), -util(s)))["value"]


def tuned_row(ctx: Context, row: str) -> dict:
    """The select-stage entry of a tuned row: tune's pick, re-made by correct_adapter and
    checked against the adapter tune wrote (the same bytes, or the pipeline is wrong)."""
    adapter = TUNED_ROWS[row]
    sweep = json.loads(ctx.path("sweeps", f"{row}.json").read_text())
    options = {sweep["knob"]: sweep["chosen"]}
    variant = corrected_variant(ctx, adapter, sweep["method"], options)
    if sweep["qualified"]:
        weights = "adapter_model.safetensors"
        ours = ctx.path(variant.adapter, weights).read_bytes()
        if ours != tune_dir(ctx, row).joinpath(weights).read_bytes():
            raise RuntimeError(f"{row}: tune's adapter differs from correct_adapter's at {options}")
    return {
        "variant": variant.key,
        "params": {"method": sweep["method"], **options},
        "qualified_on_validation": sweep["qualified"],
        "why": sweep["why"],
        "recommended": bool(sweep["qualified"]) and row == "calibrated",
    }
