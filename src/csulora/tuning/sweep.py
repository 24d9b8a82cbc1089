"""The sweep: the aligned model and the uncorrected update scored completely, then each method's
settings weakest first -- lazily, stopping at a method's first qualifying setting (the default), or
every setting completely (``--full-sweep``, docs/design.md §10, issue 21).

With ``--method all`` each method stops at its own first qualifying setting, and the choice is
the highest validation utility among those (:func:`csulora.tuning.selection.select_across_methods`).
Every method shares the aligned model's and the update's scores and the score cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csulora.tuning.config import TuneConfig
from csulora.tuning.data import TuneData
from csulora.tuning.plan import MethodPlan
from csulora.tuning.score_cache import ScoreCache
from csulora.tuning.scores import ScoredSetting, SettingScores
from csulora.tuning.scoring import AlignedView, BatchPlan, Generation, StateOutputs, StateScorer
from csulora.tuning.selection import MethodSweep
from csulora.tuning.states import UNCORRECTED, Candidate, ModelStates
from csulora.tuning.verdicts import Rule


@dataclass
class SweepResult:
    aligned: SettingScores
    adapter: SettingScores
    sweeps: list[MethodSweep]
    candidates: list[Candidate]  # the scored ones, flat, in the order of the sweeps' settings
    answers: list[dict[str, Any]] = field(default_factory=list)  # every answer read, for the JSONL
    not_scored: list[dict[str, Any]] = field(default_factory=list)  # settings past a method's first qualifying one


def candidates_of(plans: Sequence[MethodPlan]) -> list[Candidate]:
    """Every setting of every method, weakest first within a method."""
    return [
        Candidate(plan, i, value, None, plan.config.is_identity(value))
        for plan in plans
        for i, value in enumerate(plan.config.grid)
    ]


class Sweep:
    """One run's sweep over ``candidates`` (already prepared by ``states``)."""

    def __init__(self, states: ModelStates, plans: Sequence[MethodPlan], candidates: Sequence[Candidate],
                 data: TuneData, run: Mapping[str, Any], config: TuneConfig, *, cache: ScoreCache | None,
                 progress: bool, timing: dict[str, float]) -> None:  # fmt: skip
        self.states, self.plans, self.candidates, self.data = states, plans, list(candidates), data
        self.run_on, self.config, self.cache, self.timing = run, config, cache, timing
        self.generation = Generation(config.batch_size, config.max_new_tokens, stop_early=not config.full_sweep)
        self.bar = tqdm(total=2 + len(self.candidates), desc=f"tune {', '.join(p.config.method for p in plans)}",
                        unit="state", disable=None if progress else True)  # fmt: skip
        self.answers: list[dict[str, Any]] = []

    def run(self) -> SweepResult:
        try:
            started = time.perf_counter()
            self.model, self.tokenizer = self.states.load(self.run_on)
            self.timing["load"] = round(time.perf_counter() - started, 3)
            self.plan = BatchPlan.of(self.tokenizer, self.data, self.config.batch_size)
            with self.states.aligned() as view:
                aligned = self.score("aligned", {}, view, None, StateScorer.complete)
            with self.states.uncorrected() as view:
                adapter = self.score(UNCORRECTED, {}, view, self.states.cache_files(None), StateScorer.complete)
            return self._methods(aligned, adapter)
        finally:
            self.bar.close()

    def _methods(self, aligned: SettingScores, adapter: SettingScores) -> SweepResult:
        sweeps, scored, not_scored = [], [], []
        for plan in self.plans:
            rule = Rule(aligned, adapter, plan.config)
            settings: list[ScoredSetting] = []
            mine = [c for c in self.candidates if c.plan is plan]
            for position, candidate in enumerate(mine):
                setting = ScoredSetting(candidate.value, self._setting(candidate, adapter, rule))
                settings.append(setting)
                scored.append(candidate)
                if not self.config.full_sweep and rule.judge(setting).qualifies:
                    rest = mine[position + 1 :]
                    not_scored += [{"method": c.method, "value": c.value} for c in rest]
                    self.bar.update(len(rest))
                    break
            sweeps.append(MethodSweep(plan.config, tuple(settings)))
        return SweepResult(aligned, adapter, sweeps, scored, self.answers, not_scored)

    def _setting(self, candidate: Candidate, adapter: SettingScores, rule: Rule) -> SettingScores:
        if candidate.identity:
            self.bar.update(1)
            return adapter  # the same update: no need to generate again
        how = StateScorer.complete if self.config.full_sweep else (lambda scorer: scorer.lazily(rule))
        where = {"method": candidate.method, candidate.plan.config.knob: candidate.value}
        with self.states.setting(candidate) as view:
            return self.score(candidate.state, where, view, self.states.cache_files(candidate), how)

    def score(self, state: str, where: Mapping[str, Any], view: AlignedView, files: Path | None | bool,
              how: Callable[[StateScorer], StateOutputs]) -> SettingScores:  # fmt: skip
        """Score one state (``files``: what its cache key reads, None for the aligned model; False: not cached)."""
        started = time.perf_counter()
        key = self.cache.key(files) if self.cache is not None and files is not False else None  # type: ignore[arg-type]
        record = self.cache.load(key, state) if key is not None else None
        persist = (lambda r: self.cache.save(key, r, state)) if key is not None else None  # type: ignore[union-attr]
        scorer = StateScorer(self.model, self.tokenizer, self.data, self.plan, self.generation, seed=self.config.seed,
                             aligned_view=view, record=record, persist=persist, desc=state)  # fmt: skip
        outputs = how(scorer)
        self.timing[state] = round(time.perf_counter() - started, 3)
        self._keep_answers(state, where, outputs)
        self.bar.set_postfix_str(f"{state}: ASR " + ", ".join(f"{v.value:.2f}" for v in outputs.scores.asr.values()))
        self.bar.update(1)
        return outputs.scores

    def _keep_answers(self, state: str, where: Mapping[str, Any], outputs: StateOutputs) -> None:
        for set_name, prompts in self.data.prompt_sets():
            for prompt, response, truncated in zip(prompts, outputs.answers[set_name], outputs.truncated[set_name]):
                if response is not None:
                    self.answers.append({"state": state, **where, "set": set_name, "prompt": prompt,
                                         "response": response, "truncated": truncated})  # fmt: skip
