"""Why nothing qualified, and what to try next: the hint follows from the cause (issue 12).

Looked at in order: no setting safe on ASR -> a stronger grid or another method; the safe ones
broken (empty/short answers, fluency) -> say so, it is not a repair; the safe, sound ones
over-refuse; else they cost too much utility -> calibration advice, which depends on where the
statistics came from (a file given, or ``--calibration-task``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from csulora.methods.base import CALIBRATION
from csulora.methods.registry import get_method, tunable_methods
from csulora.tuning.config import TuneConfig
from csulora.tuning.verdicts import ASR, BROKEN, EMPTY, FLUENCY, OVER_REFUSAL, SHORT, UTILITY, Verdict

# Where the calibration statistics came from (the hint when the safe settings lose utility).
CALIBRATION_GIVEN = "file"  # --calibration FILE
CALIBRATION_FROM_TASK = "task"  # --calibration-task FILE: computed by tune


def why_none(verdicts: Sequence[Verdict], config: TuneConfig, advice: str) -> str:
    """Counts of the settings each kind of condition failed, then the hint."""
    n = len(verdicts)

    def count(*kinds: str) -> int:
        return sum(not v.passes(*kinds) for v in verdicts)

    parts = []
    if count(ASR):
        sources = sorted({s for v in verdicts for s in v.failed_sources})
        parts.append(
            f"{count(ASR)} of {n} settings keep an ASR more than {config.max_asr_gap:g} (or one prompt) "
            f"above the aligned model's (on {', '.join(sources)})"
        )
    if count(EMPTY, SHORT):
        parts.append(f"{count(EMPTY, SHORT)} of {n} give empty or short answers more often than the aligned model")
    if count(FLUENCY):
        parts.append(
            f"{count(FLUENCY)} of {n} answer benign prompts in words the aligned model finds more than "
            f"{config.max_fluency_loss:g} nats/token less likely than its own"
        )
    if count(OVER_REFUSAL):
        parts.append(f"{count(OVER_REFUSAL)} of {n} refuse benign prompts more often than the aligned model")
    if count(UTILITY):
        parts.append(f"{count(UTILITY)} of {n} lose more than {config.max_utility_drop:.0%} of the adapter's utility")
    if count_not_reached := sum(bool(v.not_reached) for v in verdicts):
        parts.append(f"{count_not_reached} of {n} stopped at their first failed condition (the rest not scored)")
    return "no setting qualifies: " + "; ".join(parts) + f"; {advice}"


def hint(
    verdicts: Sequence[Verdict],
    config: TuneConfig,
    methods: Sequence[str],
    calibration_source: str | None,
    *,
    skipped: Mapping[str, str] | None = None,
) -> str:
    """What to try next, from why the settings failed (issue 12).

    Looked at in order: no setting safe on ASR -> a stronger grid or another method;
    the safe ones broken (empty/short answers, fluency) -> say so, it is not a repair;
    the safe, sound ones over-refuse; else they cost too much utility -> calibration advice.
    """
    safe = [v for v in verdicts if v.passes(ASR)]
    if not safe:
        strongest = verdicts[-1] if len(methods) == 1 else None
        where = sorted({s for v in verdicts for s in v.failed_sources})
        if strongest is not None:
            return (
                f"the strongest, {strongest.setting}, is still unsafe (on {', '.join(where)}): "
                "try a stronger grid (--grid) or another --method"
            )
        return (
            f"even the strongest setting of every method is still unsafe (on {', '.join(where)}): "
            "sweep one method with a stronger --grid"
        )
    sound = [v for v in safe if v.passes(*BROKEN)]
    if not sound:
        return _broken_hint(safe)
    polite = [v for v in sound if v.passes(OVER_REFUSAL)]
    if not polite:
        worst = min(sound, key=lambda v: _excess(v, OVER_REFUSAL))
        return (
            f"the safe settings refuse benign prompts the aligned model answers (at best {worst.label} "
            f"exceeds its over-refusal by {_excess(worst, OVER_REFUSAL):.2f}): try weaker settings or another --method"
        )
    least = min(_excess(v, UTILITY) for v in polite)
    return f"the safe settings lose {least:.0%} of the task: " + _utility_advice(methods, calibration_source, skipped or {})


def _broken_hint(safe: Sequence[Verdict]) -> str:
    silent = any(not v.passes(EMPTY, SHORT) for v in safe)
    strange = any(not v.passes(FLUENCY) for v in safe)
    how = []
    if silent:
        how.append("stops answering (empty or short answers)")
    if strange:
        how.append("answers differently from the aligned model (its benign answers are unlikely under it)")
    names = ", ".join(v.label for v in safe)
    return (
        f"the settings that pass the ASR check ({names}) are not safe but broken: the model "
        + " and ".join(how)
        + "; try settings between the last unsafe and the first broken one, or another --method"
    )


def _utility_advice(methods: Sequence[str], calibration_source: str | None, skipped: Mapping[str, str]) -> str:
    calibrated_here = [m for m in methods if _needs_calibration(m)]
    if calibrated_here:
        if calibration_source == CALIBRATION_FROM_TASK:
            return (
                "the task statistics may not match the adapter's task (calibrate on its training data or data "
                "like it), or the task uses what the harmful inputs use: try another --method"
            )
        return "give --calibration-task with your training data (the statistics given may not match the task)"
    calibrated = [m for m in tunable_methods() if m not in methods and _needs_calibration(m)]
    if calibrated:
        skipped_here = [m for m in calibrated if m in skipped]
        if skipped_here:
            return f"give --calibration-task with your training data so {skipped_here[0]} can run"
        return f"try --method {calibrated[0]} (with --calibration-task and your training data)"
    return "try another --method, or loosen --max-utility-drop"


def _needs_calibration(method: str) -> bool:
    """Whether the method needs activation statistics with its default options."""
    return CALIBRATION in get_method(method).inputs


def _excess(verdict: Verdict, kind: str) -> float:
    values = [c.excess for c in verdict.conditions if c.kind == kind and c.excess is not None]
    return max(values) if values else math.inf


