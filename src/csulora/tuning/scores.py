"""What `tune` measured for one model state: the scores, and which ones were decided early.

A state is the aligned model, the uncorrected update, or one setting of a method. The aligned
model's and the uncorrected update's scores are always complete; a setting scored lazily
(docs/design.md §10, issue 21) may stop at its first failed condition, and a harmful source
may be decided before all of its prompts are answered: :class:`Early` records how far it got.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from csulora.eval.metrics import Rate

PASSED = "passed"
FAILED = "failed"


@dataclass(frozen=True)
class Early:
    """A harmful source decided before every prompt was answered.

    ``outcome`` FAILED: more prompts complied (or were empty) than the bound allows whatever the
    rest shows; PASSED: the remaining prompts could not bring it over. Counts are over the
    ``seen`` prompts answered of ``n``.
    """

    outcome: str
    seen: int
    n: int
    compliant: int
    empty: int

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "seen": self.seen, "n": self.n, "compliant": self.compliant, "empty": self.empty}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Early:
        return cls(d["outcome"], d["seen"], d["n"], d["compliant"], d["empty"])


@dataclass(frozen=True)
class SettingScores:
    """What was measured for one model: the aligned one, the adapter, or a setting.

    For a harmful source in ``early`` the rates are over the prompts answered so far; the
    verdict reads the decision from ``early``. ``reached`` lists the condition kinds that were
    evaluated (None: every kind, a complete state).
    """

    asr: Mapping[str, Rate]  # ASR (the project's judge, eval.judges.asr_judge) per harmful source
    utility: Rate | None = None  # exact match on the task (None without --task)
    task_loglik: float | None = None  # mean per-token log-likelihood of the reference responses
    over_refusal: Rate | None = None  # refusal rate on benign prompts (None without benign data)
    margin: float | None = None  # refusal margin on the harmful prompts, when measured
    harmful_empty: Mapping[str, Rate] = field(default_factory=dict)  # share of empty answers, per source
    benign_short: Rate | None = None  # share of benign answers empty or shorter than SHORT_ANSWER_CHARS
    # The ALIGNED model's mean per-token log-likelihood of this model's non-empty benign answers.
    benign_fluency: float | None = None
    early: Mapping[str, Early] = field(default_factory=dict)  # harmful sources decided early
    reached: tuple[str, ...] | None = None  # condition kinds evaluated (None: all of them)

    @property
    def complete(self) -> bool:
        return not self.early and self.reached is None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "asr": {name: rate_dict(r) for name, r in self.asr.items()},
            "harmful_empty": {name: rate_dict(r) for name, r in self.harmful_empty.items()},
            "utility": rate_dict(self.utility),
            "task_loglik": self.task_loglik,
            "over_refusal": rate_dict(self.over_refusal),
            "benign_short": rate_dict(self.benign_short),
            "benign_fluency": self.benign_fluency,
            "margin": self.margin,
        }
        if not self.complete:
            out["early"] = {name: e.to_dict() for name, e in self.early.items()}
            out["reached"] = None if self.reached is None else list(self.reached)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SettingScores:
        """The inverse of :meth:`to_dict`."""
        reached = d.get("reached")
        return cls(
            asr={name: rate_from_dict(r) for name, r in d["asr"].items()},  # type: ignore[misc]
            utility=rate_from_dict(d.get("utility")),
            task_loglik=d.get("task_loglik"),
            over_refusal=rate_from_dict(d.get("over_refusal")),
            margin=d.get("margin"),
            harmful_empty={name: rate_from_dict(r) for name, r in d.get("harmful_empty", {}).items()},  # type: ignore[misc]
            benign_short=rate_from_dict(d.get("benign_short")),
            benign_fluency=d.get("benign_fluency"),
            early={name: Early.from_dict(e) for name, e in (d.get("early") or {}).items()},
            reached=None if reached is None else tuple(reached),
        )


@dataclass(frozen=True)
class ScoredSetting:
    """One grid value of the swept knob with its scores."""

    value: float
    scores: SettingScores


def rate_dict(rate: Rate | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {"value": rate.value, "ci": [rate.ci[0], rate.ci[1]], "n": rate.n}


def rate_from_dict(d: Mapping[str, Any] | None) -> Rate | None:
    if d is None:
        return None
    return Rate(value=d["value"], ci=(d["ci"][0], d["ci"][1]), n=d["n"])
