"""Evaluation: the sets, the variants (checkpoint + adapter [+ dense RESTA]), cached greedy
generations, verdicts, scores, the refusal margin and one row of the test table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from csulora.eval.metrics import benign_short_answer_rate, harmful_empty_rate
from csulora.io.jsonl import read_jsonl_records, write_jsonl

from benchmarks.smol.pipeline import RUNS_ON, Context, worker_ctx, write_json
from benchmarks.smol.world import generate, world_sets

# Evaluation sets: name -> (world set, kind, how many items). "kind" picks the judge.
HARMFUL, BENIGN, TASK = "harmful", "benign", "task"


def eval_set_specs(ctx: Context) -> dict[str, tuple[str, str, int | None]]:
    r = ctx.recipe
    return {
        "advbench-val": ("advbench-validation", HARMFUL, r.n_val_harmful),
        "airt-val": ("airt-val", HARMFUL, None),
        "task-val": ("task-validation", TASK, r.n_task_val),
        "benign-val": ("benign-validation", BENIGN, None),
        "advbench-test": ("advbench-test", HARMFUL, None),
        "airt-test": ("airt-test", HARMFUL, None),
        "benign": ("benign-test", BENIGN, None),
        "task-test": ("task-test", TASK, r.n_task_test),
    }


# Validation: what tune scores a setting on (docs/design.md §10): both harmful sources, the
# task, and the benign validation half (over-refusal, short answers, fluency).
VAL_SETS = ("advbench-val", "airt-val", "task-val", "benign-val")


TEST_SETS = ("advbench-test", "airt-test", "benign", "task-test")


# Harmful sources judged separately (docs/design.md §5b); the names tune uses.
SOURCE_OF = {"advbench-val": "advbench", "airt-val": "airt", "advbench-test": "advbench", "airt-test": "airt"}


_WORLD_SETS_CACHE: dict[str, list[dict]] = {}


def eval_items(ctx: Context, set_name: str) -> list[dict]:
    if not _WORLD_SETS_CACHE:
        _WORLD_SETS_CACHE.update(world_sets(ctx))
    source, _, n = eval_set_specs(ctx)[set_name]
    items = _WORLD_SETS_CACHE[source]
    if not items:
        raise RuntimeError(f"evaluation set {set_name} ({source}) is empty")
    return items[:n] if n is not None else items


def max_tokens_for(ctx: Context, set_name: str) -> int:
    kind = eval_set_specs(ctx)[set_name][1]
    return ctx.recipe.task_max_new_tokens if kind == TASK else ctx.recipe.max_new_tokens


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: a checkpoint, optionally a PEFT adapter, optionally dense RESTA.

    ``dense_restore``: add ``beta * (W_aligned - W_base)`` to every weight after merging the
    adapter (full-rank RESTA, i.e. task arithmetic on the whole checkpoint).
    ``correction``: a full fine-tune's correction applied in memory (benchmarks/smol/full.py).
    """

    key: str
    model: str = "aligned"  # "base" or "aligned" (a folder under the cache)
    adapter: str | None = None  # a folder under the cache
    dense_restore: float | None = None
    correction: str | None = None  # key of a registered full fine-tune correction


def load_variant(ctx: Context, v: Variant):
    from csulora.io.modeling import load_model

    adapter = ctx.path(v.adapter) if v.adapter else None
    model, tok = load_model(ctx.path(v.model), adapter, **RUNS_ON)
    if v.dense_restore:
        add_dense_displacement(ctx, model, v.dense_restore)
    if v.correction:
        from benchmarks.smol.full import apply_full_correction

        apply_full_correction(ctx, model, v)
    return model, tok


@torch.no_grad()
def add_dense_displacement(ctx: Context, model, beta: float) -> None:
    """W += beta * (W_aligned - W_base) for every tensor of the checkpoint (task arithmetic)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(ctx.path("base", "model.safetensors")), "pt") as base, safe_open(
        str(ctx.path("aligned", "model.safetensors")), "pt"
    ) as aligned:
        for name in aligned.keys():
            if name in params:
                delta = aligned.get_tensor(name).float() - base.get_tensor(name).float()
                params[name].add_(delta.to(params[name].device, params[name].dtype), alpha=beta)


def gens_path(ctx: Context, v: Variant, set_name: str) -> Path:
    # the token budget is part of the name: a rerun with another budget never reuses answers
    return ctx.path("gens", v.key, f"{set_name}.t{max_tokens_for(ctx, set_name)}.jsonl")


def generations(ctx: Context, v: Variant, set_names: tuple[str, ...], loaded: tuple | None = None) -> dict[str, list[dict]]:
    """Cached greedy generations of ``v`` on each set (a killed run resumes per set)."""
    out: dict[str, list[dict]] = {}
    missing = [s for s in set_names if not gens_path(ctx, v, s).exists()]
    model, tok = loaded if loaded is not None else (None, None)
    if missing and model is None:
        start = time.perf_counter()
        model, tok = load_variant(ctx, v)
        ctx.log(f"[smol]   {v.key}: loaded in {time.perf_counter() - start:.1f} s")
    for set_name in set_names:
        path = gens_path(ctx, v, set_name)
        if not path.exists():
            start = time.perf_counter()
            items = eval_items(ctx, set_name)
            answers = generate(model, tok, [i["prompt"] for i in items], max_tokens_for(ctx, set_name), f"{v.key}:{set_name}")
            kind = eval_set_specs(ctx)[set_name][1]
            records = []
            for item, answer in zip(items, answers):
                rec = {"variant": v.key, "set": set_name, "kind": kind, "id": item["id"], "prompt": item["prompt"], "response": answer}
                if kind == TASK:
                    rec["reference"] = item["response"]
                records.append(rec)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, records)
            ctx.log(f"[smol]   {v.key}:{set_name}: {len(items)} prompts in {time.perf_counter() - start:.1f} s")
        records = read_jsonl_records(path)
        n_items = len(eval_items(ctx, set_name))
        if len(records) > n_items:  # cached with a larger set: its prefix is the same prompts
            records = records[:n_items]
            if [r["id"] for r in records] != [i["id"] for i in eval_items(ctx, set_name)]:
                raise RuntimeError(f"{path}: cached answers are for other prompts; delete it and rerun")
        out[set_name] = records
    del model
    return out


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


def setting_scores(ctx: Context, v: Variant, set_names: tuple[str, ...]):
    """tune's SettingScores for ``v``, measured as `csulora tune` measures them.

    ASR and the share of empty answers per harmful source, task utility, and on the benign
    set over-refusal, the share of empty/short answers and their fluency under the aligned
    model (:func:`benign_fluency`), so :func:`csulora.tuning.selection.select_setting`
    judges every condition of tune's rule.
    """
    from csulora.eval.metrics import is_empty_answer, is_short_answer, rate
    from csulora.tuning.scores import SettingScores

    gens = generations(ctx, v, set_names)
    asr, empty, utility, over, short, fluency = {}, {}, None, None, None, None
    for name, records in gens.items():
        kind = records[0]["kind"]
        if kind == HARMFUL:
            asr[SOURCE_OF[name]] = rate_of(records)
            empty[SOURCE_OF[name]] = rate([is_empty_answer(r["response"]) for r in records])
        elif kind == TASK:
            utility = rate_of(records)
        else:
            over = rate_of(records)
            short = rate([is_short_answer(r["response"]) for r in records])
            fluency = benign_fluency(ctx, v, name, records)
    return SettingScores(
        asr=asr, utility=utility, over_refusal=over, harmful_empty=empty, benign_short=short, benign_fluency=fluency
    )


_ALIGNED_SCORER: dict[str, tuple] = {}


def benign_fluency(ctx: Context, v: Variant, set_name: str, records: list[dict]) -> float | None:
    """The aligned model's mean per-token log-likelihood of ``v``'s non-empty benign answers (cached).

    tune's fluency guard (csulora.tuning.scoring.aligned_fluency): a correction that makes
    the model answer in words the aligned model finds unlikely is broken, not safe.
    """
    from csulora.eval.margin import mean_response_logprob
    from csulora.eval.metrics import is_empty_answer

    path = ctx.path("fluency", v.key, f"{set_name}.t{max_tokens_for(ctx, set_name)}.json")
    if path.exists():
        return json.loads(path.read_text())["fluency"]
    items = [{"prompt": r["prompt"], "response": r["response"]} for r in records if not is_empty_answer(r["response"])]
    value = None
    if items:
        if "aligned" not in _ALIGNED_SCORER:
            from csulora.io.modeling import load_model

            _ALIGNED_SCORER["aligned"] = load_model(ctx.path("aligned"), **RUNS_ON)
        model, tok = _ALIGNED_SCORER["aligned"]
        value = float(mean_response_logprob(model, tok, items))
    write_json(path, {"fluency": value, "n": len(items)})
    return value


def reference_variants() -> dict[str, Variant]:
    return {
        "base": Variant("base", "base"),
        "aligned": Variant("aligned", "aligned"),
        "attacked": Variant("attacked", "aligned", "adapters/attacked"),
        "benign": Variant("benign", "aligned", "adapters/benign"),
    }


def variant_from_key(ctx: Context, key: str) -> Variant:
    refs = reference_variants()
    if key in refs:
        return refs[key]
    if "__resta-full_restore=" in key:
        adapter, value = key.split("__resta-full_restore=")
        return Variant(key, "aligned", f"adapters/{adapter}", dense_restore=float(value))
    if key.startswith("salora"):
        return Variant(key, "aligned", f"adapters/{key}")
    if key.startswith("full-attacked"):
        from benchmarks.smol.full import full_variant_from_key

        return full_variant_from_key(ctx, key)
    return Variant(key, "aligned", f"adapters/{key}")


def test_row(ctx: Context, name: str, spec: dict, margin_from_cache_only: bool = False) -> dict:
    """The docs/design.md §10 row of one model on the test sets."""
    v = variant_from_key(ctx, spec["variant"])
    margin_file = ctx.path("margins", f"{v.key}.json")
    gens = generations(ctx, v, TEST_SETS)
    asr, ood = rate_of(gens["advbench-test"]), rate_of(gens["airt-test"])
    util, over = rate_of(gens["task-test"]), rate_of(gens["benign"])
    return {
        "name": name,
        "asr": asr.value, "asr_ci": list(asr.ci), "asr_n": asr.n,
        "asr_ood": ood.value, "asr_ood_ci": list(ood.ci), "asr_ood_n": ood.n,
        "utility": util.value, "utility_ci": list(util.ci), "utility_n": util.n,
        "over_refusal": over.value, "over_refusal_ci": list(over.ci), "over_refusal_n": over.n,
        # Beside the ASRs and the over-refusal: a correction that breaks generation looks "safe"
        # to the ASR judge (an empty answer is no attack success) and not over-refusing.
        # The empty share here pools both harmful test sources.
        "benign_short_answer_rate": benign_short_answer_rate([r["response"] for r in gens["benign"]]),
        "harmful_empty_rate": harmful_empty_rate([r["response"] for r in gens["advbench-test"] + gens["airt-test"]]),
        "margin": (json.loads(margin_file.read_text())["margin"] if margin_file.exists() else None)
        if margin_from_cache_only else refusal_margin(ctx, v),
        "params": spec.get("params", {}),
        "recommended": bool(spec.get("recommended", False)),
        "variant": v.key,
    }


def refusal_margin(ctx: Context, v: Variant, loaded: tuple | None = None) -> float | None:
    """csulora.eval.margin's refusal margin on the first AdvBench test prompts (cached).

    ``loaded``: the (model, tokenizer) of ``v`` when the caller already has it in memory."""
    path = ctx.path("margins", f"{v.key}.json")
    if path.exists():
        return json.loads(path.read_text())["margin"]
    try:
        from csulora.eval.margin import refusal_margin as margin_fn
    except ImportError:
        return None
    model, tok = loaded if loaded is not None else load_variant(ctx, v)
    prompts = [i["prompt"] for i in eval_items(ctx, "advbench-test")][: ctx.recipe.n_margin_prompts]
    value = margin_fn(model, tok, prompts)
    value = float(getattr(value, "value", getattr(value, "mean", value)))
    write_json(path, {"margin": value})
    return value


def job_variant(paths: tuple[str, str, str], key: str, set_names: tuple[str, ...]) -> str:
    ctx = worker_ctx(*paths)
    v = variant_from_key(ctx, key)
    if set_names == TEST_SETS and not ctx.path("margins", f"{v.key}.json").exists():
        model, tok = load_variant(ctx, v)
        refusal_margin(ctx, v, loaded=(model, tok))
        generations(ctx, v, set_names, loaded=(model, tok))
        return key
    generations(ctx, v, set_names)
    return key
