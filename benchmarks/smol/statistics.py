"""The activation statistics the corrections read, each written by `csulora calibrate`.

- ``calibration`` (per world; the triage world's ``triage_calibration``): ``csulora calibrate
  ALIGNED --task TASK`` with the world's training task (the date world: data/task_train.jsonl;
  the triage world: ``triage:train``) and the default harmful prompts (AdvBench ``align`` + the
  shipped requests): the aligned model's statistics, read by the calibrated method and Safe
  Delta on every update of that world.
- ``realign_answers``: the base model's greedy answers to those same harmful prompts, the
  compliant ones kept (the ASR judge): Antidote's "realignment" data, harmful prompts with
  harmful answers (docs/peers.md), made from what the world already has.
  Shared by every world (they do not depend on the task).
- ``update_statistics`` (per world): ``csulora calibrate ALIGNED --update UPDATE --pairs
  data/realign.jsonl`` for each of the world's updates: the **fine-tuned** model's statistics on
  those pairs, which Antidote reads.
"""

from __future__ import annotations

import time

from csulora.io.jsonl import write_jsonl

from benchmarks.smol.pipeline import RUNS_ON, Context, stage, world_stage
from benchmarks.smol.worlds import FULL, WORLDS, World

CALIBRATION_FILE = ("calibration", "calibration.safetensors")  # in the world's folder
REALIGN_FILE = ("data", "realign.jsonl")  # shared


def calibration_file(ctx: Context):
    return ctx.world_path(*CALIBRATION_FILE)


def update_statistics_file(ctx: Context, update: str):
    return ctx.world_path("statistics", f"{update}.safetensors")


def update_folder(ctx: Context, update: str):
    """The update's folder: an adapter, or the chosen full fine-tune."""
    from benchmarks.smol.full import full_dir

    if ctx.world.update(update).kind == FULL:
        return ctx.path(full_dir(ctx))
    return ctx.world_path("adapters", update)


def calibration_task(ctx: Context) -> str:
    """calibrate's --task: the world's named training split, else its training file."""
    return ctx.world.calibrate_task or str(ctx.world_path("data", "task_train.jsonl"))


@world_stage("calibration", "csulora calibrate: the aligned model's input statistics on harmful prompts and the task",
             needs=lambda w: ("base_answers", "aligned"), for_rows=lambda w: w.corrections)
def stage_calibration(ctx: Context) -> dict:
    from csulora.references.calibration import calibrate

    start = time.perf_counter()
    result = calibrate(
        ctx.path("aligned"), calibration_file(ctx), task=calibration_task(ctx), force=True, progress=False, **RUNS_ON,
    )  # fmt: skip
    # "seconds" is the stage runner's own key (the stage's wall time)
    return {
        "calibrate_total_s": round(time.perf_counter() - start, 1),
        "calibrate_seconds": result.seconds,
        "harmful_tokens": result.harmful_tokens,
        "task_tokens": result.task_tokens,
        "groups": len(result.groups),
        "modules": len(result.modules),
        "passes": result.passes,
    }


# realign_answers is shared: any world's corrections want it
ANY_CORRECTIONS = tuple(row for w in WORLDS.values() for row in w.corrections)


@stage("realign_answers", "the base's compliant answers to calibrate's harmful prompts (Antidote's data)",
       needs=("base", "splits"), for_rows=ANY_CORRECTIONS)
def stage_realign_answers(ctx: Context) -> dict:
    from csulora.eval.judges import asr_judge
    from csulora.eval.specs import load_prompts
    from csulora.io.modeling import load_model
    from csulora.references.calibration import DEFAULT_HARMFUL_SPECS

    from benchmarks.smol.world import generate

    prompts = [p for spec in DEFAULT_HARMFUL_SPECS for p in load_prompts(spec)]
    model, tok = load_model(ctx.path("base"), **RUNS_ON)
    texts = [p.text for p in prompts]
    answers = generate(model, tok, texts, ctx.recipe.max_new_tokens, "base:realign")
    complied = asr_judge().judge(texts, answers)
    pairs = [{"id": p.id, "prompt": p.text, "response": a} for p, a, ok in zip(prompts, answers, complied) if ok]
    write_jsonl(ctx.path(*REALIGN_FILE), pairs)
    return {"prompts": len(prompts), "compliant_pairs": len(pairs), "specs": list(DEFAULT_HARMFUL_SPECS)}


def update_statistics_needs(world: World) -> tuple[str, ...]:
    return ("realign_answers", *(u.stage for u in world.updates))


@world_stage("update_statistics", "csulora calibrate --update: each fine-tuned model's statistics on the realign pairs",
             needs=update_statistics_needs, for_rows=lambda w: w.corrections)
def stage_update_statistics(ctx: Context) -> dict:
    from csulora.references.calibration import calibrate_update

    info = {}
    for update in ctx.world.update_names:
        if not ctx.wants(update, *ctx.world.correction_rows(update)):
            continue
        start = time.perf_counter()
        result = calibrate_update(
            ctx.path("aligned"), update_statistics_file(ctx, update), update=update_folder(ctx, update),
            pairs=str(ctx.path(*REALIGN_FILE)), force=True, progress=False, **RUNS_ON,
        )  # fmt: skip
        info[update] = {"seconds": round(time.perf_counter() - start, 1), "tokens": result.harmful_tokens}
    return info
