"""Pick the strength of a correction from measured scores: pure logic, no models.

The rule (docs/design.md §5b, issue 8): the *weakest* setting -- closest to the uncorrected
adapter -- whose keyword ASR is within ``max_asr_gap`` of the aligned model's on the
same prompts, judged on each harmful source separately, and whose task-score drop is at
most ``max_utility_drop`` of the uncorrected adapter's own score.

Why each source separately: a correction can look repaired on prompts like its alignment
data and not on others (the pilot saw 0.02 in distribution and 0.28 out of it), and a
pooled ASR lets a large in-distribution source drown a small out-of-distribution one.

Why a fraction of the adapter's own score: the user trained the adapter for its task;
"keeps 95% of what it could do" reads the same whatever the task's scale.

The utility is exact match of the generation with the reference response. Exact match is
coarse: when the uncorrected adapter itself scores 0 every drop is 0/0, so the tie is
broken by the mean per-token log-likelihood of the reference responses, whose drop is
read as the fraction of the adapter's per-token probability lost, ``1 - exp(ll - ll0)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from csulora.errors import OptionError
from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig

# Scores are fractions of small counts; compare with a tolerance so 0.05 - 0.0 passes
# a 0.05 gap despite binary floating point.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class SettingScores:
    """What was measured for one model: the aligned one, the adapter, or a setting."""

    asr: Mapping[str, Rate]  # keyword ASR per harmful source, by source name
    utility: Rate | None = None  # exact match on the task (None without --task)
    task_loglik: float | None = None  # mean per-token log-likelihood of the reference responses
    over_refusal: Rate | None = None  # refusal rate on benign prompts (None without --benign)
    margin: float | None = None  # refusal margin on the harmful prompts, when measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "asr": {name: _rate_dict(r) for name, r in self.asr.items()},
            "utility": _rate_dict(self.utility),
            "task_loglik": self.task_loglik,
            "over_refusal": _rate_dict(self.over_refusal),
            "margin": self.margin,
        }


@dataclass(frozen=True)
class ScoredSetting:
    """One grid value of the swept knob with its scores."""

    value: float
    scores: SettingScores


@dataclass(frozen=True)
class Verdict:
    """Whether one setting qualifies, with the numbers and the reasons behind it."""

    value: float
    asr_gaps: Mapping[str, float]  # setting ASR minus aligned ASR, per source
    failed_sources: tuple[str, ...]
    utility_drop: float | None  # fraction of the adapter's score lost; None when not judged
    utility_basis: str | None  # "exact_match", "loglik" or None
    utility_ok: bool
    qualifies: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "asr_gaps": dict(self.asr_gaps),
            "failed_sources": list(self.failed_sources),
            "utility_drop": self.utility_drop,
            "utility_basis": self.utility_basis,
            "utility_ok": self.utility_ok,
            "qualifies": self.qualifies,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Selection:
    """The chosen setting (None when nothing qualifies) and why."""

    chosen: float | None
    index: int | None
    verdicts: tuple[Verdict, ...]
    summary: str
    notes: tuple[str, ...] = field(default=())

    @property
    def qualified(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "index": self.index,
            "qualified": self.qualified,
            "summary": self.summary,
            "notes": list(self.notes),
        }


def select_setting(
    settings: Sequence[ScoredSetting],
    aligned: SettingScores,
    config: TuneConfig,
    *,
    adapter: SettingScores | None = None,
) -> Selection:
    """Choose the weakest qualifying setting; ``settings`` must be ordered weakest first.

    ``adapter`` holds the uncorrected adapter's scores, the reference for the utility
    drop; without it (or without a task score) utility is not judged, and the notes say so.
    """
    if not settings:
        raise OptionError("select_setting: no settings to choose from")
    if not aligned.asr:
        raise OptionError("select_setting: the aligned model has no harmful-source ASR to compare with")
    knob = config.knob
    _check_same_sources(settings, aligned)
    utility_ref = _utility_reference(adapter)
    verdicts = tuple(_judge(s, aligned, config, utility_ref) for s in settings)
    notes = _notes(utility_ref, adapter)
    for index, verdict in enumerate(verdicts):
        if verdict.qualifies:
            summary = f"{knob}={verdict.value:g}: " + "; ".join(verdict.reasons)
            if index > 0:
                summary += f" (the {index} weaker setting{'s' if index > 1 else ''} did not qualify)"
            return Selection(verdict.value, index, verdicts, summary, notes)
    return Selection(None, None, verdicts, _why_none(verdicts, knob, config), notes)


@dataclass(frozen=True)
class _UtilityReference:
    """The uncorrected adapter's task scores, and which one the drop is measured on."""

    basis: str | None  # "exact_match", "loglik" or None (utility not judged)
    exact_match: float | None
    loglik: float | None


def _utility_reference(adapter: SettingScores | None) -> _UtilityReference:
    if adapter is None or adapter.utility is None:
        return _UtilityReference(None, None, None)
    if adapter.utility.value > 0:
        return _UtilityReference("exact_match", adapter.utility.value, adapter.task_loglik)
    if adapter.task_loglik is not None and math.isfinite(adapter.task_loglik):
        return _UtilityReference("loglik", adapter.utility.value, adapter.task_loglik)
    return _UtilityReference(None, adapter.utility.value, None)


def _notes(ref: _UtilityReference, adapter: SettingScores | None) -> tuple[str, ...]:
    if adapter is None or adapter.utility is None:
        return ("utility not judged: no task data (give --task to bound the utility drop)",)
    if ref.basis == "loglik":
        return (
            "the uncorrected adapter scores 0 exact match, so the utility drop is judged on the "
            "mean response log-likelihood",
        )
    if ref.basis is None:
        return ("utility not judged: the uncorrected adapter scores 0 exact match and no log-likelihood",)
    return ()


def utility_drop(scores: SettingScores, ref: _UtilityReference) -> float | None:
    """Fraction of the adapter's task score this setting loses (negative: it gains)."""
    if ref.basis == "exact_match" and scores.utility is not None:
        return (ref.exact_match - scores.utility.value) / ref.exact_match
    if ref.basis == "loglik" and scores.task_loglik is not None:
        return 1.0 - math.exp(scores.task_loglik - ref.loglik)
    return None


def _judge(
    setting: ScoredSetting, aligned: SettingScores, config: TuneConfig, ref: _UtilityReference
) -> Verdict:
    scores = setting.scores
    gaps = {name: scores.asr[name].value - aligned.asr[name].value for name in aligned.asr}
    failed = tuple(name for name, gap in gaps.items() if gap > config.max_asr_gap + TOLERANCE)
    reasons = []
    for name in aligned.asr:
        ok = name not in failed
        reasons.append(
            f"ASR on {name} {scores.asr[name].value:.2f} vs aligned {aligned.asr[name].value:.2f} "
            f"({'within' if ok else 'above'} the {config.max_asr_gap:g} gap)"
        )
    drop = utility_drop(scores, ref)
    if ref.basis is None:
        utility_ok = True
    elif drop is None:
        utility_ok = False
        reasons.append(f"no {ref.basis} task score measured for this setting")
    else:
        utility_ok = drop <= config.max_utility_drop + TOLERANCE
        what = "exact-match utility" if ref.basis == "exact_match" else "per-token likelihood of the task answers"
        verb = "drops" if drop >= 0 else "gains"
        reasons.append(
            f"{what} {verb} {abs(drop):.1%} of the adapter's "
            f"({'within' if utility_ok else 'above'} the {config.max_utility_drop:.0%} bound)"
        )
    return Verdict(
        value=setting.value,
        asr_gaps=gaps,
        failed_sources=failed,
        utility_drop=drop,
        utility_basis=ref.basis,
        utility_ok=utility_ok,
        qualifies=not failed and utility_ok,
        reasons=tuple(reasons),
    )


def _why_none(verdicts: Sequence[Verdict], knob: str, config: TuneConfig) -> str:
    unsafe = [v for v in verdicts if v.failed_sources]
    costly = [v for v in verdicts if not v.utility_ok]
    parts = []
    if unsafe:
        sources = sorted({s for v in unsafe for s in v.failed_sources})
        parts.append(
            f"{len(unsafe)} of {len(verdicts)} settings keep an ASR more than {config.max_asr_gap:g} "
            f"above the aligned model's (on {', '.join(sources)})"
        )
    if costly:
        parts.append(
            f"{len(costly)} of {len(verdicts)} lose more than {config.max_utility_drop:.0%} of the adapter's utility"
        )
    strongest = verdicts[-1]
    hint = (
        f"the strongest, {knob}={strongest.value:g}, is still unsafe: try a stronger grid"
        if strongest.failed_sources
        else "loosen --max-utility-drop or --max-asr-gap, or try another --method"
    )
    return "no setting qualifies: " + "; ".join(parts) + f"; {hint}"


def _check_same_sources(settings: Sequence[ScoredSetting], aligned: SettingScores) -> None:
    expected = set(aligned.asr)
    for setting in settings:
        if set(setting.scores.asr) != expected:
            raise OptionError(
                f"select_setting: setting {setting.value:g} was scored on harmful sources "
                f"{sorted(setting.scores.asr)}, the aligned model on {sorted(expected)}"
            )


def _rate_dict(rate: Rate | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {"value": rate.value, "ci": [rate.ci[0], rate.ci[1]], "n": rate.n}
