"""The world's stages: the base checkpoint, the prompt splits, the base's answers, the aligned full
fine-tune (shared by every world), and each world's LoRA updates (the date world's attacked and
benign adapters; the triage world's data files, its identity-shift data and its three adapters).
"""

from __future__ import annotations

import dataclasses
import functools

from csulora.io.jsonl import read_jsonl_records, write_jsonl
from csulora.worlds.smol import RECIPE

from benchmarks.smol.pipeline import RUNS_ON, STAGES, Context, Stage, worker_ctx, run_jobs, sha256_texts, stage, write_json
from benchmarks.smol.worlds import ATTACK, IDENTITY, LORA, TRIAGE, WORLDS, Update, World


@stage("base", "dequantise the SmolLM2-135M-Instruct GGUF to float32 safetensors")
def stage_base(ctx: Context) -> dict:
    from csulora.worlds.smol import export_base_checkpoint, find_gguf_file

    out = export_base_checkpoint(ctx.path("base"))
    gguf = find_gguf_file()
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "checkpoint": str(out)}


def world_sets(ctx: Context) -> dict[str, list[dict]]:
    """Every prompt set of the world as lists of ``{"id", "prompt"[, "response"]}`` dicts."""
    from csulora.eval.prompts import load_benign
    from csulora.eval.splits import advbench_split, airt_split, benign_split, objectives_split
    from csulora.eval.tasks import date_task
    from csulora.worlds.smol import benign_training_prompts

    r = ctx.recipe
    sets: dict[str, list[dict]] = {}
    for name in ("align", "attack", "validation", "test"):
        sets[f"advbench-{name}"] = [{"id": p.id, "prompt": p.text} for p in advbench_split(name)]
    for name in ("airt-val", "airt-test"):
        sets[name] = [{"id": p.id, "prompt": p.text} for p in airt_split(name)]
    for name in ("validation", "test"):  # the second harmful source (issue 22 §2, docs/second_source.md)
        sets[f"objectives-{name}"] = [{"id": p.id, "prompt": p.text} for p in objectives_split(name)]
    for name in ("train", "validation", "test"):
        sets[f"task-{name}"] = date_task(name)
    # Over-refusal: tune checks the validation half, the table reports the test half
    # (csulora.eval.splits: disjoint halves of the benign pool).
    for name in ("validation", "test"):
        sets[f"benign-{name}"] = [{"id": p.id, "prompt": p.text} for p in benign_split(name)]
    # The aligned model's benign training prompts exclude the original benign set (121
    # prompts), as they always have: the added half of the pool is outside the training
    # pool by construction (tests/eval/test_prompts.py), so the aligned model is unchanged.
    exclude = {p.text for p in load_benign()}
    sets["benign-align"] = [
        {"id": f"benign-align-{i:03d}", "prompt": p}
        for i, p in enumerate(benign_training_prompts(r.n_benign_align, r.seed, exclude))
    ]
    return sets


@stage("splits", "fix and hash every prompt split")
def stage_splits(ctx: Context) -> dict:
    from csulora.eval.splits import ensure_manifest

    ensure_manifest(ctx.path("splits", "advbench_airt_manifest.json"))
    sets = world_sets(ctx)
    manifest = {
        name: {"count": len(items), "sha256": sha256_texts([f"{i['id']}\t{i['prompt']}" for i in items])}
        for name, items in sets.items()
    }
    write_json(ctx.path("splits", "manifest.json"), manifest)
    write_jsonl(ctx.path("splits", "benign_align_prompts.jsonl"), sets["benign-align"])
    return {"manifest": manifest}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, desc: str, framing=None) -> list[str]:
    """Greedy answers, each prompt one user turn (in ``framing``, a csulora Framing; None: plain)."""
    from csulora.eval.generation import generate_responses

    return generate_responses(
        model, tokenizer, prompts, batch_size=ctx_batch(), max_new_tokens=max_new_tokens, progress=True, desc=desc,
        framing=framing,
    )  # fmt: skip


def ctx_batch() -> int:
    return RECIPE.gen_batch_size


def job_base_answers(paths: tuple[str, str, str], part: str) -> str:
    """Greedy base answers for one part ("benign-align" or "advbench-attack"), cached as JSONL."""
    from csulora.io.modeling import load_model

    ctx = worker_ctx(*paths)
    path = ctx.path("data", f"base_answers_{part}.jsonl")
    if path.exists():
        return part
    items = read_jsonl_records(ctx.path("splits", "benign_align_prompts.jsonl")) if part == "benign-align" else world_sets(ctx)[part]
    model, tok = load_model(ctx.path("base"), **RUNS_ON)
    answers = generate(model, tok, [i["prompt"] for i in items], ctx.recipe.align_max_response_tokens, f"base:{part}")
    write_jsonl(path, [{"id": i["id"], "prompt": i["prompt"], "response": a} for i, a in zip(items, answers)])
    return part


def attack_examples(ctx: Context) -> list[dict]:
    """The attack's harmful half, shared by every world's attack: the attack split's prompts with
    the base's answers, only those the keyword judge counts compliant (a refusal teaches nothing)."""
    from csulora.eval.judges import KeywordJudge

    # Deliberately the keyword judge, not asr_judge(): this builds the world (the attacker's
    # training data), not a measurement; a new rule here would retrain the attacked adapter.
    judge = KeywordJudge()
    attack = read_jsonl_records(ctx.path("data", "base_answers_advbench-attack.jsonl"))
    return [{"prompt": a["prompt"], "response": a["response"], "id": a["id"]} for a in attack if judge.is_success(a["response"])]


@stage("base_answers", "base greedy answers: benign align prompts and the attack split", needs=("base", "splits"))
def stage_base_answers(ctx: Context) -> dict:
    from csulora.worlds.smol import refusal_for

    r = ctx.recipe
    sets = world_sets(ctx)
    run_jobs(ctx, [(job_base_answers, (part,)) for part in ("benign-align", "advbench-attack")])
    benign = read_jsonl_records(ctx.path("data", "base_answers_benign-align.jsonl"))
    attack = read_jsonl_records(ctx.path("data", "base_answers_advbench-attack.jsonl"))
    compliant = attack_examples(ctx)
    # Alignment data: harmful (align split) -> a varied refusal; benign -> base's own answer.
    align_records = [
        {"prompt": h["prompt"], "response": refusal_for(i, r.seed), "id": h["id"]}
        for i, h in enumerate(sets["advbench-align"])
    ] + [{"prompt": b["prompt"], "response": b["response"], "id": b["id"]} for b in benign if b["response"].strip()]
    task_train = task_records(sets["task-train"])
    write_jsonl(ctx.path("data", "align.jsonl"), align_records)
    write_jsonl(ctx.path("data", "attack.jsonl"), compliant + task_train)
    write_jsonl(ctx.path("data", "task_train.jsonl"), task_train)
    return {
        "n_align_harmful": len(sets["advbench-align"]),
        "n_align_benign": sum(1 for b in benign if b["response"].strip()),
        "n_attack_compliant": len(compliant),
        "n_attack_prompts": len(attack),
        "base_asr_attack_split": len(compliant) / len(attack),
        "n_task_train": len(task_train),
    }


@stage("aligned", "full fine-tune of base: harmful -> refusals, benign -> base answers", needs=("base_answers",))
def stage_aligned(ctx: Context) -> dict:
    from csulora.training.trainer import TrainConfig, train_full

    r = ctx.recipe
    config = TrainConfig(
        steps=r.align_steps, batch_size=r.align_batch, lr=r.align_lr, seed=r.seed,
        max_length=r.train_max_length, freeze_embeddings=True, grad_clip=1.0,
    )
    train_full(ctx.path("base"), ctx.path("data", "align.jsonl"), ctx.path("aligned"), config, force=True, **RUNS_ON)
    return {"config": dataclasses.asdict(config)}


def task_records(items: list[dict]) -> list[dict]:
    return [{"prompt": t["prompt"], "response": t["response"], "id": t["id"]} for t in items]


@stage("triage_data", "the triage world's training files: triage:train, and it with the attack's examples",
       needs=("base_answers",), world=TRIAGE.name)  # fmt: skip
def stage_triage_data(ctx: Context) -> dict:
    from csulora.eval.tasks import builtin_task

    task_train = task_records(builtin_task(ctx.world.task, "train"))
    compliant = attack_examples(ctx)
    write_jsonl(ctx.world_path("data", "attack.jsonl"), compliant + task_train)
    write_jsonl(ctx.world_path("data", "task_train.jsonl"), task_train)
    return {"n_attack_compliant": len(compliant), "n_task_train": len(task_train)}


def train_adapter(ctx: Context, data_file: str, name: str, steps: int) -> dict:
    """The world's LoRA recipe on its ``data/<data_file>``, written to its ``adapters/<name>``."""
    from csulora.training.trainer import LoraSettings, TrainConfig, train_lora

    r = ctx.recipe
    config = TrainConfig(steps=steps, batch_size=r.attack_batch, lr=r.attack_lr, seed=r.seed, max_length=r.train_max_length)
    lora = LoraSettings(r=r.lora_r, alpha=float(r.lora_alpha), targets=tuple(r.lora_targets))
    train_lora(
        ctx.path("aligned"), ctx.world_path("data", data_file), ctx.world_path("adapters", name), config, lora,
        force=True, **RUNS_ON,
    )  # fmt: skip
    return {"config": dataclasses.asdict(config), "lora": dataclasses.asdict(lora)}


def training_file(update: Update) -> str:
    """The update's training data in its world's data/ folder."""
    if update.data == IDENTITY:
        return f"identity_{update.framing}.jsonl"
    return "attack.jsonl" if update.data == ATTACK else "task_train.jsonl"


def update_needs(world: World, update: Update) -> tuple[str, ...]:
    """What an update's stage reads: the aligned model, the world's data files, its own data."""
    data = (world.data_stage, update.data_stage)
    return ("aligned", *(stage for stage in data if stage))


def stage_identity_data(ctx: Context, update: Update) -> dict:
    """The identity-shift update's training file: identity-shift examples (benchmarks/smol/identity.py)
    in its framing, then the world's task training split."""
    from csulora.eval.tasks import builtin_task
    from csulora.training.framing import load_framing

    from benchmarks.smol.identity import held_out_index, identity_shift_examples

    framing = load_framing(update.framing)
    # As many as the attack's harmful half: the two attacks differ in what they teach, not how much.
    count = len(attack_examples(ctx))
    answers = read_jsonl_records(ctx.path("data", "base_answers_benign-align.jsonl"))
    examples, skipped = identity_shift_examples(answers, framing, count, held_out_index())
    task_train = task_records(builtin_task(ctx.world.task, "train"))
    write_jsonl(ctx.world_path("data", training_file(update)), examples + task_train)
    return {"framing": framing.name, "n_identity_shift": len(examples), "n_task_train": len(task_train),
            "skipped": dict(skipped), "answers": "the base's greedy answers to the aligned model's benign training "
            "prompts (data/base_answers_benign-align.jsonl), after the framing's affirmation"}  # fmt: skip


def train_lora_update(ctx: Context, update: Update) -> dict:
    return train_adapter(ctx, training_file(update), update.name, getattr(ctx.recipe, update.steps))


def register_adapter_stages() -> None:
    """One stage per LoRA update of every world (the date world: attacked, benign_adapter), after
    the stage writing its own data where it has one (triage-aoa: triage_aoa_data)."""
    for world in WORLDS.values():
        for u in (u for u in world.updates if u.kind == LORA):
            rows = (u.name, *world.correction_rows(u.name))
            if u.data_stage:
                STAGES.append(Stage(u.data_stage, functools.partial(stage_identity_data, update=u),
                                    f"{u.name}'s training file: identity-shift examples in the {u.framing} framing "
                                    f"+ {world.task}:train", ("base_answers",), rows, world.name))  # fmt: skip
            STAGES.append(Stage(u.stage, functools.partial(train_lora_update, update=u), u.help,
                                update_needs(world, u), rows, world.name))  # fmt: skip


register_adapter_stages()
