"""report.md: the test table, how each knob was chosen, the recommendation (or why there is
none, in this run's numbers), what the numbers show, and where the models live with the command
lines that rerun each step. Reads only results.json's content, never a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from csulora.demo.context import MAX_ASR_GAP, MAX_UTILITY_DROP
from csulora.demo.rerun import rerun_lines
from csulora.demo.rows import MAX_FULL_GRID
from csulora.eval.harness import summary_markdown

# The feasibility pilot's shares of the action kept on SmolLM2 at strength 30, where the task
# survived (docs/design.md §5c): the contrast the report draws when the demo world is not repaired.
SMOL_PILOT_SHARES = {"knob": "strength", "value": 30.0, "harmful": 0.003, "task": 0.53}
# The SmolLM2 date world's separability (benchmarks/results/separability.json, "date": from the
# `make smol` calibration file, at the calibrated method's default strength), shown beside the
# demo world's; tests/demo/test_report.py checks it against that file.
DATE_WORLD_SEPARABILITY = {
    "name": "SmolLM2 date world", "source": "benchmarks/results/separability.json (date)", "strength": 10.0,
    "median_task_kept": 0.4720278557851044, "median_harmful_kept": 0.008976515182909654,
}  # fmt: skip
ROWS_AS_THEY_ARE = ("base", "aligned", "attacked")
# How report.md names each test set.
TEST_SET_NAMES = {"harmful": "ASR", "harmful_ood": "ASR (OOD)", "benign": "over-refusal", "task": "utility"}


def value_of(rate: dict | None) -> float | None:
    return None if rate is None else rate["value"]


def share(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def failed_kinds(point: dict) -> set[str]:
    return {name.split(":")[0] for name in point["verdict"]["failed"]}


def demo_report(rows: Sequence[dict], sweeps: dict[str, dict], info: dict) -> str:
    """report.md: the table, how knobs were chosen, and what the numbers say."""
    validation = info.get("validation") or {}
    lines = [summary_markdown(rows, title="csulora demo: the demo world").rstrip(), ""]
    lines += [*test_set_lines(info), ""]
    lines += knob_lines(sweeps, info)
    lines += recommendation_lines(sweeps, info)
    lines += separability_lines(info.get("separability"))
    lines += action_kept_sections(sweeps, validation, width(info))
    lines += ["", "## What it shows", "", *shows_lines(rows)]
    lines += ["", *rerun_lines(info)] if info.get("commands") else []
    lines += [
        "",
        f"The demo world is a random-init 2-layer Llama of hidden size {width(info)} with its own closed set of harmful "
        "topics, benign requests and the date task (docs/design.md §8); its numbers show the mechanics, not how the "
        "methods rank on real models (see the SmolLM2 results).",
        "",
        f"World: `{info['world']}`; timings (s): {json.dumps(info['timings_s'])}.",
    ]
    return "\n".join(lines) + "\n"


def width(info: dict) -> int | str:
    """The world's hidden size (its layers' input width), from world.json's config."""
    return ((info.get("world_info") or {}).get("config") or {}).get("hidden_size", "?")


def test_set_lines(info: dict) -> list[str]:
    """What each column was measured on, and how."""
    sets = info.get("test_sets") or {}
    described = "; ".join(
        f"{TEST_SET_NAMES.get(name, name)}: `{Path(d['spec']).name}` (n={d['n']})" for name, d in sets.items()
    )
    return [
        f"Test sets (held out: never trained on, never selected on): {described}.",
        f"ASR: the project's ASR judge (`{info.get('judge', 'relevance+opening')}`, docs/design.md §7: no refusal, on topic, "
        "not degenerate); utility: exact match; over-refusal: the refusal-only judge.",
        f"Greedy generation, {info['generation']['max_new_tokens']} new tokens, chat template. Intervals: bootstrap 95%.",
    ]


def separability_lines(found: dict | None) -> list[str]:
    """The demo world's separability beside the SmolLM2 date world's (docs/design.md §5c)."""
    if not found:
        return []
    ref = found["reference"]
    lines = [
        "", "## Separability of the task from harm (from this run's statistics)", "",
        (f"For an update that acts equally on every input direction, the share of its action the calibrated "
         f"correction keeps at strength {found['strength']:g} on task inputs and on harmful inputs, "
         f"tr(C S Cᵀ)/tr(S) per statistics group (docs/design.md §5c); medians over the {found['groups']} groups. "
         "Update-independent: it says before any adapter exists how far the correction can keep the task apart "
         "from harm."),
        "", "| world | task kept | harmful kept |", "|---|---|---|",
        f"| demo world (this run) | {found['median_task_kept']:.3f} | {found['median_harmful_kept']:.4f} |",
        f"| {ref['name']} ({ref['source']}) | {ref['median_task_kept']:.3f} | {ref['median_harmful_kept']:.4f} |",
        "",
        "Per layer (demo world): " + "; ".join(
            f"layer {layer}: task {v['task_kept']:.3f}, harmful {v['harmful_kept']:.4f}"
            for layer, v in found["per_layer"].items()) + ".",
    ]  # fmt: skip
    return lines


def knob_lines(sweeps: dict[str, dict], info: dict) -> list[str]:
    """How each swept row's setting was chosen; the fixed rows; which grids were thinned."""
    data = (info.get("validation") or {}).get("data") or {}
    described = ", ".join(f"{name} (n={d['n']})" for name, d in data.items())
    lines = ["## How each knob was chosen (validation prompts only)", ""]
    lines += [f"`csulora tune`'s rule and data: {described}." if described else "`csulora tune`'s rule.", ""]
    for name, sweep in sweeps.items():
        grid = [p[sweep["knob"]] for p in sweep["points"]]
        held = ", ".join(f"{k}={v}" for k, v in sweep.get("options", {}).items())
        given = f", given for this run (the method's: {sweep['default_grid']})" if sweep.get("grid_source") == "given" else ""
        lines.append(
            f"- **{name}** ({sweep['method']}{', ' + held if held else ''}; {sweep['knob']} over {grid}{given}): {sweep['why']}"
        )
    for row in info.get("fixed_rows", []):
        held = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        lines.append(f"- **{row['row']}** ({row['method']}, {held}): fixed, no selection; {row['help']}.")
    thinned = [f"{name} (of {s['default_grid']})" for name, s in sweeps.items() if s.get("grid_source") == "thinned"]
    if thinned:
        lines += [
            "",
            f"To keep the demo within minutes, grids of more than {MAX_FULL_GRID} points are swept at every other "
            f"point, first and last kept (the row that is `csulora tune` with its defaults keeps its whole grid): "
            + "; ".join(thinned) + ".",
        ]  # fmt: skip
    not_run = info.get("not_run") or {}
    if not_run:
        lines += ["", "Registered methods not run in the demo: "
                  + "; ".join(f"**{name}** ({why})" for name, why in not_run.items()) + "."]  # fmt: skip
    return lines


def recommendation_lines(sweeps: dict[str, dict], info: dict) -> list[str]:
    """The row `csulora tune` picks with its defaults, or why it picks none."""
    rec = info["recommended"]
    deciding = next((sweep for sweep in sweeps.values() if sweep.get("recommends")), None)
    lines = ["", "## Recommended (what `csulora tune` picks with its defaults)", ""]
    if rec["row"] is not None:
        knob, value = next(iter(rec["params"].items()))
        lines.append(f"- **{rec['row']}** with {knob}={value:g}, chosen on validation: {rec['why']}.")
    elif deciding is not None:
        grid = [p[deciding["knob"]] for p in deciding["points"]]
        statistics = ", statistics from the task's training data" if deciding.get("reads_statistics") else ""
        lines.append(
            f"- **No row is recommended**: with its defaults (the {deciding['method']} method, {deciding['knob']} over "
            f"{grid}{statistics}, ASR gap {MAX_ASR_GAP:g} on each source, utility "
            f"drop {MAX_UTILITY_DROP:.0%}, the benign and fluency checks) `csulora tune` finds no qualifying setting "
            f"on this world's validation data, so it would write no adapter. {rec['why']}."
        )
    else:
        lines.append(f"- **No row is recommended**: {rec['why']}.")
    if info.get("tune_command"):
        lines += ["", f"The same choice from the command line: `{info['tune_command']}`."]
    return lines


def action_kept_sections(sweeps: dict[str, dict], validation: dict, hidden: int | str = "?") -> list[str]:
    """Per sweep that reports the shares of the update's action it keeps: every setting on
    validation with those shares; for the recommending sweep when nothing qualified, why not."""
    lines: list[str] = []
    for name, sweep in sweeps.items():
        if not any(p.get("action_kept") for p in sweep["points"]):
            continue
        lines += ["", f"## {name}: each setting on validation, and the share of the update's action it keeps", ""]
        lines += action_kept_table(sweep, validation)
        lines += [
            "",
            (
                "Action kept: mean over modules of ‖B A'‖²_S / ‖B A‖²_S, S the aligned model's input statistics on "
                "harmful prompts + its refusals, or on the task's training data (docs/design.md §5c)."
            ),
        ]
        if sweep.get("recommends") and not sweep["qualified"]:
            lines += ["", "### Why it does not repair the demo world", "", *why_not_repaired(sweep, validation, hidden)]
    return lines


def kept_share(kept: dict | None, kind: str, digits: int) -> str:
    return share(kept[kind]["mean"], digits) if kept and kind in kept else "–"


def action_kept_table(sweep: dict, reference: dict[str, dict]) -> list[str]:
    """Per setting of a sweep that reports the shares of its action kept: validation scores,
    those shares (mean over modules) and the verdict."""
    sources = list(reference["aligned"]["asr"])
    knob = sweep["knob"]
    head = ["setting", *(f"ASR {s}" for s in sources), "utility", "over-refusal", "short", "fluency",
            "harmful action kept", "task action kept", "verdict (failed conditions)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(label: str, scores: dict, kept: dict | None, verdict: str) -> str:
        row = [label, *(share(value_of(scores["asr"][s])) for s in sources), share(value_of(scores["utility"])),
               share(value_of(scores["over_refusal"])), share(value_of(scores["benign_short"])),
               share(scores["benign_fluency"]), kept_share(kept, "harmful", 4), kept_share(kept, "task", 3),
               verdict]  # fmt: skip
        return "| " + " | ".join(row) + " |"

    lines.append(cells("aligned", reference["aligned"], None, "the reference"))
    lines.append(cells("attacked", reference["attacked"], None, "the adapter"))
    for p in sweep["points"]:
        verdict = "qualifies" if p["verdict"]["qualifies"] else ", ".join(p["verdict"]["failed_brief"])
        lines.append(cells(f"{knob}={p[knob]:g}", p["validation"], p["action_kept"], verdict))
    return lines


def shows_lines(rows: Sequence[dict]) -> list[str]:
    """What the attack did, and what each corrected row keeps of it, on the test sets."""
    by = {r["name"]: r for r in rows}
    aligned, attacked = by.get("aligned"), by.get("attacked")
    if not (aligned and attacked):
        return []
    lines = [
        (
            f"- The attack raised ASR from {aligned['asr']:.2f} to {attacked['asr']:.2f} (OOD "
            f"{aligned['asr_ood']:.2f} -> {attacked['asr_ood']:.2f}) and utility from {aligned['utility']:.2f} to "
            f"{attacked['utility']:.2f}."
        )
    ]
    gain = attacked["utility"] - aligned["utility"]
    for r in (r for r in rows if r["name"] not in ROWS_AS_THEY_ARE):
        kept = (r["utility"] - aligned["utility"]) / gain if gain > 0 else float("nan")
        same = f" = {r['same_as']} (unchanged: its chosen setting changes nothing)" if r.get("same_as") else ""
        lines.append(
            f"- {r['name']}{same}: ASR {r['asr']:.2f} (OOD {r['asr_ood']:.2f}), utility {r['utility']:.2f} "
            f"({kept:.0%} of the attack's utility gain kept), over-refusal {r['over_refusal']:.2f}."
        )
    return lines


def shares_text(point: dict) -> str:
    kept = point["action_kept"]
    return (f"keeps {kept['harmful']['mean']:.2%} of the update's action on harmful inputs and "
            f"{kept['task']['mean']:.1%} on the task's")  # fmt: skip


def why_not_repaired(sweep: dict, reference: dict[str, dict], hidden: int | str = "?") -> list[str]:
    """Why no setting of the recommending sweep qualifies, in this run's numbers.

    The feasibility pilot's explanation (docs/design.md §5c): the correction shrinks the
    update on the input directions harmful inputs occupy more than task inputs, so it
    repairs only as far as the two separate. The shares of the action kept on each say how
    far they do here, and how much of its action the task needs (:func:`task_needs`).
    """
    knob = sweep["knob"]
    sources = list(reference["aligned"]["asr"])
    adapter_utility = value_of(reference["attacked"]["utility"])
    points = [p for p in sweep["points"] if has_both_shares(p) and not p["unchanged"]]
    if not points:
        return []

    def scores(p: dict) -> str:
        asr = ", ".join(f"{s} {value_of(p['validation']['asr'][s]):.2f}" for s in sources)
        utility = value_of(p["validation"]["utility"])
        return f"validation ASR {asr}; utility {utility:.2f} (the adapter's {adapter_utility:.2f})"

    aligned_asr = ", ".join(f"{s} {value_of(reference['aligned']['asr'][s]):.2f}" for s in sources)
    lines = [f"- The weakest, {knob}={points[0][knob]:g}, {shares_text(points[0])}: {scores(points[0])}."]
    safe = [p for p in points if "asr" not in failed_kinds(p)]
    if safe:
        lines.append(
            f"- Every harmful source comes within {MAX_ASR_GAP:g} of the aligned model's ({aligned_asr}) only from "
            f"{knob}={safe[0][knob]:g} on, which {shares_text(safe[0])}: {scores(safe[0])}."
        )
    else:
        lines.append(f"- No {knob} brings every harmful source within {MAX_ASR_GAP:g} of the aligned model's ({aligned_asr}).")
    lines += task_needs_lines(sweep)
    lines.append(conclusion(sweep, points, safe[0] if safe else None, adapter_utility, hidden))
    return lines


def has_both_shares(point: dict) -> bool:
    kept = point.get("action_kept") or {}
    return "harmful" in kept and "task" in kept


def task_share(point: dict) -> float:
    return point["action_kept"]["task"]["mean"]


def task_needs(sweep: dict) -> tuple[dict, dict | None] | None:
    """How much of its action the task needs, read off the sweep itself: (the setting that keeps the
    smallest share of the task's action with the utility still within the drop, the setting that
    keeps the largest share below it with the utility lost, or None); None when no setting keeps it."""
    points = [p for p in sweep["points"] if has_both_shares(p) and p["validation"]["utility"] is not None]
    keeps = [p for p in points if "utility" not in failed_kinds(p)]
    if not keeps:
        return None
    kept = min(keeps, key=task_share)
    lost = [p for p in points if "utility" in failed_kinds(p) and task_share(p) < task_share(kept)]
    return kept, (max(lost, key=task_share) if lost else None)


def task_needs_lines(sweep: dict) -> list[str]:
    needed = task_needs(sweep)
    if needed is None:
        return [f"- No {sweep['knob']} keeps the utility within {MAX_UTILITY_DROP:.0%} of the adapter's."]
    kept, lost = needed
    knob = sweep["knob"]
    itself = " (the update itself)" if kept["unchanged"] else ""
    line = (f"- How much of its action the task needs, read off the same sweep: at {knob}={kept[knob]:g}{itself} the "
            f"task keeps {kept['action_kept']['task']['mean']:.1%} of the update's action and the utility holds")  # fmt: skip
    if lost is not None:
        line += (f"; at {knob}={lost[knob]:g} it keeps {lost['action_kept']['task']['mean']:.1%} and the utility drops "
                 f"more than tune allows")  # fmt: skip
    return [line + "."]


def conclusion(sweep: dict, points: list[dict], first_safe: dict | None, adapter_utility: float | None,
               hidden: int | str = "?") -> str:  # fmt: skip
    """What the sweep says in one reading: what the first setting safe on every source leaves the
    task, the mechanism (docs/design.md §5c), and the pilot's shares where this sweep has its setting."""
    knob, pilot = sweep["knob"], SMOL_PILOT_SHARES
    if first_safe is None:
        reading = f"- So no {knob} of this grid takes the attack away on every harmful source."
    else:
        utility = value_of(first_safe["validation"]["utility"])
        lost = f"{1 - utility / adapter_utility:.0%}" if utility is not None and adapter_utility else "–"
        reading = (
            f"- So the correction takes the harmful action away before it leaves the task what it needs: the first "
            f"setting safe on every source, {knob}={first_safe[knob]:g}, keeps {task_share(first_safe):.1%} of the task's "
            f"action and loses {lost} of the adapter's validation utility (tune allows {MAX_UTILITY_DROP:.0%})."
        )
    matched = next((p for p in points if knob == pilot["knob"] and p[knob] == pilot["value"]), None)
    contrast = ""
    if matched is not None:
        kept = matched["action_kept"]
        contrast = (
            f" At {knob}={pilot['value']:g} this world keeps {kept['harmful']['mean']:.2%} of the harmful action "
            f"and {kept['task']['mean']:.1%} of the task's; SmolLM2 (576-dimensional inputs) kept {pilot['harmful']:.1%} "
            f"and {pilot['task']:.0%} there, and its task survived (the feasibility pilot, docs/design.md §5c)."
        )
    return (
        reading
        + " The correction shrinks the update on the input directions harmful inputs occupy more than task inputs "
        f"(docs/design.md §5c); how far the two separate in this world's {hidden}-dimensional layer inputs is the "
        "separability section's figure."
        + contrast
        + " The demo world is not reshaped to make the method look better (its recipe, docs/design.md §8)."
    )
