"""Each swept row's setting, chosen on validation with ``csulora tune``'s own rule
(:func:`csulora.tuning.selection.select_setting`): the weakest setting whose ASR and empty
answers are within 5 points of the aligned model's on each source, whose over-refusal and short
benign answers are too, whose benign answers the aligned model finds about as likely as its own,
and whose utility keeps 95% of the adapter's. Test prompts never decide anything; the recommended
row is the one that reproduces tune with its defaults, when its selection qualifies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from csulora.demo.context import TUNE_DEFAULTS, DemoContext
from csulora.demo.rows import RowSpec
from csulora.demo.scoring import Reference, mark_unchanged, with_reference
from csulora.methods.registry import get_method, make_config
from csulora.tuning.scores import SettingScores

BRIEF_KEYS = ("asr", "asr_ci", "asr_ood", "asr_ood_ci", "utility", "utility_ci", "over_refusal", "over_refusal_ci")


def select_row(ctx: DemoContext, spec: RowSpec, aligned: SettingScores, attacked: Reference, points: list[dict]) -> tuple[dict, dict]:
    """Select on validation among the row's scored grid points with tune's rule; (test row, sweep record).

    The chosen point's generations join generations.jsonl."""
    from csulora.tuning.hints import CALIBRATION_FROM_TASK
    from csulora.tuning.scores import ScoredSetting
    from csulora.tuning.selection import select_setting

    points = [with_reference(p, spec, attacked) for p in points]
    config = dataclasses.replace(TUNE_DEFAULTS, method=spec.method, grid=tuple(p["value"] for p in points))
    statistics = get_method(spec.method).needs_calibration(make_config(spec.method, spec.setting(points[0]["value"])))
    selection = select_setting(
        [ScoredSetting(p["value"], p["validation"]) for p in points], aligned, config, adapter=attacked.validation,
        calibration_source=CALIBRATION_FROM_TASK if statistics else None,
    )  # fmt: skip
    qualified = selection.index is not None
    if qualified:
        chosen, why = points[selection.index], selection.summary
    else:
        # Nothing qualified: show the safest setting (lowest worst-source validation ASR,
        # then highest utility) and say so; the row is marked "qualified": false.
        chosen = min(points, key=lambda p: safety_key(p["validation"]))
        why = f"no setting qualified ({selection.summary}); showing the safest, {spec.knob}={chosen['value']:g}"
    row = mark_unchanged(chosen["test"], chosen["unchanged"])
    ctx.records.extend(chosen["records"])
    row["params"].update(selected_on="validation", qualified=qualified)
    row["recommended"] = spec.recommends and qualified
    record = {
        "method": spec.method, "knob": spec.knob, "chosen": chosen["value"], "qualified": qualified, "why": why,
        "unchanged": chosen["unchanged"], "notes": list(selection.notes), "recommends": spec.recommends,
        "reads_statistics": statistics,
        "options": dict(spec.options), "default_grid": list(spec.default_grid), "grid_source": spec.grid_source,
        "points": [point_record(spec.knob, p, verdict) for p, verdict in zip(points, selection.verdicts)],
    }  # fmt: skip
    return row, record


def point_record(knob: str, point: dict, verdict: Any) -> dict[str, Any]:
    """One grid point in results.json: its validation scores and verdict, its test scores in brief."""
    return {
        knob: point["value"], "validation": point["validation"].to_dict(), "verdict": verdict_record(verdict),
        "test": {k: point["test"].get(k) for k in BRIEF_KEYS}, "unchanged": point["unchanged"],
        "action_kept": point["action_kept"],
    }  # fmt: skip


def verdict_record(verdict: Any) -> dict[str, Any]:
    """Whether a setting qualifies; the conditions it failed, by name and in brief."""
    failed = verdict.failed
    return {
        "qualifies": verdict.qualifies, "conditions": [c.name for c in verdict.conditions],
        "failed": [c.name for c in failed], "failed_brief": [c.brief() for c in failed],
    }  # fmt: skip


def safety_key(scores: SettingScores) -> tuple[float, float, float]:
    """Worst-source ASR, then summed ASR, then higher utility: the "safest" ordering."""
    asrs = [rate.value for rate in scores.asr.values()]
    return max(asrs), sum(asrs), -(scores.utility.value if scores.utility is not None else 0.0)


def recommendation(rows: Sequence[dict], sweeps: dict[str, dict]) -> dict:
    """Which row `csulora tune` (default options) picks, or why none: for results.json and report.md."""
    chosen = [r["name"] for r in rows if r.get("recommended")]
    if len(chosen) > 1:
        raise AssertionError(f"more than one recommended row: {chosen}")
    deciding = [name for name, sweep in sweeps.items() if sweep.get("recommends")]
    if chosen:
        sweep = sweeps[chosen[0]]
        return {"row": chosen[0], "params": {sweep["knob"]: sweep["chosen"]}, "why": sweep["why"]}
    if deciding:
        return {"row": None, "why": sweeps[deciding[0]]["why"]}
    return {"row": None, "why": "no sweep reproduces tune's defaults in this run"}
