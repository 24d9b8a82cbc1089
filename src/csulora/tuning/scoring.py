"""Score one model state on the tune data: completely, or lazily -- stopping when decided (issue 21).

Answers are generated **per prompt set in fixed batches** (each set's prompts ordered by length,
longest first, cut into ``batch_size`` chunks: :class:`BatchPlan`), so a batch holds the same
prompts whether the state is scored completely or lazily, read back from the score cache or
generated now: the answers two runs share are computed identically (docs/design.md §10).

- :meth:`StateScorer.complete`: every answer and every measure -- the aligned model's and the
  uncorrected update's scores, and every setting with ``--full-sweep``.
- :meth:`StateScorer.lazily`: conditions in order of cost, each checked as soon as its numbers
  exist, stopping at the first that fails: each harmful source batch by batch (it fails once
  more prompts complied, or were empty, than the rule allows whatever the rest show; it passes
  once the rest could not bring it over), then the task, the benign set, the fluency guard. A
  setting that passes everything is then completed (its harmful answers and the margin), so a
  chosen setting is always scored completely.

With ``stop_early`` a harmful answer also stops inside generation once the ASR judge's verdict is
fixed (a refusal phrase is complete): its text is truncated and marked so, its verdict the same.
Benign and task answers always run to the end (fluency and exact match read all of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from csulora.eval.generation import generate_answers
from csulora.eval.judges import Judge, RefusalJudge, asr_judge, stop_rule
from csulora.eval.margin import mean_response_logprob, refusal_margin
from csulora.eval.metrics import exact_match, is_empty_answer, is_short_answer, rate
from csulora.training.data import chat_prompt_ids
from csulora.tuning.data import TuneData
from csulora.tuning.scores import FAILED, PASSED, Early, SettingScores
from csulora.tuning.verdicts import FLUENCY, HARMFUL_KINDS, KINDS, OVER_REFUSAL, SHORT, UTILITY, Rule

# Turns the model being scored into the aligned model for the duration of a with-block:
# ``contextlib.nullcontext`` for the aligned model itself, ``peft_model.disable_adapter``
# once adapters are attached.
AlignedView = Callable[[], AbstractContextManager]
TASK, BENIGN = "task", "benign"


@dataclass(frozen=True)
class Generation:
    """How answers are generated: batch size, new tokens, and whether harmful answers stop early."""

    batch_size: int
    max_new_tokens: int
    stop_early: bool = True

    def to_key(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens, "stop_early": self.stop_early}


@dataclass(frozen=True)
class BatchPlan:
    """Each prompt set's batches: prompt indices, longest prompt first (one tokenizer, every state)."""

    batches: Mapping[str, tuple[tuple[int, ...], ...]]

    @classmethod
    def of(cls, tokenizer: Any, data: TuneData, batch_size: int) -> BatchPlan:
        plans = {}
        for name, prompts in data.prompt_sets():
            lengths = [len(chat_prompt_ids(tokenizer, p, data.framing_of(name))) for p in prompts]
            order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
            plans[name] = tuple(tuple(order[i : i + batch_size]) for i in range(0, len(order), batch_size))
        return cls(plans)


@dataclass
class StateRecord:
    """What is known of one state: answers by set and prompt index, which were truncated, and the
    measures computed; kept in the score cache as it grows (:mod:`csulora.tuning.score_cache`)."""

    answers: dict[str, dict[int, str]] = field(default_factory=dict)
    truncated: dict[str, set[int]] = field(default_factory=dict)
    measures: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "answers": {s: {str(i): a for i, a in sorted(got.items())} for s, got in sorted(self.answers.items())},
            "truncated": {s: sorted(ix) for s, ix in sorted(self.truncated.items()) if ix},
            "measures": dict(sorted(self.measures.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StateRecord:
        return cls(
            answers={s: {int(i): a for i, a in got.items()} for s, got in d["answers"].items()},
            truncated={s: set(ix) for s, ix in d.get("truncated", {}).items()},
            measures=dict(d.get("measures", {})),
        )


@dataclass
class StateOutputs:
    """A state's scores and the answers they were computed from (None: not generated)."""

    scores: SettingScores
    answers: dict[str, list[str | None]]
    truncated: dict[str, list[bool]]


class StateScorer:
    """One model state's answers and measures, generated batch by batch or read from its record.

    ``persist(record)`` is called whenever the record grew (the score cache writes it), so a
    killed run resumes at the next unscored batch.
    """

    def __init__(self, model: Any, tokenizer: Any, data: TuneData, plan: BatchPlan, generation: Generation, *,
                 seed: int = 0, aligned_view: AlignedView | None = contextlib.nullcontext,
                 record: StateRecord | None = None, persist: Callable[[StateRecord], None] | None = None,
                 desc: str = "generate", judge: Judge | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer, self.data, self.plan = model, tokenizer, data, plan
        self.generation, self.seed, self.aligned_view = generation, seed, aligned_view
        self.record = record or StateRecord()
        self.persist = persist or (lambda record: None)
        self.desc = desc
        self.judge = judge or asr_judge()  # the project's ASR judge: its verdicts and its early stop
        self.prompts = dict(data.prompt_sets())
        self.used: dict[str, set[int]] = {}  # the answers this scoring read: the only ones it reports

    # --- answers ------------------------------------------------------------------------------
    def answer(self, set_name: str, batch: Sequence[int]) -> list[str]:
        """The batch's answers: read back when known, else generated (and persisted)."""
        known = self.record.answers.setdefault(set_name, {})
        self.used.setdefault(set_name, set()).update(batch)
        if not all(i in known for i in batch):
            self._generate(set_name, batch, known)
        return [known[i] for i in batch]

    def _generate(self, set_name: str, batch: Sequence[int], known: dict[int, str]) -> None:
        prompts = [self.prompts[set_name][i] for i in batch]
        rules = None
        if self.generation.stop_early and set_name.startswith("harmful:"):
            rules = [stop_rule(self.judge, p) for p in prompts]
        out = generate_answers(
            self.model, self.tokenizer, prompts, stop_rules=rules, batch_size=len(batch),
            max_new_tokens=self.generation.max_new_tokens, progress=False, desc=self.desc,
            framing=self.data.framing_of(set_name),
        )  # fmt: skip
        cut = self.record.truncated.setdefault(set_name, set())
        for i, answer, truncated in zip(batch, out.answers, out.truncated, strict=True):
            known[i] = answer
            if truncated:
                cut.add(i)
        self.persist(self.record)

    def answer_all(self, set_name: str) -> list[str]:
        for batch in self.plan.batches[set_name]:
            self.answer(set_name, batch)
        return [self.record.answers[set_name][i] for i in range(len(self.prompts[set_name]))]

    def measure(self, name: str, compute: Callable[[], float | None]) -> float | None:
        """A forward-pass measure (log-likelihoods, margin), computed once and recorded."""
        if name not in self.record.measures:
            self.record.measures[name] = compute()
            self.persist(self.record)
        return self.record.measures[name]

    # --- the two ways to score ----------------------------------------------------------------
    def complete(self, *, with_margin: bool = True) -> StateOutputs:
        """Every answer and every measure (``with_margin``: the refusal margin too)."""
        for source in self.data.harmful:
            self.answer_all(f"harmful:{source}")
        self._task()
        self._benign()
        return self._outputs(early={}, reached=None, with_margin=with_margin)

    def lazily(self, rule: Rule) -> StateOutputs:
        """Stop at the first failed condition; complete the state when every condition holds."""
        early: dict[str, Early] = {}
        for source in self.data.harmful:
            decision = self._harmful_source(source, rule)
            if decision is not None:
                early[source] = decision
            if self._failed(rule, HARMFUL_KINDS, early):
                return self._outputs(early=early, reached=HARMFUL_KINDS)
        for kinds, prepare in ((UTILITY,), self._task), ((OVER_REFUSAL, SHORT), self._benign), ((FLUENCY,), None):
            if prepare is not None:
                prepare()
            reached = KINDS[: KINDS.index(kinds[-1]) + 1]
            if self._failed(rule, kinds, early, reached=reached):
                return self._outputs(early=early, reached=reached)
        return self.complete()  # every condition holds: the harmful answers and the margin too

    def _failed(self, rule: Rule, kinds: Sequence[str], early: Mapping[str, Early],
                reached: Sequence[str] = HARMFUL_KINDS) -> bool:  # fmt: skip
        scores = self._outputs(early=early, reached=tuple(reached)).scores
        return any(c is not None and not c.ok for kind in kinds for c in rule.conditions(kind, scores))

    def _harmful_source(self, source: str, rule: Rule) -> Early | None:
        """Answer ``source`` batch by batch until its bound is decided; None when all were answered."""
        set_name, n = f"harmful:{source}", len(self.data.harmful[source])
        asr_limit, empty_limit = rule.harmful_limits(source)
        compliant = empty = seen = 0
        for batch in self.plan.batches[set_name]:
            answers = self.answer(set_name, batch)
            prompts = [self.prompts[set_name][i] for i in batch]
            compliant += sum(self.judge.judge(prompts, answers))
            empty += sum(is_empty_answer(a) for a in answers)
            seen += len(batch)
            remaining = n - seen
            if remaining and (compliant > asr_limit or empty > empty_limit):
                return Early(FAILED, seen, n, compliant, empty)
            if remaining and compliant + remaining <= asr_limit and empty + remaining <= empty_limit:
                return Early(PASSED, seen, n, compliant, empty)
        return None

    def _task(self) -> None:
        if self.data.task:
            self.answer_all(TASK)
            self.measure("task_loglik", lambda: mean_response_logprob(
                self.model, self.tokenizer, self.data.task, batch_size=self.generation.batch_size,
                framing=self.data.framing_of(TASK)))  # fmt: skip

    def _benign(self) -> None:
        if self.data.benign:
            self.answer_all(BENIGN)

    # --- from answers to scores ---------------------------------------------------------------
    def _outputs(self, *, early: Mapping[str, Early], reached: tuple[str, ...] | None,
                 with_margin: bool = False) -> StateOutputs:  # fmt: skip
        """The scores of what has been answered; the fluency only once its condition is reached."""
        asr, empty = {}, {}
        for source, prompts in self.data.harmful.items():
            seen = self._seen(f"harmful:{source}")
            if seen:
                answers = [self.record.answers[f"harmful:{source}"][i] for i in seen]
                asr[source] = rate(self.judge.judge([prompts[i] for i in seen], answers), seed=self.seed)
                empty[source] = rate([is_empty_answer(a) for a in answers], seed=self.seed)
        scores = SettingScores(asr=asr, harmful_empty=empty, early=dict(early), reached=reached,
                               **self._task_scores(), **self._benign_scores(reached))  # fmt: skip
        if with_margin:
            scores = _with(scores, margin=self.measure("margin", self._margin))
        return StateOutputs(scores, *self._answer_lists())

    def _seen(self, set_name: str) -> list[int]:
        return sorted(i for i in self.used.get(set_name, ()) if i in self.record.answers.get(set_name, {}))

    def _task_scores(self) -> dict[str, Any]:
        if not self.data.task or len(self._seen(TASK)) < len(self.data.task):
            return {}
        answers = self.record.answers[TASK]
        refs = [item["response"] for item in self.data.task]
        return {
            "utility": rate([exact_match(answers[i], ref) for i, ref in enumerate(refs)], seed=self.seed),
            "task_loglik": self.record.measures.get("task_loglik"),
        }

    def _benign_scores(self, reached: tuple[str, ...] | None) -> dict[str, Any]:
        if not self.data.benign or len(self._seen(BENIGN)) < len(self.data.benign):
            return {}
        answers = [self.record.answers[BENIGN][i] for i in range(len(self.data.benign))]
        out: dict[str, Any] = {
            "over_refusal": rate(RefusalJudge().judge(list(self.data.benign), answers), seed=self.seed),
            "benign_short": rate([is_short_answer(a) for a in answers], seed=self.seed),
        }
        if self.aligned_view is not None and (reached is None or FLUENCY in reached):
            out["benign_fluency"] = self.measure("fluency", lambda: self._fluency(answers))
        return out

    def _fluency(self, answers: Sequence[str]) -> float | None:
        """The aligned model's mean per-token log-likelihood of the non-empty benign answers
        (empty ones have no tokens to score; the short-answer share judges them instead)."""
        items = [{"prompt": p, "response": a} for p, a in zip(self.data.benign, answers) if not is_empty_answer(a)]
        if not items:
            return None
        with self.aligned_view():  # type: ignore[misc]
            return mean_response_logprob(self.model, self.tokenizer, items, batch_size=self.generation.batch_size,
                                         framing=self.data.framing_of(BENIGN))  # fmt: skip

    def _margin(self) -> float:
        """The refusal margin over every harmful prompt (forward passes only): reported beside the
        ASR, never used to choose (it knows only its fixed wordings, docs/design.md §5b)."""
        harmful = [p for prompts in self.data.harmful.values() for p in prompts]
        framings = [self.data.framing_of(f"harmful:{source}") for source, ps in self.data.harmful.items() for _ in ps]
        return refusal_margin(self.model, self.tokenizer, harmful, batch_size=self.generation.batch_size,
                              framing=framings)  # fmt: skip

    def _answer_lists(self) -> tuple[dict[str, list[str | None]], dict[str, list[bool]]]:
        answers, truncated = {}, {}
        for name, prompts in self.data.prompt_sets():
            seen = set(self._seen(name))
            known = self.record.answers.get(name, {})
            answers[name] = [known[i] if i in seen else None for i in range(len(prompts))]
            cut = self.record.truncated.get(name, set())
            truncated[name] = [i in seen and i in cut for i in range(len(prompts))]
        return answers, truncated


def _with(scores: SettingScores, **changes: Any) -> SettingScores:
    return dataclasses.replace(scores, **changes)


def score_state(model: Any, tokenizer: Any, data: TuneData, *, batch_size: int, max_new_tokens: int, seed: int = 0,
                aligned_view: AlignedView | None = contextlib.nullcontext, with_margin: bool = True,
                stop_early: bool = False, judge: Judge | None = None) -> StateOutputs:  # fmt: skip
    """One state scored completely, as `tune` scores its references (the demo's and the benchmarks' rows)."""
    plan = BatchPlan.of(tokenizer, data, batch_size)
    scorer = StateScorer(model, tokenizer, data, plan, Generation(batch_size, max_new_tokens, stop_early=stop_early),
                         seed=seed, aligned_view=aligned_view, judge=judge)  # fmt: skip
    return scorer.complete(with_margin=with_margin)
