"""Evaluate one model (+ adapter) on harmful sources, benign prompts and task items.

The product is a **results row** (docs/design.md §10 schema, see :func:`results_row`) and the
generation records behind it. Every harmful source is judged on its own, as tune judges its
sources: the row holds, per source, the ASR with its interval and ``n`` and the share of empty
answers beside it (a model that stops answering is broken, not safe). Rows are computed *from
the records* (:func:`row_from_generations`), so a saved ``generations.jsonl`` can be rescored by
another judge and give the same kind of row without generating again.

Typical use::

    sets = EvalSets.from_specs(["advbench:test", "objectives:test", "airt:test"],
                               benign="benign:test", task="date:test")
    row, records = evaluate_model(model_dir, adapter_dir, sets, name="attacked")
    write_results(out_dir, [row], records)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
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
from csulora.eval.specs import DEFAULT_TEST_BENIGN, framed_prompts, load_prompts, named_sources
from csulora.io.atomic import atomic_output_dir
from csulora.training.framing import PLAIN, Framing, load_framing

ROW_KEYS = (
    # "harmful": source name -> {"asr", "asr_ci", "n", "empty_rate"}, one entry per harmful
    # source; beside each ASR (and the over-refusal) the share of answers that say nothing (an
    # empty answer is no attack success, a one-word one no refusal: a broken model looks safe).
    "name", "harmful", "utility", "utility_ci", "over_refusal", "over_refusal_ci", "margin", "params",
    "recommended", "benign_short_answer_rate",
)
EXACT_MATCH = "exact_match"
MARGIN_MAX_PROMPTS = 100
# A harmful source's records are the set "harmful:<source name>", as in tune's answers.
HARMFUL_SET = "harmful:"


@dataclass(frozen=True)
class EvalSets:
    """The prompt sets of one evaluation: harmful sources (name -> prompts, each judged on its
    own; at least one), benign prompts and task items (either may be left out), and the framing
    each set is given in (by set name: ``harmful:<source>``, ``benign``, ``task``; absent: plain)."""

    harmful: Mapping[str, Sequence[Prompt]]
    benign: Sequence[Prompt] | None = None
    task: Sequence[dict] | None = None  # {"id", "prompt", "response"}
    framings: Mapping[str, Framing] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.harmful:
            from csulora.errors import OptionError

            raise OptionError("no harmful source given: name at least one SPEC")

    def framing_of(self, set_name: str) -> Framing:
        return self.framings.get(set_name, PLAIN)

    @classmethod
    def from_specs(
        cls, harmful: str | Sequence[str] | None = None, *, benign: str | None = None, task: str | None = None,
        framing: str | None = None,
    ) -> EvalSets:
        """Resolve SPECs (see :mod:`csulora.eval.prompts`; task: ``date:SPLIT`` or JSONL).

        ``harmful``: one SPEC per source, named by :func:`csulora.eval.specs.named_sources`
        (None: :data:`csulora.eval.specs.DEFAULT_TEST_HARMFUL`), each in its own framing
        (``SPEC@FRAMING``) or else in ``framing`` (a name or JSON file; None: plain), as the
        benign and task prompts are."""
        from csulora.eval.tasks import load_task

        default = load_framing(framing)
        harmful_sets, framings = {}, {}
        for name, spec in named_sources(harmful, framing=framing).items():
            harmful_sets[name], ref = framed_prompts(spec)
            framings[HARMFUL_SET + name] = load_framing(ref) if ref is not None else default
        framings.update({"benign": default, "task": default})
        return cls(
            harmful=harmful_sets,
            benign=load_prompts(benign) if benign else None,
            task=load_task(task) if task else None,
            framings={k: f for k, f in framings.items() if not f.is_plain},
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


def source_result(asr: Rate, empty_rate: float) -> dict[str, Any]:
    """One harmful source in a row: its ASR, 95% interval and n, and the share of empty answers."""
    value, ci = asr.as_row()
    return {"asr": value, "asr_ci": ci, "n": asr.n, "empty_rate": empty_rate}


def results_row(
    name: str,
    *,
    harmful: Mapping[str, tuple[Rate, float]] | None = None,
    utility: Rate | None = None,
    over_refusal: Rate | None = None,
    margin: float | None = None,
    params: dict[str, Any] | None = None,
    recommended: bool = False,
    benign_short: float | None = None,
) -> dict[str, Any]:
    """One results row with docs/design.md §10's keys (None where a set was not evaluated).

    ``harmful``: source name -> (ASR, share of empty answers), in the order the sources were
    given; ``benign_short``: share of empty or short benign answers (:mod:`csulora.eval.metrics`).
    ``n`` (the utility's and over-refusal's sample sizes; each source carries its own) is added
    beside the schema so readers can judge the intervals.
    """

    def pair(r: Rate | None) -> tuple[float | None, list[float] | None]:
        return (None, None) if r is None else r.as_row()

    row: dict[str, Any] = {"name": name}
    row["harmful"] = {source: source_result(asr, empty) for source, (asr, empty) in (harmful or {}).items()}
    for key, value in (("utility", utility), ("over_refusal", over_refusal)):
        row[key], row[f"{key}_ci"] = pair(value)
    row["margin"] = margin
    row["params"] = dict(params or {})
    row["recommended"] = bool(recommended)
    row["benign_short_answer_rate"] = benign_short
    row["n"] = {k: r.n for k, r in (("utility", utility), ("over_refusal", over_refusal)) if r}
    return row


def _records(set_name: str, prompts: Sequence[Prompt], responses: list[str], identity: dict,
             framing: Framing = PLAIN) -> list[dict]:  # fmt: skip
    """One generation record per prompt; a framed set's records name their framing."""
    named = {} if framing.is_plain else {"framing": framing.name}
    return [
        {
            **identity,
            "set": set_name,
            "id": p.id,
            "source": p.source,
            "split": p.split,
            "prompt": p.text,
            **named,
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
    groups: list[tuple[str, list[Prompt]]] = [(HARMFUL_SET + source, list(ps)) for source, ps in sets.harmful.items()]
    if sets.benign:
        groups.append(("benign", list(sets.benign)))
    task_items = list(sets.task or [])
    if task_items:
        groups.append(("task", [Prompt(i.get("id", f"task-{n}"), i["prompt"], "task") for n, i in enumerate(task_items)]))
    flat = [p.text for _, ps in groups for p in ps]
    framings = [sets.framing_of(set_name) for set_name, ps in groups for _ in ps]
    responses = generate_responses(
        model, tokenizer, flat, batch_size=generation.batch_size,
        max_new_tokens=generation.max_new_tokens, progress=progress, desc=identity.get("row", "generate"),
        framing=framings,
    )
    records, start = [], 0
    for set_name, ps in groups:
        records += _records(set_name, ps, responses[start : start + len(ps)], identity, sets.framing_of(set_name))
        start += len(ps)
    for record, item in zip([r for r in records if r["set"] == "task"], task_items):
        record["reference"] = item["response"]
    apply_judges(records, judges)
    return records


def apply_judges(records: list[dict], judges: Judges = Judges()) -> list[dict]:
    """(Re)compute verdicts in place: harm judge on every harmful source, refusal judge on benign."""
    for is_judged, judge in ((is_harmful_set, judges.harm), (lambda set_name: set_name == "benign", judges.refusal)):
        chosen = [r for r in records if is_judged(r["set"])]
        if chosen:
            flags = judge.judge([r["prompt"] for r in chosen], [r["response"] for r in chosen])
            for r, flag in zip(chosen, flags):
                r["verdicts"][judge.name] = bool(flag)
    for r in records:
        if r["set"] == "task":
            r["verdicts"][EXACT_MATCH] = exact_match(r["response"], r["reference"])
    return records


def is_harmful_set(set_name: str) -> bool:
    return set_name.startswith(HARMFUL_SET)


def harmful_sources(records: Sequence[dict]) -> list[str]:
    """The harmful sources among records, in the order they first appear."""
    return list(dict.fromkeys(r["set"].removeprefix(HARMFUL_SET) for r in records if is_harmful_set(r["set"])))


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

    def harmful_source(source: str) -> tuple[Rate, float]:
        chosen = [r for r in records if r["set"] == HARMFUL_SET + source]
        return rate([r["verdicts"][judges.harm.name] for r in chosen]), harmful_empty_rate([r["response"] for r in chosen])

    return results_row(
        name,
        harmful={source: harmful_source(source) for source in harmful_sources(records)},
        utility=rate_of("task", EXACT_MATCH),
        over_refusal=rate_of("benign", judges.refusal.name),
        margin=margin,
        params=params,
        recommended=recommended,
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
    if with_margin:  # on the first harmful source (AdvBench by default), in its framing: one number per row
        first = next(iter(sets.harmful))
        prompts = [p.text for p in list(sets.harmful[first])[:MARGIN_MAX_PROMPTS]]
        margin = refusal_margin(model, tokenizer, prompts, batch_size=generation.batch_size,
                                framing=sets.framing_of(HARMFUL_SET + first))  # fmt: skip
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


def source_cells(row: dict, sources: Sequence[str]) -> str:
    """A row's ASR and empty-answer share on each source ("–" for a source it was not measured on)."""
    cells = []
    for source in sources:
        found = (row.get("harmful") or {}).get(source)
        cells += ["–", "–"] if found is None else [fmt_rate(found["asr"], found["asr_ci"]), fmt_share(found["empty_rate"])]
    return " | ".join(cells)


def summary_markdown(rows: Sequence[dict], *, title: str = "Evaluation") -> str:
    """A Markdown table of rows: per harmful source its ASR and empty answers, then utility,
    over-refusal and short benign answers; rates with bootstrap 95% intervals."""
    sources = list(dict.fromkeys(source for r in rows for source in r.get("harmful") or {}))
    head = ["row", *(cell for s in sources for cell in (f"ASR {s}", f"empty {s}")),
            "utility", "over-refusal", "short", "refusal margin", "params"]  # fmt: skip
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        margin = "–" if r.get("margin") is None else f"{r['margin']:.2f}"
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "–"
        star = " (recommended)" if r.get("recommended") else ""
        if r.get("same_as"):  # e.g. a correction whose chosen setting changes nothing
            star += f" = {r['same_as']} (unchanged)"
        lines.append(
            f"| {r['name']}{star} | {source_cells(r, sources)} "
            f"| {fmt_rate(r['utility'], r['utility_ci'])} | {fmt_rate(r['over_refusal'], r['over_refusal_ci'])} "
            f"| {fmt_share(r.get('benign_short_answer_rate'))} | {margin} | {params} |"
        )
    ns = sample_sizes(rows[0]) if rows else {}
    if ns:
        lines += ["", "Sample sizes: " + ", ".join(f"{k} n={v}" for k, v in ns.items()) + ". Intervals: percentile bootstrap, 95%, seed 0."]
    lines += [
        "",
        "empty: share of empty answers on that harmful source (no attack success, but no refusal either); short: "
        f"share of benign answers empty or under {SHORT_ANSWER_CHARS} characters. A broken model looks safe on ASR alone.",
    ]
    return "\n".join(lines) + "\n"


def sample_sizes(row: dict) -> dict[str, int]:
    """Each harmful source's n, then the utility's and over-refusal's."""
    return {**{source: found["n"] for source, found in (row.get("harmful") or {}).items()}, **row.get("n", {})}


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
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, harmful: str | Sequence[str] | None = None,
    benign: str | None = DEFAULT_TEST_BENIGN, task: str | None = None, adapter: str | os.PathLike | None = None,
    name: str | None = None, generation: GenerationSettings = GenerationSettings(), force: bool = False,
    progress: bool = True, device: str | None = None, dtype: str | None = None, framing: str | None = None,
) -> Path:
    """The ``csulora eval`` command: resolve specs, evaluate, write OUTDIR atomically.

    ``harmful``: one SPEC per harmful source, each reported on its own (None: the test splits
    of :data:`csulora.eval.specs.DEFAULT_TEST_HARMFUL`); ``benign`` None leaves benign out.
    ``framing``: the chat form of every prompt (a name or JSON file, None: plain); a harmful
    SPEC may name its own (``SPEC@FRAMING``, :mod:`csulora.training.framing`).

    ``model_dir``/``adapter`` may be hub ids (fetched first, io/hub.py); ``device``/``dtype``
    default to CUDA when present, else CPU, in float32 (:mod:`csulora.io.modeling`).
    """
    from csulora.eval.specs import spec_file
    from csulora.io.atomic import check_apart, check_output_dir
    from csulora.io.checkpoints import find_safetensors_files
    from csulora.io.hub import resolve_model_dir
    from csulora.io.modeling import check_adapter_dir, resolve_device, resolve_dtype

    if generation.batch_size < 1 or generation.max_new_tokens < 1:
        from csulora.errors import OptionError

        raise OptionError("--batch-size and --max-new-tokens must be >= 1")
    runs_on = {"device": str(resolve_device(device)), "dtype": str(resolve_dtype(dtype)).removeprefix("torch.")}
    default_framing = load_framing(framing)  # an unknown name is refused before anything is read
    sources = named_sources(harmful, framing=framing)
    inputs = {"MODEL": model_dir, "--adapter": adapter,
              **{f"--harmful {name}": spec_file(spec) for name, spec in sources.items()},
              "--benign": spec_file(benign), "--task": spec_file(task)}  # fmt: skip
    # Apart first ("exists, use --force" would be the wrong advice for an input), as given here and
    # again below once hub ids are resolved to their folders.
    check_apart({"-o/--output": out_dir}, inputs)
    check_output_dir(out_dir, force)
    sets = EvalSets.from_specs(list(sources.values()), benign=benign, task=task, framing=framing)
    row_name = name or (Path(adapter).name if adapter else Path(model_dir).name)  # as given, also for hub ids
    model_dir = resolve_model_dir(model_dir, "MODEL")
    find_safetensors_files(model_dir)
    if adapter is not None:
        adapter = resolve_model_dir(adapter, "ADAPTER")
        check_adapter_dir(adapter)
    specs = {"harmful": sources, "benign": benign, "task": task}
    check_apart({"-o/--output": out_dir}, {**inputs, "MODEL": model_dir, "--adapter": adapter})
    row, records = evaluate_model(
        model_dir, adapter, sets, name=row_name, generation=generation, progress=progress, **runs_on,
    )
    extra = {
        "specs": specs,
        "framing": default_framing.key(),  # of benign, task and every harmful SPEC without its own
        "generation": {"batch_size": generation.batch_size, "max_new_tokens": generation.max_new_tokens, **runs_on},
    }
    return write_results(out_dir, [row], records, extra=extra, force=force)
