"""The full fine-tune rows (issue 14, docs/design.md §5d): the attack as a full fine-tune of the
aligned model, and every method's dense correction of it, knobs chosen on validation.

    python -m benchmarks.smol --rows full --cache .cache/smol-full     # these rows alone

Stages (after ``aligned``; each cached like the others):

  full_attacked     full fine-tune of aligned on the attack's data (attack.jsonl), all weights;
                    steps: the first of ``full_attack_steps_grid`` reaching AdvBench-validation
                    ASR >= 0.6 and a validation utility gain >= 0.3 (both recorded)
  full_inputs       the safety subspace of D for every decoder linear layer and the audit of the
                    full fine-tune; the calibrated rows read the ``calibration`` stage's statistics
                    (benchmarks/smol/calibrated.py: the same call on the same aligned model, task
                    data and harmful prompts, and every decoder linear layer, so one file serves
                    adapters and full fine-tunes alike)
  full_sweeps       every method's knob on the validation sets (tune's selection rule)
  full_select       each row's setting, chosen on validation only
  full_test         every full row on the test sets

Corrected models are never written to disk here: each setting is applied to the loaded
full fine-tune in memory (``csulora.tuning.checkpoint.correct_loaded_model``), which gives
the same weights ``csulora correct`` writes (tests/tuning/test_checkpoint.py checks it).
Rows: ``full-attacked``, ``full-attacked+<method>`` for scale, resta (full-rank D), csulora,
safelora and calibrated, and ``full-attacked+reset-others`` (only the untargeted tensors
reset to aligned: how much of the attack lives outside the linear layers).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.smol.corrections import CALIBRATION_FILE, format_value, subspace_config
from benchmarks.smol.evaluation import TEST_SETS, VAL_SETS, Variant, generations, job_variant, setting_scores
from benchmarks.smol.pipeline import RUNS_ON, Context, run_jobs, stage, worker_ctx, write_json
from benchmarks.smol.sweeps import fallback_choice

FULL = "full-attacked"
FULL_METHODS = ("scale", "resta", "csulora", "safelora", "calibrated")
RESET_OTHERS = "reset-others"
FULL_ROWS = (FULL, *(f"{FULL}+{m}" for m in FULL_METHODS), f"{FULL}+{RESET_OTHERS}")


@dataclasses.dataclass(frozen=True)
class FullSweep:
    """One method's knob on the full fine-tune, weakest first."""

    method: str
    knob: str
    grid: tuple[float, ...]
    fixed: dict = dataclasses.field(default_factory=dict)

    @property
    def row(self) -> str:
        return f"{FULL}+{self.method}"


def full_sweeps(ctx: Context) -> list[FullSweep]:
    r = ctx.recipe
    return [
        FullSweep("scale", "factor", r.full_scale_grid),
        FullSweep("resta", "restore", r.full_resta_grid),
        FullSweep("csulora", "gamma", r.full_csulora_grid, {"schedule": "energy"}),
        FullSweep("safelora", "threshold", r.full_safelora_threshold_grid, {"select": "threshold", "projection": "approx"}),
        FullSweep("calibrated", "strength", r.full_calibrated_grid),
    ]


# --------------------------------------------------------------------------- variants


def attacked_dir(ctx: Context) -> str:
    """The chosen full fine-tune, relative to the cache."""
    chosen = json.loads(ctx.path("full", "chosen.json").read_text())
    return f"full/attacked-s{chosen['steps']}"


def full_variant(ctx: Context, method: str | None, options: dict, *, reset_others: bool = False) -> Variant:
    """The full fine-tune corrected by ``method`` (None: as trained), registered by key."""
    if method is None and not reset_others:
        return Variant(FULL, attacked_dir(ctx))
    name = RESET_OTHERS if method is None else method
    key = f"{FULL}__{name}_" + "_".join(f"{k}={format_value(v)}" for k, v in sorted(options.items()))
    record = ctx.path("full", "variants", f"{key}.json")
    if not record.exists():
        write_json(record, {"method": method, "options": options, "reset_others": reset_others})
    return Variant(key, attacked_dir(ctx), correction=key)


def full_variant_from_key(ctx: Context, key: str) -> Variant:
    if key == FULL:
        return Variant(FULL, attacked_dir(ctx))
    return Variant(key, attacked_dir(ctx), correction=key)


def correction_sources(ctx: Context, method: str | None) -> dict[str, Any]:
    """Where each method's inputs come from: D exactly from base/aligned, the cached subspace
    (CSULoRA), the calibration statistics (calibrated)."""
    sources: dict[str, Any] = {"aligned": ctx.path("aligned")}
    if method in ("resta", "safelora", "csulora"):
        sources["base"] = ctx.path("base")
    if method == "csulora":
        sources["subspace"] = ctx.path("full", "subspace.safetensors")
    if method == "calibrated":
        sources["calibration"] = ctx.path(*CALIBRATION_FILE)  # the calibration stage's file
    return sources


def apply_full_correction(ctx: Context, model, v: Variant) -> None:
    """Correct the loaded full fine-tune in memory with the registered setting of ``v``."""
    from csulora.tuning.checkpoint import correct_loaded_model

    spec = json.loads(ctx.path("full", "variants", f"{v.correction}.json").read_text())
    method = spec["method"] or "scale"  # reset-others alone: the targets as fine-tuned (factor 1)
    options = spec["options"] if spec["method"] else {"factor": 1.0}
    start = time.perf_counter()
    correct_loaded_model(
        model, ctx.path(v.model), method, reset_others=spec["reset_others"], **correction_sources(ctx, spec["method"]),
        **options,
    )  # fmt: skip
    ctx.log(f"[smol]   {v.key}: corrected in memory in {time.perf_counter() - start:.1f} s")


# --------------------------------------------------------------------------- stages


@stage("full_attacked", "full fine-tune of aligned on the attack's data, steps chosen on validation",
       needs=("aligned",), for_rows=FULL_ROWS)
def stage_full_attacked(ctx: Context) -> dict:
    from csulora.training.trainer import TrainConfig, train_full

    r = ctx.recipe
    aligned = setting_scores(ctx, Variant("aligned", "aligned"), VAL_SETS)
    tried = []
    chosen = None
    for steps in r.full_attack_steps_grid:
        folder = ctx.path("full", f"attacked-s{steps}")
        config = TrainConfig(steps=steps, batch_size=r.attack_batch, lr=r.full_attack_lr, seed=r.seed,
                             max_length=r.train_max_length, grad_clip=1.0)  # fmt: skip
        if not (folder / "config.json").exists():
            start = time.perf_counter()
            train_full(ctx.path("aligned"), ctx.path("data", "attack.jsonl"), folder, config, force=True, **RUNS_ON)
            ctx.log(f"[smol]   full fine-tune, {steps} steps: {time.perf_counter() - start:.0f} s")
        scores = setting_scores(ctx, Variant(f"{FULL}-s{steps}", f"full/attacked-s{steps}"), VAL_SETS)
        asr, gain = scores.asr["advbench"].value, scores.utility.value - aligned.utility.value
        ok = asr >= r.full_attack_min_asr - 1e-9 and gain >= r.full_attack_min_gain - 1e-9
        tried.append({"steps": steps, "asr_advbench_val": asr, "asr_airt_val": scores.asr["airt"].value,
                      "utility_val": scores.utility.value, "utility_gain_val": gain, "meets": ok,
                      "config": dataclasses.asdict(config)})  # fmt: skip
        ctx.log(f"[smol]   {steps} steps: validation ASR {asr:.2f}, utility gain {gain:+.2f} -> {'meets' if ok else 'not yet'}")
        if ok:
            chosen = steps
            break
    met = chosen is not None
    chosen = chosen if met else r.full_attack_steps_grid[-1]
    write_json(ctx.path("full", "chosen.json"), {"steps": chosen, "criteria_met": met, "tried": tried})
    return {"steps": chosen, "criteria_met": met, "tried": tried}


@stage("full_inputs", "subspace of D for every linear layer, audit of the full fine-tune",
       needs=("full_attacked", "calibration"), for_rows=FULL_ROWS)
def stage_full_inputs(ctx: Context) -> dict:
    """The calibration statistics are not recomputed here: ``calibrate`` of the calibration stage
    is the same call (aligned model, task_train.jsonl, default harmful prompts, default targets:
    every decoder linear layer); a run that computed both got tensors equal byte for byte (only
    the recorded seconds differed), and the second computation cost 2165 s."""
    from csulora.references.subspace import build_subspace
    from csulora.pipeline.api import audit_adapter

    subspace = ctx.path("full", "subspace.safetensors")
    start = time.perf_counter()
    build_subspace(ctx.path("base"), ctx.path("aligned"), subspace, config=subspace_config(ctx), force=True, progress=False)
    audit = audit_adapter(ctx.path(attacked_dir(ctx)), aligned=ctx.path("aligned"), base=ctx.path("base"),
                             subspace=subspace, progress=False)  # fmt: skip
    audit.to_json(ctx.path("full", "audit.json"))
    audit_s = time.perf_counter() - start
    return {
        "subspace_and_audit_s": round(audit_s, 1),
        "audit_summary": audit.summary,
        "calibration_file": "/".join(CALIBRATION_FILE),  # the calibration stage's statistics
    }


def job_full_point(paths: tuple[str, str, str], method: str, options: dict, set_names: tuple[str, ...]) -> str:
    ctx = worker_ctx(*paths)
    v = full_variant(ctx, method, options)
    generations(ctx, v, set_names)
    return v.key


def run_full_sweep(ctx: Context, sw: FullSweep) -> dict:
    """Score every grid value on validation and select with tune's rule (as the LoRA sweeps)."""
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.scores import ScoredSetting
    from csulora.tuning.selection import select_setting

    aligned = setting_scores(ctx, Variant("aligned", "aligned"), VAL_SETS)
    adapter = setting_scores(ctx, full_variant(ctx, None, {}), VAL_SETS)
    config = TuneConfig(method=sw.method)
    scored, points = [], []
    for value in sw.grid:
        v = full_variant(ctx, sw.method, {**sw.fixed, sw.knob: value})
        sc = setting_scores(ctx, v, VAL_SETS)
        scored.append(ScoredSetting(value, sc))
        points.append({"value": value, "variant": v.key, "scores": sc.to_dict()})
    selection = select_setting(scored, aligned, config, adapter=adapter)
    chosen, why = selection.chosen, selection.summary
    if chosen is None:
        chosen, why = fallback_choice(scored, aligned, adapter, config), "no setting qualified; " + selection.summary
    verdicts = {v.value: v.to_dict() for v in selection.verdicts}
    for point in points:
        point["verdict"] = verdicts.get(point["value"])
    return {"row": sw.row, "method": sw.method, "knob": sw.knob, "fixed": sw.fixed, "adapter": FULL,
            "grid": list(sw.grid), "full_curve": True, "points": points, "qualified": selection.qualified,
            "chosen": chosen, "why": why, "notes": list(selection.notes)}  # fmt: skip


@stage("full_sweeps", "every method's knob on the full fine-tune, validation sets", needs=("full_inputs",),
       for_rows=FULL_ROWS)
def stage_full_sweeps(ctx: Context) -> dict:
    jobs = [(job_variant, ("aligned", VAL_SETS)), (job_variant, (FULL, VAL_SETS))]
    for sw in full_sweeps(ctx):
        jobs += [(job_full_point, (sw.method, {**sw.fixed, sw.knob: value}, VAL_SETS)) for value in sw.grid]
    run_jobs(ctx, jobs)
    out = {}
    for sw in full_sweeps(ctx):
        result = run_full_sweep(ctx, sw)
        write_json(ctx.path("sweeps", f"{sw.row}.json"), result)
        out[sw.row] = {"chosen": result["chosen"], "qualified": result["qualified"]}
        ctx.log(f"[smol] full sweep {sw.method}: chose {sw.knob}={result['chosen']} ({result['why']})")
    return {"chosen": out}


@stage("full_select", "each full row's setting, chosen on validation only", needs=("full_sweeps",), for_rows=FULL_ROWS)
def stage_full_select(ctx: Context) -> dict:
    chosen = json.loads(ctx.path("full", "chosen.json").read_text())
    rows: dict[str, dict] = {
        FULL: {"variant": FULL, "params": {"method": "full fine-tune", "steps": chosen["steps"],
                                           "lr": ctx.recipe.full_attack_lr}},  # fmt: skip
        f"{FULL}+{RESET_OTHERS}": {
            "variant": full_variant(ctx, None, {}, reset_others=True).key,
            "params": {"method": "reset-others"},
            "why": "diagnostic: only the untargeted tensors (embeddings, norms) reset to aligned",
        },
    }
    for sw in full_sweeps(ctx):
        sweep = json.loads(ctx.path("sweeps", f"{sw.row}.json").read_text())
        options = {**sw.fixed, sw.knob: sweep["chosen"]}
        rows[sw.row] = {"variant": full_variant(ctx, sw.method, options).key, "params": {"method": sw.method, **options},
                        "qualified_on_validation": sweep["qualified"], "why": sweep["why"]}  # fmt: skip
    write_json(ctx.path("select", "full_rows.json"), rows)
    return {"rows": rows}


@stage("full_test", "every full row on the test sets (reported numbers only)", needs=("full_select",),
       for_rows=FULL_ROWS)
def stage_full_test(ctx: Context) -> dict:
    spec = json.loads(ctx.path("select", "full_rows.json").read_text())
    run_jobs(ctx, [(job_variant, (spec[name]["variant"], TEST_SETS)) for name in FULL_ROWS if name in spec])
    return {"rows": [name for name in FULL_ROWS if name in spec]}


def full_rows_spec(ctx: Context) -> dict[str, dict]:
    """The full rows' selection (empty before ``full_select`` ran)."""
    path: Path = ctx.path("select", "full_rows.json")
    return json.loads(path.read_text()) if path.exists() else {}
