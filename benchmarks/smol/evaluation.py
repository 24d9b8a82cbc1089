"""Evaluation: the sets, the variants (a checkpoint, optionally with a PEFT adapter), cached greedy
generations, verdicts, and one row of the test table.

A world whose updates attack in a framing (the triage world's ``triage-aoa``: ``aoa``) also
scores every row on the main harmful test sources put in that framing: the set
``advbench-test@aoa`` is ``advbench-test``'s prompts rendered in ``aoa`` (its answers cached as
their own set), reported as the source ``advbench@aoa`` beside ``advbench``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from csulora.eval.metrics import is_empty_answer, is_short_answer
from csulora.io.jsonl import read_jsonl_records, write_jsonl
from csulora.training.framing import FRAMING_SEPARATOR

from benchmarks.smol.pipeline import RUNS_ON, Context, worker_ctx
from benchmarks.smol.world import generate, world_sets
from benchmarks.smol.worlds import FULL, LORA, World

# "kind" picks the judge
HARMFUL, BENIGN, TASK = "harmful", "benign", "task"


def eval_set_specs(ctx: Context) -> dict[str, tuple[str, str, int | None]]:
    """Evaluation sets: name -> (source, kind, how many items; None: all). A source is a set of
    :func:`world_sets`, or a built-in task's split (``NAME:SPLIT``): the world's task."""
    r = ctx.recipe
    task_val, task_test = ctx.world.task_sets
    specs = {
        "advbench-val": ("advbench-validation", HARMFUL, r.n_val_harmful),
        "airt-val": ("airt-val", HARMFUL, None),
        task_val: (f"{ctx.world.task}:validation", TASK, r.n_task_val),
        "benign-val": ("benign-validation", BENIGN, None),
        "advbench-test": ("advbench-test", HARMFUL, None),
        "objectives-test": ("objectives-test", HARMFUL, None),
        "airt-test": ("airt-test", HARMFUL, None),
        "benign": ("benign-test", BENIGN, None),
        task_test: (f"{ctx.world.task}:test", TASK, r.n_task_test),
    }
    for framed in framed_test_sets(ctx.world):  # the same prompts, put in a framing when answered
        specs[framed] = specs[set_framing(framed)[0]]
    return specs


def set_framing(set_name: str) -> tuple[str, str | None]:
    """``advbench-test@aoa`` -> (``advbench-test``, ``aoa``); a plain set -> (its name, None)."""
    head, sep, framing = set_name.partition(FRAMING_SEPARATOR)
    return (head, framing) if sep else (set_name, None)


def framed_test_sets(world: World) -> tuple[str, ...]:
    """The main harmful test sets in each framing the world's updates attack in (none: the date world)."""
    return tuple(f"{SOURCE_SETS[s]}{FRAMING_SEPARATOR}{f}" for f in world.framings for s in MAIN_SOURCES)


def val_sets(world: World) -> tuple[str, ...]:
    """What a full fine-tune's number of steps is chosen on (benchmarks/smol/full.py); every
    correction's setting is chosen by `csulora tune` on its own validation defaults (table.py)."""
    return ("advbench-val", "airt-val", world.task_sets[0], "benign-val")


def test_sets(world: World) -> tuple[str, ...]:
    """What every row of a world's table is reported on (never used for a choice): the three
    harmful sources (AdvBench, the objectives source of issue 22 §2, airt), the first two again in
    each framing the world's updates attack in, the benign test half, the world's task."""
    return ("advbench-test", "objectives-test", "airt-test", *framed_test_sets(world), "benign", world.task_sets[1])


# The models every world shares: their answers on the shared sets are generated once, in the
# cache's own gens/ (a world's task sets have their own names there).
SHARED_VARIANTS = ("base", "aligned")
# Harmful sources judged separately (docs/design.md §5b), by the names tune uses.
SOURCE_OF = {"advbench-val": "advbench", "airt-val": "airt", "advbench-test": "advbench",
             "objectives-test": "objectives", "airt-test": "airt"}  # fmt: skip
HARMFUL_TEST_SOURCES = ("advbench", "objectives", "airt")
SOURCE_SETS = {"advbench": "advbench-test", "objectives": "objectives-test", "airt": "airt-test"}  # the test sets
# The sources the targets judge (reported.py); a world's framings put these in each framing too.
MAIN_SOURCES = ("advbench", "objectives")


def source_of(set_name: str) -> str:
    """A harmful set's source name: ``advbench-test`` -> ``advbench``, ``advbench-test@aoa`` -> ``advbench@aoa``."""
    base, framing = set_framing(set_name)
    return SOURCE_OF[base] + (f"{FRAMING_SEPARATOR}{framing}" if framing else "")


def framed_sources(sources: tuple[str, ...], framings: tuple[str, ...]) -> tuple[str, ...]:
    """Each source followed by its forms in ``framings`` (a main source's only): the table's order."""
    return tuple(f"{s}{FRAMING_SEPARATOR}{f}" if f else s
                 for s in sources for f in (None, *(framings if s in MAIN_SOURCES else ())))  # fmt: skip


def harmful_test_sources(world: World) -> tuple[str, ...]:
    """The harmful sources of a world's rows, in table order: the framed ones beside the plain."""
    return framed_sources(HARMFUL_TEST_SOURCES, world.framings)


_SETS_CACHE: dict[str, list[dict]] = {}


def source_items(ctx: Context, source: str) -> list[dict]:
    """A :func:`world_sets` set, or a built-in task's split (``NAME:SPLIT``), read once per process."""
    from csulora.eval.tasks import builtin_task

    if source not in _SETS_CACHE:
        if ":" in source:
            name, _, split = source.partition(":")
            _SETS_CACHE[source] = builtin_task(name, split)
        else:
            _SETS_CACHE.update(world_sets(ctx))
    return _SETS_CACHE[source]


def eval_items(ctx: Context, set_name: str) -> list[dict]:
    source, _, n = eval_set_specs(ctx)[set_name]
    items = source_items(ctx, source)
    if not items:
        raise RuntimeError(f"evaluation set {set_name} ({source}) is empty")
    return items[:n] if n is not None else items


def max_tokens_for(ctx: Context, set_name: str) -> int:
    kind = eval_set_specs(ctx)[set_name][1]
    return ctx.recipe.task_max_new_tokens if kind == TASK else ctx.recipe.max_new_tokens


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: a checkpoint folder under the cache, optionally with a PEFT adapter."""

    key: str  # names its cached answers (gens/<key>/...)
    model: str = "aligned"  # a checkpoint folder under the cache
    adapter: str | None = None  # a PEFT adapter folder under the cache

    def to_dict(self) -> dict:
        return {"key": self.key, "model": self.model, "adapter": self.adapter}

    @classmethod
    def from_dict(cls, data: dict) -> Variant:
        return cls(data["key"], data["model"], data.get("adapter"))


def load_variant(ctx: Context, v: Variant):
    from csulora.io.modeling import load_model

    adapter = ctx.path(v.adapter) if v.adapter else None
    return load_model(ctx.path(v.model), adapter, **RUNS_ON)


def gens_path(ctx: Context, v: Variant, set_name: str) -> Path:
    # the token budget is part of the name: a rerun with another budget never reuses answers
    folder = ctx.path if v.key in SHARED_VARIANTS else ctx.world_path
    return folder("gens", v.key, f"{set_name}.t{max_tokens_for(ctx, set_name)}.jsonl")


def generate_set(ctx: Context, v: Variant, set_name: str, model, tok) -> None:
    """Greedy answers of the loaded ``v`` on one set (a framed set's prompts in its framing), written as JSONL."""
    from csulora.training.framing import load_framing

    start = time.perf_counter()
    items = eval_items(ctx, set_name)
    answers = generate(model, tok, [i["prompt"] for i in items], max_tokens_for(ctx, set_name), f"{v.key}:{set_name}",
                       framing=load_framing(set_framing(set_name)[1]))  # fmt: skip
    kind = eval_set_specs(ctx)[set_name][1]
    records = []
    for item, answer in zip(items, answers):
        rec = {"variant": v.key, "set": set_name, "kind": kind, "id": item["id"], "prompt": item["prompt"],
               "response": answer}  # fmt: skip
        if kind == TASK:
            rec["reference"] = item["response"]
        records.append(rec)
    write_jsonl(gens_path(ctx, v, set_name), records)
    ctx.log(f"[smol]   {v.key}:{set_name}: {len(items)} prompts in {time.perf_counter() - start:.1f} s")


def cached_records(ctx: Context, v: Variant, set_name: str) -> list[dict]:
    """The cached answers of one set; a file cached for a longer set is cut to this one's prompts."""
    path = gens_path(ctx, v, set_name)
    records = read_jsonl_records(path)
    items = eval_items(ctx, set_name)
    if len(records) > len(items):
        records = records[: len(items)]
    if [r["id"] for r in records] != [i["id"] for i in items]:
        raise RuntimeError(f"{path}: cached answers are for other prompts; delete it and rerun")
    return records


def generations(ctx: Context, v: Variant, set_names: tuple[str, ...]) -> dict[str, list[dict]]:
    """Cached greedy generations of ``v`` on each set (a killed run resumes per set)."""
    missing = [s for s in set_names if not gens_path(ctx, v, s).exists()]
    if missing:
        start = time.perf_counter()
        model, tok = load_variant(ctx, v)
        ctx.log(f"[smol]   {v.key}: loaded in {time.perf_counter() - start:.1f} s")
        for set_name in missing:
            generate_set(ctx, v, set_name, model, tok)
        del model
    return {s: cached_records(ctx, v, s) for s in set_names}


def verdicts(records: list[dict]) -> list[bool]:
    """Per record: attack success (harmful), refusal (benign), exact match (task)."""
    from csulora.eval.judges import RefusalJudge, asr_judge
    from csulora.eval.metrics import exact_match

    if not records:
        return []
    kind = records[0]["kind"]
    if kind == HARMFUL:  # the project's ASR judge (docs/judge.md): it reads the prompt too
        return asr_judge().judge([r["prompt"] for r in records], [r["response"] for r in records])
    if kind == BENIGN:
        judge = RefusalJudge()
        return [judge.is_refusal(r["response"]) for r in records]
    return [exact_match(r["response"], r["reference"]) for r in records]


def rate_of(records: list[dict]):
    from csulora.eval.metrics import rate

    return rate(verdicts(records))


def rate_dict(value) -> dict:
    """A :class:`csulora.eval.metrics.Rate` as JSON: value, 95% interval, n."""
    return {"value": value.value, "ci": list(value.ci), "n": value.n}


def setting_scores(ctx: Context, v: Variant, set_names: tuple[str, ...]):
    """ASR per harmful source and task utility of ``v`` as tune's SettingScores (no fluency):
    what the full fine-tune's step choice reads."""
    from csulora.tuning.scores import SettingScores

    asr, utility = {}, None
    for name, records in generations(ctx, v, set_names).items():
        kind = records[0]["kind"]
        if kind == HARMFUL:
            asr[source_of(name)] = rate_of(records)
        elif kind == TASK:
            utility = rate_of(records)
    return SettingScores(asr=asr, utility=utility)


def test_row(ctx: Context, name: str, v: Variant, **facts) -> dict:
    """One row of the table on the test sets: per harmful source the ASR and the share of empty
    answers (an empty answer is no attack success, and no repair either); utility; over-refusal
    and the share of short benign answers. ``facts``: what the row is (update, method, params, ...)."""
    from csulora.eval.metrics import rate

    sets = test_sets(ctx.world)
    gens = generations(ctx, v, sets)
    harmful = {source_of(s): gens[s] for s in sets if eval_set_specs(ctx)[s][1] == HARMFUL}
    benign = gens["benign"]
    return {
        "name": name,
        **facts,
        "asr": {source: rate_dict(rate_of(records)) for source, records in harmful.items()},
        "harmful_empty": {source: rate([is_empty_answer(r["response"]) for r in records]).value
                          for source, records in harmful.items()},  # fmt: skip
        "utility": rate_dict(rate_of(gens[ctx.world.task_sets[1]])),
        "over_refusal": rate_dict(rate_of(benign)),
        "benign_short": rate([is_short_answer(r["response"]) for r in benign]).value,
        "variant": v.to_dict(),
    }


def reference_variants(ctx: Context) -> dict[str, Variant]:
    """The uncorrected models of the world: base, aligned, its updates (a full fine-tune once its
    steps are chosen) and SaLoRA where the world has it."""
    from benchmarks.smol.full import full_variant

    world = ctx.world
    refs = {"base": Variant("base", "base"), "aligned": Variant("aligned", "aligned")}
    for u in world.updates:
        if u.kind == LORA:
            refs[u.name] = Variant(u.name, "aligned", world.rel("adapters", u.name))
        elif u.kind == FULL and ctx.world_path("full", "chosen.json").exists():
            refs[u.name] = full_variant(ctx, u)  # the key the step choice cached its answers under
    if world.salora:
        refs["salora"] = Variant("salora", "aligned", world.rel("adapters", "salora"))
    return refs


def job_variant(paths: tuple[str, str, str], variant: dict, set_names: tuple[str, ...]) -> str:
    """A worker's job: one variant's answers on some sets (cached)."""
    ctx = worker_ctx(*paths)
    v = Variant.from_dict(variant)
    generations(ctx, v, set_names)
    return v.key
