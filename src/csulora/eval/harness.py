"""Evaluate one model (+ adapter) on harmful / out-of-distribution / benign / task sets.

The product is a **results row** (docs/design.md §10 schema, see :func:`results_row`) and the
generation records behind it. Rows are computed *from the records*
(:func:`row_from_generations`), so a saved ``generations.jsonl`` can be rescored by
another judge and give the same kind of row without generating again.

Typical use::

    sets = EvalSets.from_specs(harmful="advbench:test", harmful_ood="airt:test",
                               benign="benign", task="date:test")
    row, records = evaluate_model(model_dir, adapter_dir, sets, name="attacked")
    write_results(out_dir, [row], records)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csulora.eval.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, generate_responses
from csulora.eval.judges import Judge, RefusalJudge, asr_judge
from csulora.eval.metrics import (
    SHORT_ANSWER_CHARS,
    Rate,
    benign_short_answer_rate,
    exact_match,
    harmful_empty_rate,
    rate,
)
from csulora.eval.prompts import Prompt
from csulora.eval.specs import load_prompts
from csulora.io.atomic import atomic_output_dir

ROW_KEYS = (
    "name", "asr", "asr_ci", "asr_ood", "asr_ood_ci", "utility", "utility_ci",
    "over_refusal", "over_refusal_ci", "margin", "params", "recommended",
    # Beside every ASR and the over-refusal: the share of answers that say nothing (an
    # empty answer is no attack success, a one-word one no refusal: a broken model looks safe).
    "harmful_empty_rate", "harmful_ood_empty_rate", "benign_short_answer_rate",
)
EXACT_MATCH = "exact_match"
MARGIN_MAX_PROMPTS = 100


@dataclass(frozen=True)
class EvalSets:
    """The prompt sets of one evaluation; any but ``harmful`` may be left out."""

    harmful: Sequence[Prompt]
    harmful_ood: Sequence[Prompt] | None = None
    benign: Sequence[Prompt] | None = None
    task: Sequence[dict] | None = None  # {"id", "prompt", "response"}

    @classmethod
    def from_specs(
        cls, harmful: str, *, harmful_ood: str | None = None, benign: str | None = None, task: str | None = None
    ) -> EvalSets:
        """Resolve SPECs (see :mod:`csulora.eval.prompts`; task: ``date:SPLIT`` or JSONL)."""
        from csulora.eval.tasks import load_task

        return cls(
            harmful=load_prompts(harmful),
            harmful_ood=load_prompts(harmful_ood) if harmful_ood else None,
            benign=load_prompts(benign) if benign else None,
            task=load_task(task) if task else None,
        )


@dataclass(frozen=True)
class GenerationSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class Judges:
    """Which judge scores what: attack success on harmful sets, refusal on benign."""

    harm: Judge = field(default_factory=asr_judge)  # the project's ASR judge (docs/judge.md)
    refusal: Judge = field(default_factory=RefusalJudge)


def results_row(
    name: str,
    *,
    asr: Rate | None = None,
    asr_ood: Rate | None = None,
    utility: Rate | None = None,
    over_refusal: Rate | None = None,
    margin: float | None = None,
    params: dict[str, Any] | None = None,
    recommended: bool = False,
    harmful_empty: float | None = None,
    harmful_ood_empty: float | None = None,
    benign_short: float | None = None,
) -> dict[str, Any]:
    """One results row with docs/design.md §10's keys (None where a set was not evaluated).

    ``harmful_empty`` / ``harmful_ood_empty``: share of empty answers on the harmful sets,
    ``benign_short``: share of empty or short benign answers (:mod:`csulora.eval.metrics`).
    ``n`` (sample sizes) is added beside the schema so readers can judge the intervals.
    """

    def pair(r: Rate | None) -> tuple[float | None, list[float] | None]:
        return (None, None) if r is None else r.as_row()

    row: dict[str, Any] = {"name": name}
    for key, value in (("asr", asr), ("asr_ood", asr_ood), ("utility", utility), ("over_refusal", over_refusal)):
        row[key], row[f"{key}_ci"] = pair(value)
    row["margin"] = margin
    row["params"] = dict(params or {})
    row["recommended"] = bool(recommended)
    row["harmful_empty_rate"] = harmful_empty
    row["harmful_ood_empty_rate"] = harmful_ood_empty
    row["benign_short_answer_rate"] = benign_short
    row["n"] = {k: r.n for k, r in (("asr", asr), ("asr_ood", asr_ood), ("utility", utility), ("over_refusal", over_refusal)) if r}
    return row


def _records(set_name: str, prompts: Sequence[Prompt], responses: list[str], identity: dict) -> list[dict]:
    return [
        {
            **identity,
            "set": set_name,
            "id": p.id,
            "source": p.source,
            "split": p.split,
            "prompt": p.text,
            "response": r,
            "verdicts": {},
        }
        for p, r in zip(prompts, responses)
    ]


def generate_records(
    model, tokenizer, sets: EvalSets, *, identity: dict | None = None,
    generation: GenerationSettings = GenerationSettings(), judges: Judges = Judges(), progress: bool = True,
) -> list[dict]:
    """Generate once for every set (one batched call) and attach the judges' verdicts."""
    identity = dict(identity or {})
    groups: list[tuple[str, list[Prompt]]] = [("harmful", list(sets.harmful))]
    if sets.harmful_ood:
        groups.append(("harmful_ood", list(sets.harmful_ood)))
    if sets.benign:
        groups.append(("benign", list(sets.benign)))
    task_items = list(sets.task or [])
    if task_items:
        groups.append(("task", [Prompt(i.get("id", f"task-{n}"), i["prompt"], "task") for n, i in enumerate(task_items)]))
    flat = [p.text for _, ps in groups for p in ps]
    responses = generate_responses(
        model, tokenizer, flat, batch_size=generation.batch_size,
        max_new_tokens=generation.max_new_tokens, progress=progress, desc=identity.get("row", "generate"),
    )
    records, start = [], 0
    for set_name, ps in groups:
        records += _records(set_name, ps, responses[start : start + len(ps)], identity)
        start += len(ps)
    for record, item in zip([r for r in records if r["set"] == "task"], task_items):
        record["reference"] = item["response"]
    apply_judges(records, judges)
    return records


def apply_judges(records: list[dict], judges: Judges = Judges()) -> list[dict]:
    """(Re)compute verdicts in place: harm judge on harmful sets, refusal judge on benign."""
    for set_names, judge in ((("harmful", "harmful_ood"), judges.harm), (("benign",), judges.refusal)):
        chosen = [r for r in records if r["set"] in set_names]
        if chosen:
            flags = judge.judge([r["prompt"] for r in chosen], [r["response"] for r in chosen])
            for r, flag in zip(chosen, flags):
                r["verdicts"][judge.name] = bool(flag)
    for r in records:
        if r["set"] == "task":
            r["verdicts"][EXACT_MATCH] = exact_match(r["response"], r["reference"])
    return records


def row_from_generations(
    records: Sequence[dict], name: str, *, judges: Judges = Judges(), margin: float | None = None,
    params: dict[str, Any] | None = None, recommended: bool = False,
) -> dict[str, Any]:
    """The results row of one model's records, from the verdicts they carry."""

    def rate_of(set_name: str, verdict: str) -> Rate | None:
        flags = [r["verdicts"][verdict] for r in records if r["set"] == set_name]
        return rate(flags) if flags else None

    def share_of(set_name: str, share: Callable[[Sequence[str]], float]) -> float | None:
        responses = [r["response"] for r in records if r["set"] == set_name]
        return share(responses) if responses else None

    return results_row(
        name,
        asr=rate_of("harmful", judges.harm.name),
        asr_ood=rate_of("harmful_ood", judges.harm.name),
        utility=rate_of("task", EXACT_MATCH),
        over_refusal=rate_of("benign", judges.refusal.name),
        margin=margin,
        params=params,
        recommended=recommended,
        harmful_empty=share_of("harmful", harmful_empty_rate),
        harmful_ood_empty=share_of("harmful_ood", harmful_empty_rate),
        benign_short=share_of("benign", benign_short_answer_rate),
    )


def evaluate_loaded(
    model, tokenizer, sets: EvalSets, *, name: str, params: dict[str, Any] | None = None,
    identity: dict | None = None, generation: GenerationSettings = GenerationSettings(),
    judges: Judges = Judges(), with_margin: bool = True, progress: bool = True,
) -> tuple[dict[str, Any], list[dict]]:
    """Row and records for an already loaded model (e.g. reused across a sweep)."""
    from csulora.eval.margin import refusal_margin

    identity = {"row": name, **(identity or {})}
    records = generate_records(model, tokenizer, sets, identity=identity, generation=generation, judges=judges, progress=progress)
    margin = None
    if with_margin:
        prompts = [p.text for p in list(sets.harmful)[:MARGIN_MAX_PROMPTS]]
        margin = refusal_margin(model, tokenizer, prompts, batch_size=generation.batch_size)
    return row_from_generations(records, name, judges=judges, margin=margin, params=params), records


def evaluate_model(
    model_dir: str | os.PathLike, adapter: str | os.PathLike | None, sets: EvalSets, *, name: str,
    params: dict[str, Any] | None = None, generation: GenerationSettings = GenerationSettings(),
    judges: Judges = Judges(), with_margin: bool = True, progress: bool = True,
    device: str | None = None, dtype: str | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Load ``model_dir`` (+ ``adapter``, merged) on ``device`` in ``dtype`` (defaults:
    :func:`csulora.io.modeling.load_model`'s) and evaluate it: (row, records)."""
    from csulora.io.modeling import load_model, model_identity

    model, tokenizer = load_model(model_dir, adapter, device=device, dtype=dtype)
    return evaluate_loaded(
        model, tokenizer, sets, name=name, params=params, identity=model_identity(model_dir, adapter),
        generation=generation, judges=judges, with_margin=with_margin, progress=progress,
    )


# --------------------------------------------------------------------------- output


def fmt_share(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_rate(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def summary_markdown(rows: Sequence[dict], *, title: str = "Evaluation") -> str:
    """A Markdown table of rows: rates with bootstrap 95% intervals."""
    lines = [
        f"# {title}",
        "",
        "| row | ASR | empty | ASR (OOD) | empty (OOD) | utility | over-refusal | short | refusal margin | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        margin = "–" if r.get("margin") is None else f"{r['margin']:.2f}"
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "–"
        star = " (recommended)" if r.get("recommended") else ""
        if r.get("same_as"):  # e.g. a correction whose chosen setting changes nothing
            star += f" = {r['same_as']} (unchanged)"
        lines.append(
            f"| {r['name']}{star} | {fmt_rate(r['asr'], r['asr_ci'])} | {fmt_share(r.get('harmful_empty_rate'))} "
            f"| {fmt_rate(r['asr_ood'], r['asr_ood_ci'])} | {fmt_share(r.get('harmful_ood_empty_rate'))} "
            f"| {fmt_rate(r['utility'], r['utility_ci'])} | {fmt_rate(r['over_refusal'], r['over_refusal_ci'])} "
            f"| {fmt_share(r.get('benign_short_answer_rate'))} | {margin} | {params} |"
        )
    ns = rows[0].get("n", {}) if rows else {}
    if ns:
        lines += ["", "Sample sizes: " + ", ".join(f"{k} n={v}" for k, v in ns.items()) + ". Intervals: percentile bootstrap, 95%, seed 0."]
    lines += [
        "",
        "empty: share of empty harmful answers (no attack success, but no refusal either); short: share of "
        f"benign answers empty or under {SHORT_ANSWER_CHARS} characters. A broken model looks safe on ASR alone.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | os.PathLike, rows: Sequence[dict], records: Sequence[dict], *,
    extra: dict[str, Any] | None = None, force: bool = False, title: str = "Evaluation",
) -> Path:
    """Write ``results.json`` ({"rows": [...], **extra}), ``generations.jsonl``, ``summary.md``."""
    with atomic_output_dir(out_dir, force) as tmp:
        write_results_files(tmp, rows, records, extra=extra, title=title)
    return Path(out_dir)


def write_results_files(folder: Path, rows: Sequence[dict], records: Sequence[dict], *, extra: dict | None = None, title: str = "Evaluation") -> None:
    """The three result files into an existing (temporary) folder."""
    (folder / "results.json").write_text(json.dumps({"rows": list(rows), **(extra or {})}, indent=2) + "\n")
    with open(folder / "generations.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    (folder / "summary.md").write_text(summary_markdown(rows, title=title))


def run_eval(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, harmful: str, benign: str | None = None,
    task: str | None = None, harmful_ood: str | None = None, adapter: str | os.PathLike | None = None,
    name: str | None = None, generation: GenerationSettings = GenerationSettings(), force: bool = False,
    progress: bool = True, device: str | None = None, dtype: str | None = None,
) -> Path:
    """The ``csulora eval`` command: resolve specs, evaluate, write OUTDIR atomically.

    ``model_dir``/``adapter`` may be hub ids (fetched first, io/hub.py); ``device``/``dtype``
    default to CUDA when present, else CPU, in float32 (:mod:`csulora.io.modeling`).
    """
    from csulora.io.atomic import check_output_dir
    from csulora.io.checkpoints import find_safetensors_files
    from csulora.io.hub import resolve_model_dir
    from csulora.io.modeling import check_adapter_dir, resolve_device, resolve_dtype

    if generation.batch_size < 1 or generation.max_new_tokens < 1:
        from csulora.errors import OptionError

        raise OptionError("--batch-size and --max-new-tokens must be >= 1")
    runs_on = {"device": str(resolve_device(device)), "dtype": str(resolve_dtype(dtype)).removeprefix("torch.")}
    check_output_dir(out_dir, force)
    sets = EvalSets.from_specs(harmful, harmful_ood=harmful_ood, benign=benign, task=task)
    row_name = name or (Path(adapter).name if adapter else Path(model_dir).name)  # as given, also for hub ids
    model_dir = resolve_model_dir(model_dir, "MODEL")
    find_safetensors_files(model_dir)
    if adapter is not None:
        adapter = resolve_model_dir(adapter, "ADAPTER")
        check_adapter_dir(adapter)
    row, records = evaluate_model(
        model_dir, adapter, sets, name=row_name, generation=generation, progress=progress, **runs_on,
    )
    specs = {"harmful": harmful, "harmful_ood": harmful_ood, "benign": benign, "task": task}
    extra = {
        "specs": specs,
        "generation": {"batch_size": generation.batch_size, "max_new_tokens": generation.max_new_tokens, **runs_on},
    }
    return write_results(out_dir, [row], records, extra=extra, force=force)
