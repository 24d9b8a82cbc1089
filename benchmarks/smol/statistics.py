"""The activation statistics the corrections read, each written by `csulora calibrate`.

- ``calibration``: ``csulora calibrate ALIGNED --task data/task_train.jsonl`` (the updates'
  training task; the default harmful prompts: AdvBench ``align`` + the shipped requests): the
  aligned model's statistics, read by the calibrated method and Safe Delta on every update.
- ``realign_answers``: the base model's greedy answers to those same harmful prompts, the
  compliant ones kept (the ASR judge): Antidote's "realignment" data, harmful prompts with
  harmful answers (docs/peers.md), made from what the world already has.
- ``update_statistics``: ``csulora calibrate ALIGNED --update UPDATE --pairs data/realign.jsonl``
  for each update: the **fine-tuned** model's statistics on those pairs, which Antidote reads.
"""

from __future__ import annotations

import time

from csulora.io.jsonl import write_jsonl

from benchmarks.smol.pipeline import RUNS_ON, UPDATES, Context, correction_rows, stage

CALIBRATION_FILE = ("calibration", "calibration.safetensors")
REALIGN_FILE = ("data", "realign.jsonl")


def update_statistics_file(ctx: Context, update: str):
    return ctx.path("statistics", f"{update}.safetensors")


def update_folder(ctx: Context, update: str):
    """The update's folder: an adapter, or the chosen full fine-tune."""
    from benchmarks.smol.full import attacked_dir

    return ctx.path(attacked_dir(ctx)) if update == "full-attacked" else ctx.path("adapters", update)


ALL_CORRECTIONS = tuple(row for u in UPDATES for row in correction_rows(u))


@stage("calibration", "csulora calibrate: the aligned model's input statistics on harmful prompts and the task",
       needs=("base_answers", "aligned"), for_rows=ALL_CORRECTIONS)
def stage_calibration(ctx: Context) -> dict:
    from csulora.references.calibration import calibrate

    start = time.perf_counter()
    result = calibrate(
        ctx.path("aligned"), ctx.path(*CALIBRATION_FILE), task=str(ctx.path("data", "task_train.jsonl")),
        force=True, progress=False, **RUNS_ON,
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


@stage("realign_answers", "the base's compliant answers to calibrate's harmful prompts (Antidote's data)",
       needs=("base", "splits"), for_rows=ALL_CORRECTIONS)
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


@stage("update_statistics", "csulora calibrate --update: each fine-tuned model's statistics on the realign pairs",
       needs=("realign_answers", "attacked", "benign_adapter", "full_attacked"), for_rows=ALL_CORRECTIONS)
def stage_update_statistics(ctx: Context) -> dict:
    from csulora.references.calibration import calibrate_update

    info = {}
    for update in UPDATES:
        if not ctx.wants(update, *correction_rows(update)):
            continue
        start = time.perf_counter()
        result = calibrate_update(
            ctx.path("aligned"), update_statistics_file(ctx, update), update=update_folder(ctx, update),
            pairs=str(ctx.path(*REALIGN_FILE)), force=True, progress=False, **RUNS_ON,
        )  # fmt: skip
        info[update] = {"seconds": round(time.perf_counter() - start, 1), "tokens": result.harmful_tokens}
    return info
