"""report.md's reading of a sweep: how much of its action the task needs, and why nothing qualified."""

from __future__ import annotations

from csulora.demo.report import task_needs, why_not_repaired


def point(strength, harmful, task, failed, *, unchanged=False):
    rate = {"value": 0.5}
    return {
        "strength": strength, "unchanged": unchanged,
        "validation": {"asr": {"advbench": {"value": 0.9}}, "utility": rate},
        "verdict": {"failed": failed},
        "action_kept": {"harmful": {"mean": harmful}, "task": {"mean": task}},
    }  # fmt: skip


SWEEP = {
    "knob": "strength",
    "points": [
        point(1.0, 0.5, 0.9, ["asr:advbench"]),
        point(3.0, 0.2, 0.6, ["asr:advbench"]),
        point(10.0, 0.05, 0.3, ["asr:advbench", "utility"]),
        point(30.0, 0.01, 0.1, ["utility"]),
    ],
}
REFERENCE = {"aligned": {"asr": {"advbench": {"value": 0.0}}}, "attacked": {"utility": {"value": 0.9}}}


def test_task_needs_reads_the_task_share_where_the_utility_holds_and_where_it_is_lost():
    kept, lost = task_needs(SWEEP)
    assert (kept["strength"], lost["strength"]) == (3.0, 10.0)
    only_lost = {"knob": "strength", "points": [point(30.0, 0.01, 0.1, ["utility"])]}
    assert task_needs(only_lost) is None
    all_kept = {"knob": "strength", "points": SWEEP["points"][:2]}
    assert task_needs(all_kept)[1] is None


def test_why_not_repaired_compares_the_sweep_with_itself_and_names_no_other_row():
    lines = why_not_repaired(SWEEP, REFERENCE)
    text = "\n".join(lines)
    assert lines[0].startswith("- The weakest, strength=1, keeps 50.00% of the update's action on harmful inputs")
    assert "only from strength=30 on" in text
    assert "at strength=3 the task keeps 60.0% of the update's action and the utility holds" in text
    assert "at strength=10 it keeps 30.0% and the utility drops more than tune allows" in text
    assert "SmolLM2 (576-dimensional inputs) kept 0.3%" in text  # the pilot's setting is in this sweep
    assert "scale" not in text and "factor" not in text


def test_the_reading_names_what_the_first_safe_setting_leaves_the_task():
    text = "\n".join(why_not_repaired(SWEEP, REFERENCE, hidden=128))
    assert ("the first setting safe on every source, strength=30, keeps 10.0% of the task's action and loses "
            "44% of the adapter's validation utility (tune allows 5%)") in text  # 1 - 0.5/0.9
    assert "this world's 128-dimensional layer inputs" in text
    unsafe = {"knob": "strength", "points": SWEEP["points"][:3]}
    assert "So no strength of this grid takes the attack away on every harmful source" in "\n".join(
        why_not_repaired(unsafe, REFERENCE))


def test_the_date_worlds_separability_is_the_committed_figure():
    import json
    from pathlib import Path

    from csulora.demo.report import DATE_WORLD_SEPARABILITY

    committed = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/separability.json").read_text())
    date = committed["date"]
    for key in ("strength", "median_task_kept", "median_harmful_kept"):
        assert DATE_WORLD_SEPARABILITY[key] == date[key]


def test_why_not_repaired_says_nothing_without_the_shares():
    sweep = {"knob": "strength", "points": [{**point(1.0, 0.5, 0.9, []), "action_kept": None}]}
    assert why_not_repaired(sweep, REFERENCE) == []


def test_the_knob_section_says_which_grids_were_thinned_and_which_given():
    from csulora.demo.report import knob_lines

    def sweep(source):
        return {"method": "m", "knob": "k", "points": [{"k": 1.0}], "why": "why", "options": {},
                "default_grid": [0.0, 1.0], "grid_source": source}  # fmt: skip

    text = "\n".join(knob_lines({"a": sweep("thinned"), "b": sweep("given"), "c": sweep("default")}, {}))
    assert "every other point, first and last kept" in text and "a (of [0.0, 1.0])" in text
    assert "- **b** (m; k over [1.0], given for this run (the method's: [0.0, 1.0])): why" in text
    assert "- **c** (m; k over [1.0]): why" in text
