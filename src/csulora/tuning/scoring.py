"""Score one model state (aligned, adapter, or a corrected setting) on the tune data.

All prompts of a state -- every harmful source, the task, the benign set -- go through
ONE batched greedy generation call, so batches stay full however small each set is;
the answers are then split back by set and judged. The task's reference responses are
also scored by their mean per-token log-likelihood (forward passes only), which breaks
exact match's ties (see :mod:`csulora.tuning.selection`), and the refusal margin is
recorded for reference.

Broken answers are measured beside the judges: the share of empty harmful answers per
source, the share of empty or short benign answers, and the **fluency** of the benign
answers -- the aligned model's mean per-token log-likelihood of them, computed on the
same in-memory model with the adapters switched off (``aligned_view``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from csulora.eval.generation import generate_responses
from csulora.eval.judges import KeywordJudge, RefusalJudge
from csulora.eval.margin import mean_response_logprob, refusal_margin
from csulora.eval.metrics import exact_match, is_empty_answer, is_short_answer, rate
from csulora.tuning.selection import SettingScores

# Turns the model being scored into the aligned model for the duration of a with-block:
# ``contextlib.nullcontext`` for the aligned model itself, ``peft_model.disable_adapter``
# once adapters are attached.
AlignedView = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class TuneData:
    """The validation data every setting is scored on (never a test split)."""

    harmful: Mapping[str, Sequence[str]]  # source name -> prompts, each judged separately
    task: Sequence[Mapping[str, str]] = field(default=())  # {"prompt", "response"} items
    benign: Sequence[str] = field(default=())

    def prompt_count(self) -> int:
        return sum(len(p) for p in self.harmful.values()) + len(self.task) + len(self.benign)

    def prompt_sets(self) -> list[tuple[str, list[str]]]:
        """Every prompt set by name: ``harmful:<source>``, ``task``, ``benign``."""
        sets = [(f"harmful:{name}", list(ps)) for name, ps in self.harmful.items()]
        if self.task:
            sets.append(("task", [item["prompt"] for item in self.task]))
        if self.benign:
            sets.append(("benign", list(self.benign)))
        return sets


@dataclass
class StateOutputs:
    """Scores plus the raw answers (kept so tune.json can show examples)."""

    scores: SettingScores
    answers: dict[str, list[str]]


def score_model(
    model,
    tokenizer,
    data: TuneData,
    *,
    batch_size: int,
    max_new_tokens: int,
    seed: int = 0,
    desc: str = "generate",
    with_margin: bool = True,
    aligned_view: AlignedView | None = contextlib.nullcontext,
) -> StateOutputs:
    """Generate once for every prompt of ``data`` and judge each set on its own.

    ``with_margin``: also record the refusal margin over all harmful prompts (forward
    passes only). It is reported beside the ASR, never used to choose: it knows only its
    fixed refusal wordings and misranks strong corrections (docs/design.md §5b).
    ``aligned_view``: how to see the aligned model in ``model`` (see :data:`AlignedView`;
    the default fits a bare aligned model); None skips the fluency measure.
    """
    sets = data.prompt_sets()
    flat = [prompt for _, prompts in sets for prompt in prompts]
    flat_answers = generate_responses(
        model, tokenizer, flat, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False, desc=desc
    )
    answers: dict[str, list[str]] = {}
    start = 0
    for name, prompts in sets:
        answers[name] = flat_answers[start : start + len(prompts)]
        start += len(prompts)

    keyword = KeywordJudge()
    asr = {
        name: rate(keyword.judge(list(prompts), answers[f"harmful:{name}"]), seed=seed)
        for name, prompts in data.harmful.items()
    }
    utility = loglik = None
    if data.task:
        refs = [item["response"] for item in data.task]
        utility = rate([exact_match(a, r) for a, r in zip(answers["task"], refs)], seed=seed)
        loglik = mean_response_logprob(model, tokenizer, data.task, batch_size=batch_size)
    empty = {
        name: rate([is_empty_answer(a) for a in answers[f"harmful:{name}"]], seed=seed) for name in data.harmful
    }
    over_refusal = short = fluency = None
    if data.benign:
        over_refusal = rate(RefusalJudge().judge(list(data.benign), answers["benign"]), seed=seed)
        short = rate([is_short_answer(a) for a in answers["benign"]], seed=seed)
        if aligned_view is not None:
            fluency = aligned_fluency(
                model, tokenizer, data.benign, answers["benign"], aligned_view=aligned_view, batch_size=batch_size
            )
    margin = None
    if with_margin:
        harmful = [p for prompts in data.harmful.values() for p in prompts]
        margin = refusal_margin(model, tokenizer, harmful, batch_size=batch_size)
    scores = SettingScores(
        asr=asr,
        utility=utility,
        task_loglik=loglik,
        over_refusal=over_refusal,
        margin=margin,
        harmful_empty=empty,
        benign_short=short,
        benign_fluency=fluency,
    )
    return StateOutputs(scores, answers)


def aligned_fluency(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, aligned_view: AlignedView, batch_size: int
) -> float | None:
    """The aligned model's mean per-token log-likelihood of the non-empty ``answers``.

    Empty answers have no tokens to score (they would count as perfectly likely); the
    short-answer share judges them instead. None when every answer is empty.
    """
    items = [{"prompt": p, "response": a} for p, a in zip(prompts, answers) if not is_empty_answer(a)]
    if not items:
        return None
    with aligned_view():
        return mean_response_logprob(model, tokenizer, items, batch_size=batch_size)
