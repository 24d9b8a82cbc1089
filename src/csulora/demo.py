"""``csulora demo``: the tiny world end to end, honestly reported.

1. Build (or reuse from the cache) the tiny world: base, aligned (full fine-tune), and
   the LoRA attack (:mod:`csulora.worlds.tiny`).
2. Compute the safety subspace of the alignment (``csulora.build_subspace``) and
   calibrate the aligned model once (``csulora.references.calibration.calibrate``, docs/design.md §5c):
   harmful inputs from the default calibration prompts (AdvBench ``align`` + ``requests``,
   disjoint from every scored set), task inputs from the attack's task training data
   (:data:`DEMO_TASK_TRAINING`), the adapter's modules, CPU float32.
3. For each swept method (Safe LoRA's threshold, CSULoRA's gamma, the calibrated method's
   strength, ...): correct the attacked adapter at every grid value
   (``csulora.correct_adapter``), score each on ``csulora tune``'s default validation
   data (AdvBench validation and airt-val, each source judged on its own; the benign
   validation half; the date task's validation split) with tune's own scoring
   (:func:`csulora.tuning.scoring.score_model`) and pick the knob with tune's rule
   (:func:`csulora.tuning.selection.select_setting`): the weakest setting whose ASR and
   empty answers are within 5 points of the aligned model's on each source, whose
   over-refusal and short benign answers are too, whose benign answers the aligned model
   finds about as likely as its own, and whose utility keeps 95% of the adapter's. Test
   prompts never decide anything.
4. Evaluate every row on the *test* prompts (AdvBench test, airt-test, the benign set,
   date test) and write ``results.json``, ``asr_utility.png``, ``report.md`` and
   ``generations.jsonl``.
5. Mark ``recommended: true`` on the row ``csulora tune`` would give with its defaults:
   the calibrated method over its own grid (``TuneConfig()``), statistics from the task's
   training data (``tune --calibration-task``): the ``calibrated`` row when its selection
   qualified, no row when nothing qualified (report.md then says why, with the shares of
   the update's action each strength keeps on harmful and on task inputs).

The demo departs from tune's defaults in two ways only: answers are capped at 24 tokens (the
tiny world's end within ~20; the exception docs/design.md §10 documents) and generated in
batches of 128 (tune's default is 32).

The baselines of docs/design.md §5b are rows too: ``scale`` (uniform shrink), ``resta`` (rank-k
restoration) and ``csulora+restore`` (CSULoRA's gamma swept with the restore beta held at
:data:`DEMO_RESTORE`). To keep ``make demo`` within 2-3 minutes on 2 cores the demo sweeps
``scale`` and ``csulora+restore`` over fewer points than tune's default grids (every other
point); the ``calibrated`` sweep uses tune's default grid unchanged, since it decides the
recommendation. A setting that leaves the adapter unchanged bit for bit is not generated
again: it scores what the attacked adapter scores.

Rows are data (:data:`DEMO_SWEEPS`); a new method adds a :class:`SweepSpec`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csulora.eval.harness import EvalSets, GenerationSettings, evaluate_loaded, summary_markdown
from csulora.io.atomic import atomic_output_dir, check_apart, check_output_dir
from csulora.methods.base import Tuning
from csulora.methods.registry import get_method, make_config
from csulora.tuning.config import TuneConfig
from csulora.tuning.scoring import TuneData
from csulora.tuning.selection import SettingScores

# The tiny world's answers are at most ~20 tokens (they end with the end-of-turn token),
# so a shorter cap than eval's 64 changes no verdict and keeps the demo fast.
DEMO_GENERATION = GenerationSettings(batch_size=128, max_new_tokens=24)
# Every model runs on the CPU in float32, whatever the machine has: the demo's numbers must
# not depend on whether a GPU is present (csulora's own default is CUDA when present).
DEMO_RUNS_ON = {"device": "cpu", "dtype": "float32"}
# What `csulora tune` runs with its defaults: the calibrated method over its grid, tune's gaps.
TUNE_DEFAULTS = TuneConfig()
MAX_ASR_GAP = TUNE_DEFAULTS.max_asr_gap
MAX_UTILITY_DROP = TUNE_DEFAULTS.max_utility_drop
# The task half of the attack's training data (worlds/tiny.py trains the attack LoRA on the
# date task's train split, seed 0): what a user would give `tune --calibration-task`.
DEMO_TASK_TRAINING = "date:train"
# tune's --task: the date task's validation split (tune's harmful and benign defaults need no flag).
DEMO_TASK_VALIDATION = "date:validation"
# The restore beta held fixed while csulora+restore sweeps gamma (tune's csulora knob).
DEMO_RESTORE = 1.0
# The feasibility pilot's shares of the action kept on SmolLM2 at strength 30, where the task
# survived (docs/design.md §5c): the contrast the report draws when the tiny world is not repaired.
SMOL_PILOT_SHARES = {"strength": 30.0, "harmful": 0.003, "task": 0.53}


@dataclass(frozen=True)
class SweepSpec:
    """One corrected row: a registered method whose knob is swept on validation.

    ``row``: the row name in results.json; ``grid``: the values tried (default: the
    method's own tune grid); ``fixed``: options held constant. The knob, the grid order
    and which inputs the method needs come from the method itself (the registry).
    """

    row: str
    method: str
    grid: tuple[float, ...] | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    curve: bool = True  # drawn as a curve on the plot
    # True for the one sweep that reproduces `csulora tune` with its defaults: its
    # selection, when one qualifies, is the recommended row.
    recommends: bool = False

    @property
    def tuning(self) -> Tuning:
        tuning = get_method(self.method).tuning
        assert tuning is not None, f"{self.method} describes no knob to sweep"
        return tuning

    @property
    def knob(self) -> str:
        return self.tuning.knob

    def weakest_first(self) -> tuple[float, ...]:
        return self.tuning.order_weakest_first(self.tuning.grid if self.grid is None else self.grid)


DEMO_SWEEPS: list[SweepSpec] = [
    SweepSpec("safelora", "safelora", (0.1, 0.2, 0.3, 0.4, 0.5), fixed={"select": "threshold"}),
    SweepSpec("csulora", "csulora", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0), fixed={"schedule": "energy"}),
    # tune's default scale grid is 1.0 down to 0.3 by 0.1; every other point here (time).
    SweepSpec("scale", "scale", (0.9, 0.7, 0.5, 0.3)),
    # `csulora tune --method resta` over its default grid (0 is the adapter itself).
    SweepSpec("resta", "resta"),
    # tune's default csulora grid is 0, 0.5, 1, 2, 4, 8, 16; every other point here (time).
    SweepSpec("csulora+restore", "csulora", (0.0, 1.0, 4.0, 16.0), fixed={"schedule": "energy", "restore": DEMO_RESTORE}),
    # Exactly `csulora tune` with its defaults: the calibrated method over its own grid.
    SweepSpec("calibrated", TUNE_DEFAULTS.method, recommends=True),
]
# Fixed-setting rows: the published defaults, no selection.
DEMO_FIXED: list[tuple[str, str, dict[str, Any]]] = [
    ("safelora-default", "safelora", {"select": "number", "num_layers": 10}),
]


@dataclass(frozen=True)
class Reference:
    """The attacked adapter's scores, reused for every setting that leaves it unchanged."""

    validation: SettingScores
    test: dict
    records: list[dict]


@dataclass
class DemoContext:
    """Everything a row needs: the world, the subspace and statistics, the prompt sets, a scratch dir."""

    world: Any
    subspace: Path
    work: Path
    validation: TuneData
    test: EvalSets
    calibration: Path | None = None
    generation: GenerationSettings = DEMO_GENERATION
    records: list[dict] = field(default_factory=list)


def demo_workers() -> int:
    """Processes for the sweep: one per core, at most two (``CSULORA_DEMO_WORKERS`` overrides)."""
    if "CSULORA_DEMO_WORKERS" in os.environ:
        return max(1, int(os.environ["CSULORA_DEMO_WORKERS"]))
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def demo_sets() -> tuple[TuneData, EvalSets]:
    """(validation, test): tune's default validation data with the date task; the test sets."""
    from csulora.eval.prompts import load_benign
    from csulora.eval.splits import advbench_split, airt_split
    from csulora.eval.tasks import date_task
    from csulora.tuning.runner import load_tune_data

    validation = load_tune_data(None, DEMO_TASK_VALIDATION, None).data
    test = EvalSets(harmful=advbench_split("test"), harmful_ood=airt_split("airt-test"), benign=load_benign(), task=date_task("test"))
    return validation, test


def needs_calibration(specs: Sequence[SweepSpec]) -> bool:
    """Whether any row needs activation statistics (then the aligned model is calibrated once)."""
    settings = [(s.method, {**s.fixed, s.knob: v}) for s in specs for v in s.weakest_first()]
    settings += [(method, options) for _, method, options in DEMO_FIXED]
    return any(get_method(method).needs_calibration(make_config(method, options)) for method, options in settings)


def calibrate_world(world: Any, out_file: Path) -> dict[str, Any]:
    """The aligned model's statistics for the attack's task (docs/design.md §5c), as
    ``tune --calibration-task`` computes them: the adapter's modules, the default harmful
    prompts, the task's training data; CPU float32, the demo's generation cap, quiet.
    Returns what results.json records of it."""
    from csulora.references.calibration import calibrate
    from csulora.io.adapters import read_adapter

    result = calibrate(
        world.aligned, out_file, task=DEMO_TASK_TRAINING, targets=read_adapter(world.attacked).module_names(),
        max_new_tokens=DEMO_GENERATION.max_new_tokens, batch_size=DEMO_GENERATION.batch_size, progress=False,
        **DEMO_RUNS_ON,
    )  # fmt: skip
    keep = ("harmful", "task", "modules", "groups", "generation")
    return {**{key: result.info[key] for key in keep}, "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}


def _evaluate(ctx: DemoContext, adapter: Path | None, sets: EvalSets, name: str, params: dict | None = None) -> dict:
    """A test row; its generations go to generations.jsonl."""
    row, records = _evaluate_with_records(ctx, adapter, sets, name, params)
    ctx.records.extend(records)
    return row


def _evaluate_with_records(
    ctx: DemoContext, adapter: Path | None, sets: EvalSets, name: str, params: dict | None
) -> tuple[dict, list[dict]]:
    from csulora.io.modeling import load_model, model_identity

    model_dir = ctx.world.aligned if name != "base" else ctx.world.base
    model, tokenizer = load_model(model_dir, adapter, **DEMO_RUNS_ON)
    return evaluate_loaded(
        model, tokenizer, sets, name=name, params=params, identity=model_identity(model_dir, adapter),
        generation=ctx.generation, with_margin=True, progress=False,
    )


def score_validation(ctx: DemoContext, adapter: Path | None) -> SettingScores:
    """tune's scores of the aligned model (``adapter`` None) or of an adapter on it.

    As tune does it: the adapter attached with PEFT, not merged, so that switching it off
    gives the aligned model, which judges how likely the benign answers are (fluency).
    """
    from csulora.io.modeling import load_model
    from csulora.tuning.scoring import score_model

    model, tokenizer = load_model(ctx.world.aligned, adapter, merge=False, **DEMO_RUNS_ON)
    aligned_view = contextlib.nullcontext if adapter is None else model.disable_adapter
    return score_model(
        model, tokenizer, ctx.validation, batch_size=ctx.generation.batch_size,
        max_new_tokens=ctx.generation.max_new_tokens, seed=TUNE_DEFAULTS.seed, with_margin=False,
        aligned_view=aligned_view,
    ).scores  # fmt: skip


def _correct(ctx: DemoContext, method: str, options: dict, tag: str) -> tuple[Path, Any]:
    """Correct the attacked adapter with what the method reads: the subspace always (the
    report's audit numbers), the exact D and the statistics when it needs them."""
    from csulora.pipeline import api

    impl = get_method(method)
    config = make_config(impl, options)
    sources: dict[str, Any] = {"subspace": ctx.subspace}
    if impl.needs_displacement(config):
        sources.update(base=ctx.world.base, aligned=ctx.world.aligned)
    if impl.needs_calibration(config):
        sources["calibration"] = ctx.calibration
    out = ctx.work / tag
    report = api.correct_adapter(ctx.world.attacked, out, method, progress=False, **sources, **options)
    return out, report


def action_kept(report: Any) -> dict[str, dict[str, float]] | None:
    """The shares of the update's action kept on harmful and on task inputs
    (``harmful_action_kept``/``task_action_kept`` of the calibrated method's report,
    docs/design.md §5c): mean, min and max over modules; None for other methods."""
    shares: dict[str, dict[str, float]] = {}
    for kind in ("harmful", "task"):
        values = [m[f"{kind}_action_kept"] for m in report.modules if m.get(f"{kind}_action_kept") is not None]
        if values:
            shares[kind] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return shares or None


def is_unchanged(adapter: Path, attacked: Path) -> bool:
    """Whether a corrected adapter is the attacked one, bit for bit (a setting that changes nothing)."""
    from csulora.io.adapters import ADAPTER_WEIGHTS

    return (adapter / ADAPTER_WEIGHTS).read_bytes() == (attacked / ADAPTER_WEIGHTS).read_bytes()


def mark_unchanged(row: dict, unchanged: bool) -> dict:
    """Rows equal to the attacked adapter say so in the table (``same_as``), not only in fine print."""
    if unchanged:
        row["same_as"] = "attacked"
    return row


def _sweep_point(ctx: DemoContext, spec: SweepSpec, value: float) -> dict:
    """Correct at one grid value; score it on validation (to choose) and test (to plot).

    A setting that leaves the adapter unchanged is not scored here: it scores what the
    attacked adapter scores (:func:`with_reference`)."""
    from csulora.worlds.tiny import one_thread

    with one_thread():
        options = {**spec.fixed, spec.knob: value}
        adapter, report = _correct(ctx, spec.method, options, f"{spec.row}-{spec.knob}-{value:g}")
        unchanged = is_unchanged(adapter, ctx.world.attacked)
        point = {"value": value, "unchanged": unchanged, "action_kept": action_kept(report)}
        if unchanged:
            return point
        point["validation"] = score_validation(ctx, adapter)
        # Every point is scored on test for the plot's curve; the chosen one's row and
        # generations are reused by run_sweep rather than generated a second time.
        point["test"], point["records"] = _evaluate_with_records(ctx, adapter, ctx.test, spec.row, options)
    return point


def with_reference(point: dict, spec: SweepSpec, attacked: Reference) -> dict:
    """A point that left the adapter unchanged gets the attacked adapter's scores, row and
    generations under its own row name and options."""
    if not point["unchanged"] or "validation" in point:
        return point
    test = copy.deepcopy(attacked.test)
    test.update(name=spec.row, params={**spec.fixed, spec.knob: point["value"]})
    records = [{**copy.deepcopy(r), "row": spec.row} for r in attacked.records]
    return {**point, "validation": attacked.validation, "test": test, "records": records}


def score_sweep_points(ctx: DemoContext, specs: Sequence[SweepSpec], workers: int) -> dict[str, list[dict]]:
    """All grid points of all sweeps, on ``workers`` processes (each single-threaded).

    The points are independent, so two processes use both cores of a small machine where
    one single-threaded process would leave one idle; results come back in grid order.
    """
    jobs = [(spec, value) for spec in specs for value in spec.weakest_first()]
    if workers <= 1:
        scored = [_sweep_point(ctx, spec, value) for spec, value in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        light = dataclasses.replace(ctx, records=[])  # workers return their records instead
        # spawn, not fork: forking a process whose torch thread pools already ran can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_sweep_point, light, spec, value) for spec, value in jobs]
            scored = [f.result() for f in futures]
    points: dict[str, list[dict]] = {spec.row: [] for spec in specs}
    for (spec, _), point in zip(jobs, scored):
        points[spec.row].append(point)
    return points


def run_sweep(
    ctx: DemoContext, spec: SweepSpec, aligned: SettingScores, attacked: Reference, points: list[dict] | None = None
) -> tuple[dict, dict]:
    """Select on validation among the scored grid points with tune's rule; return (test row, sweep record)."""
    from csulora.tuning.selection import CALIBRATION_FROM_TASK, ScoredSetting, select_setting

    if points is None:
        points = score_sweep_points(ctx, [spec], workers=1)[spec.row]
    points = [with_reference(p, spec, attacked) for p in points]
    config = dataclasses.replace(TUNE_DEFAULTS, method=spec.method, grid=tuple(p["value"] for p in points))
    weakest = make_config(spec.method, {**spec.fixed, spec.knob: points[0]["value"]})
    calibrated = get_method(spec.method).needs_calibration(weakest)
    selection = select_setting(
        [ScoredSetting(p["value"], p["validation"]) for p in points], aligned, config, adapter=attacked.validation,
        calibration_source=CALIBRATION_FROM_TASK if calibrated else None,
    )  # fmt: skip
    if selection.index is not None:
        chosen, why = points[selection.index], selection.summary
    else:
        # Nothing qualified: show the safest setting (lowest worst-source validation ASR,
        # then highest utility) and say so; the row is marked "qualified": false.
        chosen = min(points, key=lambda p: _safety_key(p["validation"]))
        why = f"no setting qualified ({selection.summary}); showing the safest, {spec.knob}={chosen['value']:g}"
    row = mark_unchanged(chosen["test"], chosen["unchanged"])
    ctx.records.extend(chosen["records"])
    row["params"]["selected_on"] = "validation"
    row["params"]["qualified"] = selection.index is not None
    record = {
        "method": spec.method, "knob": spec.knob, "chosen": chosen["value"], "qualified": selection.index is not None,
        "why": why, "unchanged": chosen["unchanged"], "notes": list(selection.notes),
        "points": [
            {
                spec.knob: p["value"], "validation": p["validation"].to_dict(), "verdict": _verdict(verdict),
                "test": _brief(p["test"]), "unchanged": p["unchanged"], "action_kept": p["action_kept"],
            }
            for p, verdict in zip(points, selection.verdicts)
        ],
    }  # fmt: skip
    return row, record


def _verdict(verdict: Any) -> dict[str, Any]:
    """Whether a setting qualifies; the conditions it failed, by name and in brief."""
    failed = verdict.failed
    return {
        "qualifies": verdict.qualifies, "conditions": [c.name for c in verdict.conditions],
        "failed": [c.name for c in failed], "failed_brief": [c.brief() for c in failed],
    }  # fmt: skip


def _safety_key(scores: SettingScores) -> tuple[float, float, float]:
    """Worst-source ASR, then summed ASR, then higher utility: the "safest" ordering."""
    asrs = [rate.value for rate in scores.asr.values()]
    return max(asrs), sum(asrs), -(scores.utility.value if scores.utility is not None else 0.0)


def _brief(row: dict) -> dict:
    keys = ("asr", "asr_ci", "asr_ood", "asr_ood_ci", "utility", "utility_ci", "over_refusal", "over_refusal_ci")
    return {k: row.get(k) for k in keys}


# Distinct marker shapes, one per row (hollow, so coincident rows stay visible).
ROW_MARKERS = ("o", "s", "X", "v", "^", "D", "P", "h", "p", "<", ">", "d", "8", "H", "*")
# Candidate offsets (points) for a curve's value label, nearest first: the first that
# collides with no marker and no other label is used (a simple greedy repel).
LABEL_OFFSETS = tuple(
    (dx * r, dy * r) for r in (6, 12, 18) for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
)
# Rows whose points coincide (within this much on both axes) are nudged apart horizontally.
COINCIDENT = 0.006
DODGE = 0.014


def row_styles(names: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """One (marker, colour) per row: every row its own marker shape and (up to 20 rows) colour."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    return {name: (ROW_MARKERS[i % len(ROW_MARKERS)], colours[i % len(colours)]) for i, name in enumerate(names)}


def dodge(points: Sequence[tuple[float, float]]) -> list[float]:
    """x offsets that spread coincident points symmetrically (0 for a point on its own)."""
    offsets = [0.0] * len(points)
    done: set[int] = set()
    for i, (x, y) in enumerate(points):
        if i in done:
            continue
        group = [j for j, (u, v) in enumerate(points) if abs(u - x) <= COINCIDENT and abs(v - y) <= COINCIDENT]
        done.update(group)
        for k, j in enumerate(group):
            offsets[j] = (k - (len(group) - 1) / 2) * DODGE
    return offsets


def place_labels(ax, labels: Sequence[tuple[str, float, float, Any]], obstacles: Sequence[Any]) -> list[Any]:
    """Write each ``(text, x, y, colour)`` at the first offset where it overlaps no obstacle
    (display-space boxes of markers) and no label already placed; drop it when none is free.
    Returns the placed labels' boxes."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    taken: list[Bbox] = list(obstacles)
    placed: list[Bbox] = []
    for text, x, y, colour in labels:
        artist = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=6.5, color=colour)
        for dx, dy in LABEL_OFFSETS:
            artist.set_position((dx, dy))
            artist.set_horizontalalignment("left" if dx >= 0 else "right")
            box = artist.get_window_extent(renderer).expanded(1.08, 1.15)
            inside = axes_box.contains(box.x0, box.y0) and axes_box.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append(box)
                break
        else:
            artist.remove()  # no free spot: the value is in report.md's sweep list anyway
    return placed


def plot_demo(path: Path, rows: Sequence[dict], sweeps: dict[str, dict], curves: Sequence[str]) -> dict[str, Any]:
    """ASR (AdvBench test) against utility: one hollow marker shape and colour per row, each
    sweep as a thin curve in its row's colour with its knob values as labels placed so they
    do not collide. Returns the layout (row styles, label boxes) for checking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    plotted = [r for r in rows if r["utility"] is not None and r["asr"] is not None]
    styles = row_styles([r["name"] for r in plotted])
    fig, ax = plt.subplots(figsize=(8.6, 5.0), dpi=120)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    labels = []
    for name in curves:
        points = sweeps[name]["points"]
        knob = sweeps[name]["knob"]
        colour = styles.get(name, ("o", "0.5"))[1]
        xs = [p["test"]["utility"] for p in points]
        ys = [p["test"]["asr"] for p in points]
        ax.plot(xs, ys, "-", color=colour, alpha=0.45, linewidth=1.2, marker=".", markersize=4, zorder=1)
        merged: dict[tuple[float, float], list[str]] = {}
        for p, x, y in zip(points, xs, ys):  # points of one curve at the same spot share one label
            merged.setdefault((round(x, 3), round(y, 3)), []).append(f"{p[knob]:g}")
        labels += [(f"{knob} " + ",".join(values), x, y, colour) for (x, y), values in merged.items()]
    offsets = dodge([(r["utility"], r["asr"]) for r in plotted])
    for row, offset in zip(plotted, offsets):
        marker, colour = styles[row["name"]]
        lo, hi = row["asr_ci"]
        recommended = bool(row.get("recommended"))
        label = row["name"] + (" = attacked (unchanged)" if row.get("same_as") else "")
        label += " (recommended)" if recommended else ""
        ax.errorbar(
            row["utility"] + offset, row["asr"], yerr=[[row["asr"] - lo], [hi - row["asr"]]], fmt=marker,
            markersize=9 if recommended else 7.5, markerfacecolor="none", markeredgewidth=2.2 if recommended else 1.5,
            color=colour, ecolor=colour, elinewidth=0.9, capsize=2.5, label=label, zorder=3,
        )
    ax.set_xlabel("utility (date task exact match, test)")
    ax.set_ylabel("ASR (AdvBench test, keyword judge)")
    ax.set_title("Tiny world: attack success vs task utility (bars: 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="rows (test)",
              title_fontsize=8)
    fig.text(0.99, 0.01, "thin lines: each sweep's settings; rows at the same point are nudged apart",
             ha="right", va="bottom", fontsize=6.5, color="0.4")
    fig.tight_layout()
    fig.canvas.draw()  # final geometry first: labels are placed against it
    to_display = ax.transData.transform
    obstacles = []
    for row, offset in zip(plotted, offsets):
        cx, cy = to_display((row["utility"] + offset, row["asr"]))
        obstacles.append(Bbox.from_extents(cx - 7, cy - 7, cx + 7, cy + 7))
    placed = place_labels(ax, labels, obstacles)
    fig.savefig(path)
    plt.close(fig)
    return {"styles": styles, "labels": placed, "label_count": len(labels)}


def recommendation(rows: Sequence[dict], sweeps: dict[str, dict]) -> dict:
    """Which row `csulora tune` (default options) picks, or why none: for results.json and report.md."""
    chosen = [r["name"] for r in rows if r.get("recommended")]
    if len(chosen) > 1:
        raise AssertionError(f"more than one recommended row: {chosen}")
    deciding = [name for name, sweep in sweeps.items() if sweep.get("recommends")]
    if chosen:
        sweep = sweeps[chosen[0]]
        return {"row": chosen[0], "params": {sweep["knob"]: sweep["chosen"]}, "why": sweep["why"]}
    if deciding:
        return {"row": None, "why": sweeps[deciding[0]]["why"]}
    return {"row": None, "why": "no sweep reproduces tune's defaults in this run"}


def _value(rate: dict | None) -> float | None:
    return None if rate is None else rate["value"]


def _share(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def strength_table(sweep: dict, reference: dict[str, dict]) -> list[str]:
    """Per setting of a sweep that reports the shares of its action kept (the calibrated
    method): validation scores, those shares (mean over modules) and the verdict."""
    sources = list(reference["aligned"]["asr"])
    knob = sweep["knob"]
    head = ["setting", *(f"ASR {s}" for s in sources), "utility", "over-refusal", "short", "fluency",
            "harmful action kept", "task action kept", "verdict (failed conditions)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(label: str, scores: dict, kept: dict | None, verdict: str) -> str:
        row = [label, *(_share(_value(scores["asr"][s])) for s in sources), _share(_value(scores["utility"])),
               _share(_value(scores["over_refusal"])), _share(_value(scores["benign_short"])),
               _share(scores["benign_fluency"]),
               _share(kept["harmful"]["mean"], 4) if kept and "harmful" in kept else "–",
               _share(kept["task"]["mean"], 3) if kept and "task" in kept else "–", verdict]  # fmt: skip
        return "| " + " | ".join(row) + " |"

    lines.append(cells("aligned", reference["aligned"], None, "the reference"))
    lines.append(cells("attacked", reference["attacked"], None, "the adapter"))
    for p in sweep["points"]:
        verdict = "qualifies" if p["verdict"]["qualifies"] else ", ".join(p["verdict"]["failed_brief"])
        lines.append(cells(f"{knob}={p[knob]:g}", p["validation"], p["action_kept"], verdict))
    return lines


def _failed_kinds(point: dict) -> set[str]:
    return {name.split(":")[0] for name in point["verdict"]["failed"]}


def why_not_repaired(sweep: dict, reference: dict[str, dict], scale: dict | None) -> list[str]:
    """Why no strength of the calibrated sweep qualifies, in this run's numbers.

    The feasibility pilot's explanation (docs/design.md §5c): the correction shrinks the
    update on the input directions harmful inputs occupy more than task inputs, so it
    repairs only as far as the two separate. The shares of the action kept on each say how
    far they do here; uniform scaling (``scale``) says how much of its action the task needs.
    """
    knob = sweep["knob"]
    sources = list(reference["aligned"]["asr"])
    adapter_utility = _value(reference["attacked"]["utility"])
    points = [p for p in sweep["points"] if p["action_kept"] and not p["unchanged"]]
    if not points:
        return []

    def shares(p: dict) -> str:
        kept = p["action_kept"]
        return (f"keeps {kept['harmful']['mean']:.2%} of the update's action on harmful inputs and "
                f"{kept['task']['mean']:.1%} on the task's")  # fmt: skip

    def scores(p: dict) -> str:
        asr = ", ".join(f"{s} {_value(p['validation']['asr'][s]):.2f}" for s in sources)
        utility = _value(p["validation"]["utility"])
        return f"validation ASR {asr}; utility {utility:.2f} (the adapter's {adapter_utility:.2f})"

    aligned_asr = ", ".join(f"{s} {_value(reference['aligned']['asr'][s]):.2f}" for s in sources)
    first = points[0]
    lines = [f"- The weakest, {knob}={first[knob]:g}, {shares(first)}: {scores(first)}."]
    safe = [p for p in points if "asr" not in _failed_kinds(p)]
    if safe:
        lines.append(
            f"- Every harmful source comes within {MAX_ASR_GAP:g} of the aligned model's ({aligned_asr}) only from "
            f"{knob}={safe[0][knob]:g} on, which {shares(safe[0])}: {scores(safe[0])}."
        )
    else:
        lines.append(
            f"- No {knob} brings every harmful source within {MAX_ASR_GAP:g} of the aligned model's ({aligned_asr})."
        )
    needed = task_needs(scale) if scale else None
    if needed is not None and (needed[0] < 1.0 or needed[2] is not None):  # factor 1 alone says nothing
        factor, kept, lost = needed
        lines.append(
            f"- How much of its action the task needs, read off uniform scaling (factor c keeps c² of the action on "
            f"every input): factor {factor:g} ({kept:.0%} of the action) still keeps the utility"
            + (f", factor {lost[0]:g} ({lost[1]:.0%}) does not." if lost else ".")
        )
    pilot = SMOL_PILOT_SHARES
    matched = next((p for p in points if p[knob] == pilot["strength"]), None)
    contrast = ""
    if matched is not None:
        kept = matched["action_kept"]
        contrast = (
            f" At {knob}={pilot['strength']:g} this world keeps {kept['harmful']['mean']:.2%} of the harmful action "
            f"and {kept['task']['mean']:.1%} of the task's; SmolLM2 (576-dimensional inputs) kept {pilot['harmful']:.1%} "
            f"and {pilot['task']:.0%} there, and its task survived (the feasibility pilot, docs/design.md §5c)."
        )
    lines.append(
        "- So the two shares fall together: the correction cannot take the harmful action away without the task's. "
        "It shrinks the update on the input directions harmful inputs occupy more than task inputs (docs/design.md "
        "§5c), and in this world's 64-dimensional layer inputs the date prompts and the harmful prompts with their "
        "refusals do not separate (the pilot's finding on this world, measured here by the shares above)."
        + contrast
        + " The tiny world is not reshaped to make the method look better."
    )
    return lines


def task_needs(scale: dict) -> tuple[float, float, tuple[float, float] | None] | None:
    """From a ``scale`` sweep: (the smallest factor whose utility is within the drop, the share of
    the action it keeps, (the next factor, its share) or None); None when no factor keeps it."""
    points = [p for p in scale["points"] if p["validation"]["utility"] is not None]
    keeps = [p for p in points if "utility" not in _failed_kinds(p)]
    if not keeps:
        return None
    smallest = min(keeps, key=lambda p: p[scale["knob"]])
    factor = smallest[scale["knob"]]
    below = [p[scale["knob"]] for p in points if p[scale["knob"]] < factor]
    lost = (max(below), max(below) ** 2) if below else None
    return factor, factor**2, lost


def demo_report(rows: Sequence[dict], sweeps: dict[str, dict], info: dict) -> str:
    """report.md: the table, how knobs were chosen, and what the numbers say."""
    by = {r["name"]: r for r in rows}
    validation = info.get("validation") or {}
    described = ", ".join(f"{name} (n={d['n']})" for name, d in (validation.get("data") or {}).items())
    lines = [summary_markdown(rows, title="csulora demo: the tiny world").rstrip(), ""]
    lines += [
        "ASR: keyword judge (docs/design.md §7) on AdvBench test (n=100); ASR (OOD): airt-test (n=20, wide intervals);",
        "utility: exact match on the date task's test split (n=100); over-refusal: the project's benign set.",
        f"Greedy generation, {info['generation']['max_new_tokens']} new tokens, chat template. Intervals: bootstrap 95%.",
        "",
        "## How each knob was chosen (validation prompts only)",
        "",
        f"`csulora tune`'s rule and data: {described}." if described else "`csulora tune`'s rule.",
        "",
    ]
    for name, sweep in sweeps.items():
        lines.append(f"- **{name}** ({sweep['method']}, {sweep['knob']} over {[p[sweep['knob']] for p in sweep['points']]}): {sweep['why']}")
    rec = info.get("recommended") or recommendation(rows, sweeps)
    deciding = next((sweep for sweep in sweeps.values() if sweep.get("recommends")), None)
    lines += ["", "## Recommended (what `csulora tune` picks with its defaults)", ""]
    if rec["row"] is not None:
        knob, value = next(iter(rec["params"].items()))
        lines.append(f"- **{rec['row']}** with {knob}={value:g}, chosen on validation: {rec['why']}.")
    elif deciding is not None:
        grid = [p[deciding["knob"]] for p in deciding["points"]]
        lines.append(
            f"- **No row is recommended**: with its defaults (the {deciding['method']} method, {deciding['knob']} over "
            f"{grid}, statistics from the task's training data, ASR gap {MAX_ASR_GAP:g} on each source, utility "
            f"drop {MAX_UTILITY_DROP:.0%}, the benign and fluency checks) `csulora tune` finds no qualifying setting "
            f"on this world's validation data, so it would write no adapter. {rec['why']}."
        )
    else:
        lines.append(f"- **No row is recommended**: {rec['why']}.")
    if info.get("tune_command"):
        lines += ["", f"The same choice from the command line: `{info['tune_command']}`."]
    kept_sweeps = {name: s for name, s in sweeps.items() if any(p.get("action_kept") for p in s["points"])}
    for name, sweep in kept_sweeps.items():
        lines += ["", f"## {name}: each setting on validation, and the share of the update's action it keeps", ""]
        lines += strength_table(sweep, validation)
        lines += [
            "",
            "Action kept: mean over modules of ‖B A'‖²_S / ‖B A‖²_S, S the aligned model's input statistics on "
            "harmful prompts + its refusals, or on the task's training data (docs/design.md §5c).",
        ]
        if sweep.get("recommends") and not sweep["qualified"]:
            lines += ["", "### Why it does not repair the tiny world", ""]
            lines += why_not_repaired(sweep, validation, sweeps.get("scale"))
    lines += ["", "## What it shows", ""]
    aligned, attacked = by.get("aligned"), by.get("attacked")
    if aligned and attacked:
        lines.append(
            f"- The attack raised ASR from {aligned['asr']:.2f} to {attacked['asr']:.2f} (OOD {aligned['asr_ood']:.2f} -> "
            f"{attacked['asr_ood']:.2f}) and utility from {aligned['utility']:.2f} to {attacked['utility']:.2f}."
        )
        gain = attacked["utility"] - aligned["utility"]
        for name in [r["name"] for r in rows if r["name"] not in ("base", "aligned", "attacked")]:
            r = by[name]
            kept = (r["utility"] - aligned["utility"]) / gain if gain > 0 else float("nan")
            same = f" = {r['same_as']} (unchanged: its chosen setting changes nothing)" if r.get("same_as") else ""
            lines.append(
                f"- {name}{same}: ASR {r['asr']:.2f} (OOD {r['asr_ood']:.2f}), utility {r['utility']:.2f} "
                f"({kept:.0%} of the attack's utility gain kept), over-refusal {r['over_refusal']:.2f}."
            )
    lines += [
        "",
        "The tiny world is a random-init 2-layer Llama trained in seconds; its numbers show the",
        "mechanics, not how the methods rank on real models (see the SmolLM2 results).",
        "",
        f"World: `{info['world']}`; timings (s): {json.dumps(info['timings_s'])}.",
    ]
    return "\n".join(lines) + "\n"


def tune_command(world: Any) -> str:
    """The `csulora tune` command whose choice the recommended row reproduces."""
    return (
        f"csulora tune {world.attacked} --aligned {world.aligned} --calibration-task {DEMO_TASK_TRAINING} "
        f"--task {DEMO_TASK_VALIDATION} --max-new-tokens {DEMO_GENERATION.max_new_tokens} --device cpu -o tuned/"
    )


def run_demo(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    world_dir: str | os.PathLike | None = None,
    sweeps: Sequence[SweepSpec] | None = None,
    progress: bool = True,
) -> Path:
    """Build/reuse the tiny world, attack, correct, evaluate; write OUTDIR. Returns OUTDIR."""
    from csulora.references.subspace import build_subspace
    from csulora.worlds.tiny import build_tiny_world, default_cache_dir, one_thread, shared_tiny_world

    # The world is the demo's input: a forced OUTDIR over $CSULORA_CACHE would delete it mid-run.
    check_apart({"-o/--output": out_dir}, {"the tiny world": world_dir if world_dir is not None else default_cache_dir()})
    check_output_dir(out_dir, force)
    sweeps = list(DEMO_SWEEPS if sweeps is None else sweeps)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with one_thread():
        world = build_tiny_world(world_dir) if world_dir is not None else shared_tiny_world()
        timings["world"] = time.perf_counter() - t0
        with atomic_output_dir(out_dir, force) as tmp:
            work = tmp / "work"
            work.mkdir()
            t = time.perf_counter()
            subspace = build_subspace(world.base, world.aligned, work / "subspace.safetensors", progress=False)
            calibration, calibration_info = None, None
            if needs_calibration(sweeps):
                calibration = work / "calibration.safetensors"
                calibration_info = calibrate_world(world, calibration)
            timings["subspace_and_calibration"] = time.perf_counter() - t
            t = time.perf_counter()
            validation, test = demo_sets()
            ctx = DemoContext(world=world, subspace=Path(subspace), work=work, validation=validation, test=test,
                              calibration=calibration)  # fmt: skip
            rows = [_evaluate(ctx, None, test, "base"), _evaluate(ctx, None, test, "aligned")]
            attacked_test, attacked_records = _evaluate_with_records(ctx, world.attacked, test, "attacked", None)
            ctx.records.extend(attacked_records)
            rows.append(attacked_test)
            aligned_val = score_validation(ctx, None)
            attacked = Reference(score_validation(ctx, world.attacked), copy.deepcopy(attacked_test), attacked_records)
            for name, method, options in DEMO_FIXED:
                adapter, _ = _correct(ctx, method, options, name)
                row = _evaluate(ctx, adapter, test, name, params=dict(options))
                rows.append(mark_unchanged(row, is_unchanged(adapter, world.attacked)))
            sweep_records = {}
            sweep_points = score_sweep_points(ctx, sweeps, workers=demo_workers())
            for spec in sweeps:
                row, record = run_sweep(ctx, spec, aligned_val, attacked, sweep_points[spec.row])
                row["recommended"] = bool(spec.recommends and record["qualified"])
                record["recommends"] = spec.recommends
                rows.append(row)
                sweep_records[spec.row] = record
            timings["evaluate"] = time.perf_counter() - t
            info = {
                "world": str(world.root),
                "world_info": world.info(),
                "generation": {"batch_size": ctx.generation.batch_size, "max_new_tokens": ctx.generation.max_new_tokens},
                "selection_rule": {
                    "max_asr_gap": MAX_ASR_GAP, "max_utility_drop": MAX_UTILITY_DROP,
                    "max_fluency_loss_nats": TUNE_DEFAULTS.max_fluency_loss, "on": "validation",
                },
                "validation": {
                    "data": {name: {"n": len(prompts)} for name, prompts in validation.prompt_sets()},
                    "aligned": aligned_val.to_dict(),
                    "attacked": attacked.validation.to_dict(),
                },
                "calibration": calibration_info,
                "tune_command": tune_command(world) if any(s.recommends for s in sweeps) else None,
                "recommended": recommendation(rows, sweep_records),
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            }  # fmt: skip
            (tmp / "results.json").write_text(json.dumps({"rows": rows, "sweep": sweep_records, **info}, indent=2, default=str) + "\n")
            with open(tmp / "generations.jsonl", "w", encoding="utf-8") as fh:
                for r in ctx.records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            plot_demo(tmp / "asr_utility.png", rows, sweep_records, [s.row for s in sweeps if s.curve])
            timings["total"] = time.perf_counter() - t0
            info["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
            (tmp / "report.md").write_text(demo_report(rows, sweep_records, info))
            import shutil

            shutil.rmtree(work)  # corrected adapters of the sweep: scratch, not results
    return Path(out_dir)
