"""Pick a correction's setting from measured scores: pure logic, no models (docs/design.md §10).

Which qualifying setting wins: within one method the **weakest** (the closest to the
uncorrected update, :func:`select_setting`); across methods (``--method all``,
:func:`select_across_methods`) the highest validation utility, ties to the lower validation ASR
(worst source), then to the weaker setting (earlier in its own grid), then to the method listed
first. Whether one setting qualifies is :mod:`csulora.tuning.verdicts`; when nothing qualifies
the summary says why and the hint follows from the cause (:mod:`csulora.tuning.hints`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from csulora.errors import OptionError
from csulora.tuning.config import TuneConfig
from csulora.tuning.hints import hint, why_none
from csulora.tuning.scores import ScoredSetting, SettingScores
from csulora.tuning.verdicts import TOLERANCE, Rule, UtilityReference, Verdict


@dataclass(frozen=True)
class MethodSweep:
    """One method's scored settings (weakest first) and the config that swept them."""

    config: TuneConfig  # a single-method config
    settings: tuple[ScoredSetting, ...]


@dataclass(frozen=True)
class Selection:
    """The chosen setting (None when nothing qualifies) and why.

    ``index`` points into ``verdicts`` (all methods' settings in sweep order with
    ``--method all``); ``method`` is the chosen setting's method.
    """

    chosen: float | None
    index: int | None
    verdicts: tuple[Verdict, ...]
    summary: str
    notes: tuple[str, ...] = field(default=())
    method: str | None = None
    hint: str | None = None  # what to try next, when nothing qualifies
    per_method: Mapping[str, Any] = field(default_factory=dict)  # --method all: each method's own pick

    @property
    def qualified(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "method": self.method,
            "index": self.index,
            "qualified": self.qualified,
            "summary": self.summary,
            "hint": self.hint,
            "notes": list(self.notes),
            "per_method": dict(self.per_method),
        }



# --------------------------------------------------------------------------- the two rules


def select_setting(
    settings: Sequence[ScoredSetting],
    aligned: SettingScores,
    config: TuneConfig,
    *,
    adapter: SettingScores | None = None,
    calibration_source: str | None = None,
) -> Selection:
    """Choose the weakest qualifying setting of one method; ``settings`` ordered weakest first.

    ``adapter`` holds the uncorrected adapter's scores, the reference for the utility
    drop; without it (or without a task score) utility is not judged, and the notes say
    so. ``calibration_source`` (:data:`CALIBRATION_GIVEN` / :data:`CALIBRATION_FROM_TASK`)
    shapes the hint when the safe settings cost too much utility.
    """
    if not settings:
        raise OptionError("select_setting: no settings to choose from")
    _check_references(settings, aligned)
    rule = Rule(aligned, adapter, config)
    verdicts = tuple(rule.judge(s) for s in settings)
    notes = _notes(rule.reference, adapter, aligned)
    for index, verdict in enumerate(verdicts):
        if verdict.qualifies:
            summary = f"{verdict.setting}: {_holds(verdict)}"
            if index > 0:
                summary += f" (the {index} weaker setting{'s' if index > 1 else ''} did not qualify)"
            return Selection(verdict.value, index, verdicts, summary, notes, method=config.method)
    advice = hint(verdicts, config, [config.method], calibration_source)
    return Selection(None, None, verdicts, why_none(verdicts, config, advice), notes, hint=advice)


def select_across_methods(
    sweeps: Sequence[MethodSweep],
    aligned: SettingScores,
    config: TuneConfig,
    *,
    adapter: SettingScores,
    calibration_source: str | None = None,
    skipped: Mapping[str, str] | None = None,
) -> Selection:
    """``--method all``: among every method's qualifying settings, the highest validation utility.

    Ties (within :data:`TOLERANCE`) go to the lower validation ASR on the worst source,
    then to the weaker setting (earlier in its own grid), then to the method listed
    first. ``skipped``: methods left out (name -> why), repeated in the notes.
    """
    sweeps = [s for s in sweeps if s.settings]
    if not sweeps:
        raise OptionError("select_across_methods: no settings to choose from")
    for sweep in sweeps:
        _check_references(sweep.settings, aligned)
    ref = UtilityReference.of(adapter)
    verdicts: list[Verdict] = []
    grid_position: list[int] = []
    per_method: dict[str, Any] = {}
    for sweep in sweeps:
        own = select_setting(
            sweep.settings, aligned, sweep.config, adapter=adapter, calibration_source=calibration_source
        )
        per_method[sweep.config.method] = {"chosen": own.chosen, "qualified": own.qualified, "summary": own.summary}
        verdicts += own.verdicts
        grid_position += list(range(len(own.verdicts)))
    notes = _notes(ref, adapter, aligned) + tuple(
        f"{name} not swept: {why}" for name, why in (skipped or {}).items()
    )
    best: int | None = None
    for i, verdict in enumerate(verdicts):
        if not verdict.qualifies:
            continue
        if best is None or _ranks_above(verdict, grid_position[i], verdicts[best], grid_position[best]):
            best = i
    if best is None:
        methods = [s.config.method for s in sweeps]
        advice = hint(verdicts, config, methods, calibration_source, skipped=skipped or {})
        return Selection(None, None, tuple(verdicts), why_none(verdicts, config, advice), notes, hint=advice,
                         per_method=per_method)  # fmt: skip
    chosen = verdicts[best]
    qualifying = sum(v.qualifies for v in verdicts)
    summary = (
        f"{chosen.label}: the highest validation utility of the {qualifying} qualifying setting"
        f"{'s' if qualifying > 1 else ''} of {len(sweeps)} methods; {_holds(chosen)}"
    )
    return Selection(chosen.value, best, tuple(verdicts), summary, notes, method=chosen.method, per_method=per_method)


def _ranks_above(a: Verdict, a_position: int, b: Verdict, b_position: int) -> bool:
    """Whether ``a`` beats ``b`` under the --method all rule (earlier wins full ties)."""
    drop_a, drop_b = a.utility_drop or 0.0, b.utility_drop or 0.0
    if abs(drop_a - drop_b) > TOLERANCE:
        return drop_a < drop_b  # the same reference adapter: a smaller drop is a higher utility
    if abs(a.worst_asr - b.worst_asr) > TOLERANCE:
        return a.worst_asr < b.worst_asr
    return a_position < b_position


def _holds(verdict: Verdict) -> str:
    text = f"all {len(verdict.conditions)} conditions hold"
    drop = verdict.utility_drop
    if drop is not None:
        text += f"; utility {'drops' if drop >= 0 else 'gains'} {abs(drop):.1%} of the adapter's"
    return text


def _notes(ref: UtilityReference, adapter: SettingScores | None, aligned: SettingScores) -> tuple[str, ...]:
    notes = []
    if adapter is None or adapter.utility is None:
        notes.append("utility not judged: no task data (give --task to bound the utility drop)")
    elif ref.basis == "loglik":
        notes.append(
            "the uncorrected adapter scores 0 exact match, so the utility drop is judged on the "
            "mean response log-likelihood"
        )
    elif ref.basis is None:
        notes.append("utility not judged: the uncorrected adapter scores 0 exact match and no log-likelihood")
    not_judged = [
        what
        for what, measured in (
            ("empty harmful answers", bool(aligned.harmful_empty)),
            ("over-refusal", aligned.over_refusal is not None),
            ("short benign answers", aligned.benign_short is not None),
            ("fluency", aligned.benign_fluency is not None),
        )
        if not measured
    ]
    if not_judged:
        notes.append(f"not judged (not measured for the aligned model): {', '.join(not_judged)}")
    return tuple(notes)


def _check_references(settings: Sequence[ScoredSetting], aligned: SettingScores) -> None:
    """Every setting was scored on the aligned model's harmful sources (a setting stopped at its
    first failed condition, issue 21, on the ones it reached)."""
    if not aligned.asr:
        raise OptionError("select_setting: the aligned model has no harmful-source ASR to compare with")
    expected = set(aligned.asr)
    for setting in settings:
        scored = set(setting.scores.asr)
        if scored != expected and (setting.scores.complete or not scored <= expected):
            raise OptionError(
                f"select_setting: setting {setting.value:g} was scored on harmful sources "
                f"{sorted(scored)}, the aligned model on {sorted(expected)}"
            )
