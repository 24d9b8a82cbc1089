"""``csulora demo``: the tiny world end to end, honestly reported.

1. Build (or reuse from the cache) the tiny world: base, aligned (full fine-tune), and
   the LoRA attack (:mod:`csulora.worlds.tiny`).
2. Compute the safety subspace of the alignment (``csulora.api.build_subspace``).
3. For each swept method (Safe LoRA's threshold, CSULoRA's gamma, ...): correct the
   attacked adapter at every grid value (``csulora.api.correct_adapter``), score each on
   the *validation* prompts (AdvBench validation + airt-val, date validation) and pick
   the knob with tune's rule (:func:`csulora.tuning.selection.select_setting`): the
   weakest setting whose ASR is within 5 points of the aligned model's on each source
   and whose utility keeps 95% of the adapter's. Test prompts never decide anything.
4. Evaluate every row on the *test* prompts (AdvBench test, airt-test, the benign set,
   date test) and write ``results.json``, ``asr_utility.png``, ``report.md`` and
   ``generations.jsonl``.
5. Mark ``recommended: true`` on the row ``csulora tune`` would give with its default
   method, grid and gaps (RESTA's restore over tune's default grid, the task given as the
   date validation split): the ``resta`` row when its selection qualified, no row when
   nothing qualified (report.md then says so).

The baselines of docs/design.md §5b are rows too: ``scale`` (uniform shrink), ``resta`` (rank-k
restoration) and ``csulora+restore`` (CSULoRA's gamma swept with the restore beta held at
:data:`DEMO_RESTORE`). To stay within 2 minutes on 2 cores the demo sweeps ``scale`` and
``csulora+restore`` over fewer points than tune's default grids (every other point); the
``resta`` sweep uses tune's default grid unchanged, since it decides the recommendation.

Rows are data (:data:`DEMO_SWEEPS`); a new method adds a :class:`SweepSpec`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csulora.eval.harness import EvalSets, GenerationSettings, evaluate_loaded, summary_markdown
from csulora.eval.metrics import Rate
from csulora.io.atomic import atomic_output_dir, check_output_dir
from csulora.methods.base import Tuning
from csulora.methods.registry import get_method, make_config
from csulora.tuning.config import TuneConfig

# The tiny world's answers are at most ~20 tokens (they end with the end-of-turn token),
# so a shorter cap than eval's 64 changes no verdict and keeps the demo fast.
DEMO_GENERATION = GenerationSettings(batch_size=128, max_new_tokens=24)
# Every model runs on the CPU in float32, whatever the machine has: the demo's numbers must
# not depend on whether a GPU is present (csulora's own default is CUDA when present).
DEMO_RUNS_ON = {"device": "cpu", "dtype": "float32"}
# The method of the row the demo recommends: `csulora tune --method resta` over its default
# grid. (tune's default method is now calibrated, docs/design.md §5c, which needs activation
# statistics the demo does not compute yet.)
DEMO_RECOMMENDED_METHOD = "resta"
# tune's default gaps: the recommendation must be what `csulora tune --method resta` picks.
MAX_ASR_GAP = TuneConfig().max_asr_gap
MAX_UTILITY_DROP = TuneConfig().max_utility_drop
# The restore beta held fixed while csulora+restore sweeps gamma (tune's csulora knob).
DEMO_RESTORE = 1.0


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

    @property
    def needs_models(self) -> bool:
        """Whether the exact D must be streamed (pass ``base``/``aligned``)."""
        impl = get_method(self.method)
        return impl.needs_displacement(make_config(impl, {**self.fixed, self.knob: self.weakest_first()[0]}))

    def weakest_first(self) -> tuple[float, ...]:
        return self.tuning.order_weakest_first(self.tuning.grid if self.grid is None else self.grid)


DEMO_SWEEPS: list[SweepSpec] = [
    SweepSpec("safelora", "safelora", (0.1, 0.2, 0.3, 0.4, 0.5), fixed={"select": "threshold"}),
    SweepSpec("csulora", "csulora", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0), fixed={"schedule": "energy"}),
    # tune's default scale grid is 1.0 down to 0.3 by 0.1; every other point here (time).
    SweepSpec("scale", "scale", (0.9, 0.7, 0.5, 0.3)),
    # Exactly `csulora tune --method resta`: its default grid (0 is the adapter itself).
    SweepSpec("resta", DEMO_RECOMMENDED_METHOD, recommends=True),
    # tune's default csulora grid is 0, 0.5, 1, 2, 4, 8, 16; every other point here (time).
    SweepSpec("csulora+restore", "csulora", (0.0, 1.0, 4.0, 16.0), fixed={"schedule": "energy", "restore": DEMO_RESTORE}),
]
# Fixed-setting rows: the published defaults, no selection.
DEMO_FIXED: list[tuple[str, str, dict[str, Any]]] = [
    ("safelora-default", "safelora", {"select": "number", "num_layers": 10}),
]


@dataclass
class DemoContext:
    """Everything a row needs: the world, the subspace, the prompt sets, a scratch dir."""

    world: Any
    subspace: Path
    work: Path
    validation: EvalSets
    test: EvalSets
    generation: GenerationSettings = DEMO_GENERATION
    records: list[dict] = field(default_factory=list)


def demo_workers() -> int:
    """Processes for the sweep: one per core, at most two (``CSULORA_DEMO_WORKERS`` overrides)."""
    if "CSULORA_DEMO_WORKERS" in os.environ:
        return max(1, int(os.environ["CSULORA_DEMO_WORKERS"]))
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def demo_sets() -> tuple[EvalSets, EvalSets]:
    from csulora.eval.prompts import load_benign
    from csulora.eval.splits import advbench_split, airt_split
    from csulora.eval.tasks import date_task

    validation = EvalSets(harmful=advbench_split("validation"), harmful_ood=airt_split("airt-val"), task=date_task("validation"))
    test = EvalSets(harmful=advbench_split("test"), harmful_ood=airt_split("airt-test"), benign=load_benign(), task=date_task("test"))
    return validation, test


def _evaluate(ctx: DemoContext, adapter: Path | None, sets: EvalSets, name: str, params: dict | None = None, keep: bool = True) -> dict:
    row, records = _evaluate_with_records(ctx, adapter, sets, name, params, with_margin=keep)
    if keep:
        ctx.records.extend(records)
    return row


def _evaluate_with_records(
    ctx: DemoContext, adapter: Path | None, sets: EvalSets, name: str, params: dict | None, *, with_margin: bool
) -> tuple[dict, list[dict]]:
    from csulora.modeling import load_model, model_identity

    model_dir = ctx.world.aligned if name != "base" else ctx.world.base
    model, tokenizer = load_model(model_dir, adapter, **DEMO_RUNS_ON)
    return evaluate_loaded(
        model, tokenizer, sets, name=name, params=params, identity=model_identity(model_dir, adapter),
        generation=ctx.generation, with_margin=with_margin, progress=False,
    )


def _rate(row: dict, key: str) -> Rate | None:
    if row.get(key) is None:
        return None
    return Rate(row[key], tuple(row[f"{key}_ci"]), row["n"][key])


def _scores(row: dict):
    from csulora.tuning.selection import SettingScores

    return SettingScores(
        asr={"advbench:validation": _rate(row, "asr"), "airt:val": _rate(row, "asr_ood")},
        utility=_rate(row, "utility"),
    )


def _correct(ctx: DemoContext, method: str, options: dict, tag: str, needs_models: bool) -> Path:
    from csulora import api

    out = ctx.work / tag
    models = {"base": ctx.world.base, "aligned": ctx.world.aligned} if needs_models else {}
    api.correct_adapter(ctx.world.attacked, out, method, subspace=ctx.subspace, progress=False, **models, **options)
    return out


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
    """Correct at one grid value; score it on validation (to choose) and test (to plot)."""
    from csulora.worlds.tiny import one_thread

    with one_thread():
        options = {**spec.fixed, spec.knob: value}
        adapter = _correct(ctx, spec.method, options, f"{spec.row}-{spec.knob}-{value:g}", spec.needs_models)
        val_row = _evaluate(ctx, adapter, ctx.validation, f"{spec.row}[{spec.knob}={value:g}]", keep=False)
        # Every point is scored on test for the plot's curve; the chosen one's row and
        # generations are reused by run_sweep rather than generated a second time.
        test_row, test_records = _evaluate_with_records(ctx, adapter, ctx.test, spec.row, options, with_margin=True)
        unchanged = is_unchanged(adapter, ctx.world.attacked)
    return {"value": value, "validation": val_row, "test": test_row, "records": test_records, "unchanged": unchanged}


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
    ctx: DemoContext, spec: SweepSpec, aligned_val: dict, attacked_val: dict, points: list[dict] | None = None
) -> tuple[dict, dict]:
    """Select on validation among the scored grid points; return (test row, sweep record)."""
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.selection import ScoredSetting, select_setting

    if points is None:
        points = score_sweep_points(ctx, [spec], workers=1)[spec.row]
    config = TuneConfig(
        method=spec.method,
        grid=tuple(p["value"] for p in points), max_asr_gap=MAX_ASR_GAP, max_utility_drop=MAX_UTILITY_DROP,
    )
    selection = select_setting(
        [ScoredSetting(p["value"], _scores(p["validation"])) for p in points], _scores(aligned_val), config,
        adapter=_scores(attacked_val),
    )
    if selection.index is not None:
        chosen, why = points[selection.index], selection.summary
    else:
        # Nothing qualified: show the safest setting (lowest worst-source validation ASR,
        # then highest utility) and say so; the row is marked "qualified": false.
        chosen = min(points, key=lambda p: _safety_key(p["validation"]))
        why = f"no setting qualified ({selection.summary}); showing the safest, {spec.knob}={chosen['value']:g}"
    row = mark_unchanged(chosen["test"], chosen.get("unchanged", False))
    ctx.records.extend(chosen["records"])
    row["params"]["selected_on"] = "validation"
    row["params"]["qualified"] = selection.index is not None
    record = {
        "method": spec.method, "knob": spec.knob, "chosen": chosen["value"], "qualified": selection.index is not None,
        "why": why, "unchanged": bool(chosen.get("unchanged", False)),
        "points": [
            {spec.knob: p["value"], "validation": _brief(p["validation"]), "test": _brief(p["test"])} for p in points
        ],
    }
    return row, record


def _safety_key(row: dict) -> tuple[float, float, float]:
    """Worst-source ASR, then summed ASR, then higher utility: the "safest" ordering."""
    asrs = [row["asr"], row["asr_ood"] if row["asr_ood"] is not None else 0.0]
    return max(asrs), sum(asrs), -(row["utility"] or 0.0)


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


def demo_report(rows: Sequence[dict], sweeps: dict[str, dict], info: dict) -> str:
    """report.md: the table, how knobs were chosen, and what the numbers say."""
    by = {r["name"]: r for r in rows}
    lines = [summary_markdown(rows, title="csulora demo: the tiny world").rstrip(), ""]
    lines += [
        "ASR: keyword judge (docs/design.md §7) on AdvBench test (n=100); ASR (OOD): airt-test (n=20, wide intervals);",
        "utility: exact match on the date task's test split (n=100); over-refusal: the project's benign set.",
        f"Greedy generation, {info['generation']['max_new_tokens']} new tokens, chat template. Intervals: bootstrap 95%.",
        "",
        "## How each knob was chosen (validation prompts only)",
        "",
    ]
    for name, sweep in sweeps.items():
        lines.append(f"- **{name}** ({sweep['method']}, {sweep['knob']} over {[p[sweep['knob']] for p in sweep['points']]}): {sweep['why']}")
    rec = info.get("recommended") or recommendation(rows, sweeps)
    lines += ["", "## Recommended (what `csulora tune` picks with its defaults)", ""]
    if rec["row"] is not None:
        knob, value = next(iter(rec["params"].items()))
        lines.append(f"- **{rec['row']}** with {knob}={value:g}, chosen on validation: {rec['why']}.")
    else:
        lines.append(
            "- **No row is recommended**: with its default options (restore over "
            f"{list(get_method(DEMO_RECOMMENDED_METHOD).tuning.grid)}, ASR gap {MAX_ASR_GAP:g}, utility drop "
            f"{MAX_UTILITY_DROP:.0%}) `csulora tune --method resta` finds no qualifying setting on this world's "
            f"validation prompts, so it would write no adapter. {rec['why']}."
        )
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


def run_demo(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    world_dir: str | os.PathLike | None = None,
    sweeps: Sequence[SweepSpec] | None = None,
    progress: bool = True,
) -> Path:
    """Build/reuse the tiny world, attack, correct, evaluate; write OUTDIR. Returns OUTDIR."""
    from csulora import api
    from csulora.worlds.tiny import build_tiny_world, one_thread, shared_tiny_world

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
            subspace = api.build_subspace(world.base, world.aligned, work / "subspace.safetensors", progress=False)
            validation, test = demo_sets()
            ctx = DemoContext(world=world, subspace=Path(subspace), work=work, validation=validation, test=test)
            rows = [_evaluate(ctx, None, test, "base"), _evaluate(ctx, None, test, "aligned"),
                    _evaluate(ctx, world.attacked, test, "attacked")]
            aligned_val = _evaluate(ctx, None, validation, "aligned[val]", keep=False)
            attacked_val = _evaluate(ctx, world.attacked, validation, "attacked[val]", keep=False)
            for name, method, options in DEMO_FIXED:
                impl = get_method(method)
                adapter = _correct(ctx, method, options, name, impl.needs_displacement(make_config(impl, options)))
                row = _evaluate(ctx, adapter, test, name, params=dict(options))
                rows.append(mark_unchanged(row, is_unchanged(adapter, world.attacked)))
            sweep_records = {}
            sweep_points = score_sweep_points(ctx, sweeps, workers=demo_workers())
            for spec in sweeps:
                row, record = run_sweep(ctx, spec, aligned_val, attacked_val, sweep_points[spec.row])
                row["recommended"] = bool(spec.recommends and record["qualified"])
                record["recommends"] = spec.recommends
                rows.append(row)
                sweep_records[spec.row] = record
            timings["evaluate"] = time.perf_counter() - t
            info = {
                "world": str(world.root),
                "world_info": world.info(),
                "generation": {"batch_size": ctx.generation.batch_size, "max_new_tokens": ctx.generation.max_new_tokens},
                "selection_rule": {"max_asr_gap": MAX_ASR_GAP, "max_utility_drop": MAX_UTILITY_DROP, "on": "validation"},
                "recommended": recommendation(rows, sweep_records),
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
            }
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
