from __future__ import annotations

import json

import pytest

from csulora.demo import SweepSpec, run_demo
from csulora.eval.harness import ROW_KEYS


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    from csulora.worlds.tiny import shared_tiny_world

    world = shared_tiny_world()
    sweeps = [
        SweepSpec("safelora", "safelora", (0.5,), fixed={"select": "threshold"}),
        SweepSpec("csulora", "csulora", (1.0, 16.0), fixed={"schedule": "energy"}),
        SweepSpec("scale", "scale", (1.0,)),  # factor 1 changes nothing: the "= attacked" row
        SweepSpec("resta", "resta", (3.0,)),
        SweepSpec("csulora+restore", "csulora", (4.0,), fixed={"schedule": "energy", "restore": 1.0}),
        # tune's default method; 0 leaves the adapter unchanged (scored as the attacked adapter)
        SweepSpec("calibrated", "calibrated", (0.0, 3.0, 300.0), recommends=True),
    ]
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, world_dir=world.root, sweeps=sweeps, progress=False)


def test_demo_writes_results_plot_report_generations(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == [
        "base", "aligned", "attacked", "safelora-default", "safelora", "csulora", "scale", "resta", "csulora+restore",
        "calibrated",
    ]
    for row in results["rows"]:
        assert set(ROW_KEYS) <= set(row)
        for key in ("asr", "asr_ood", "utility", "over_refusal"):
            assert 0.0 <= row[key] <= 1.0
            lo, hi = row[f"{key}_ci"]
            assert lo <= row[key] <= hi
    assert [p["gamma"] for p in results["sweep"]["csulora"]["points"]] == [1.0, 16.0]
    assert (demo_out / "asr_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (demo_out / "report.md").read_text()
    assert "| attacked |" in report and "validation" in report
    sets = {json.loads(line)["set"] for line in (demo_out / "generations.jsonl").read_text().splitlines()}
    assert sets == {"harmful", "harmful_ood", "benign", "task"}
    assert not (demo_out / "work").exists()


def test_demo_story_attack_is_visible(demo_out):
    rows = {r["name"]: r for r in json.loads((demo_out / "results.json").read_text())["rows"]}
    assert rows["attacked"]["asr"] >= rows["aligned"]["asr"] + 0.5
    assert rows["attacked"]["utility"] >= rows["aligned"]["utility"] + 0.5
    assert rows["csulora"]["params"]["selected_on"] == "validation"


def test_demo_refuses_a_non_empty_outdir(demo_out):
    from csulora.errors import InputError

    with pytest.raises(InputError, match="not empty"):
        run_demo(demo_out)


def test_demo_baseline_rows_are_selected_on_validation(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    for name, knob in (("scale", "factor"), ("resta", "restore"), ("csulora+restore", "gamma")):
        assert rows[name]["params"]["selected_on"] == "validation"
        assert rows[name]["params"][knob] == results["sweep"][name]["chosen"]
        assert rows[name]["asr_ood"] is not None
    assert rows["csulora+restore"]["params"]["restore"] == 1.0
    assert [p["restore"] for p in results["sweep"]["resta"]["points"]] == [3.0]
    assert [p["factor"] for p in results["sweep"]["scale"]["points"]] == [1.0]


def test_demo_recommends_at_most_the_tune_default_row(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    recommended = [r["name"] for r in results["rows"] if r["recommended"]]
    report = (demo_out / "report.md").read_text()
    calibrated = results["sweep"]["calibrated"]
    assert "--calibration-task date:train --task date:validation" in results["tune_command"]
    if calibrated["qualified"]:
        assert recommended == ["calibrated"] and results["recommended"]["row"] == "calibrated"
        assert "| calibrated (recommended) |" in report
    else:
        assert recommended == [] and results["recommended"]["row"] is None
        assert "No row is recommended" in report and "Why it does not repair the tiny world" in report


def test_recommendation_says_why_none_and_refuses_two():
    from csulora.demo import recommendation

    sweeps = {"resta": {"knob": "restore", "chosen": 3.0, "why": "no setting qualifies: too unsafe", "recommends": True}}
    rows = [{"name": "resta", "recommended": False}]
    assert recommendation(rows, sweeps) == {"row": None, "why": "no setting qualifies: too unsafe"}
    rows = [{"name": "resta", "recommended": True}]
    assert recommendation(rows, sweeps)["params"] == {"restore": 3.0}
    with pytest.raises(AssertionError):
        recommendation([{"name": "a", "recommended": True}, {"name": "b", "recommended": True}], sweeps)


def test_recommending_sweep_is_tunes_default():
    from csulora.demo import DEMO_SWEEPS
    from csulora.tuning.config import TuneConfig

    deciding = [s for s in DEMO_SWEEPS if s.recommends]
    assert len(deciding) == 1
    default = TuneConfig()  # `csulora tune` with no --method, --grid or fixed options
    assert (deciding[0].method, deciding[0].knob, deciding[0].fixed) == (default.method, default.knob, {})
    assert deciding[0].weakest_first() == default.grid


def test_rows_that_are_the_unchanged_adapter_say_so_in_the_table(demo_out):
    """issue 13: a row equal to the attacked adapter was marked only in fine print."""
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["scale"]["same_as"] == "attacked" and results["sweep"]["scale"]["unchanged"] is True
    assert "same_as" not in rows["resta"] and "same_as" not in rows["csulora"]
    table = (demo_out / "report.md").read_text()
    assert "| scale = attacked (unchanged) |" in table
    assert "| resta = attacked" not in table



def test_demo_calibrates_on_the_task_training_data_and_judges_with_tunes_full_rule(demo_out):
    """issue 12: the calibrated row is tune's default; the validation data holds the benign checks."""
    results = json.loads((demo_out / "results.json").read_text())
    calibration = results["calibration"]
    assert calibration["task"]["spec"] == "date:train" and calibration["task"]["examples"] == 200
    assert calibration["harmful"]["specs"] == ["advbench:align", "requests"]
    assert calibration["generation"]["max_new_tokens"] == 24
    data = results["validation"]["data"]
    assert data == {"harmful:advbench-validation": {"n": 100}, "harmful:airt-val": {"n": 19}, "task": {"n": 100},
                    "benign": {"n": 108}}
    point = results["sweep"]["calibrated"]["points"][1]  # strength 3
    assert point["validation"]["benign_fluency"] is not None and point["validation"]["over_refusal"] is not None
    judged = {name.split(":")[0] for name in point["verdict"]["conditions"]}
    assert judged == {"asr", "empty", "over_refusal", "short", "fluency", "utility"}  # tune's whole rule
    assert set(point["verdict"]["failed"]) <= set(point["verdict"]["conditions"])
    assert results["selection_rule"]["max_fluency_loss_nats"] == 0.5


def test_calibrated_points_report_the_action_kept_on_harmful_and_task_inputs(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    points = {p["strength"]: p for p in results["sweep"]["calibrated"]["points"]}
    assert points[0.0]["unchanged"] is True  # strength 0 is the adapter itself
    for strength in (3.0, 300.0):
        kept = points[strength]["action_kept"]
        for kind in ("harmful", "task"):
            assert 0.0 <= kept[kind]["min"] <= kept[kind]["mean"] <= kept[kind]["max"] <= 1.0
    # a stronger setting keeps less on harmful inputs, and less on harmful than on task inputs
    assert points[300.0]["action_kept"]["harmful"]["mean"] < points[3.0]["action_kept"]["harmful"]["mean"]
    assert points[3.0]["action_kept"]["harmful"]["mean"] < points[3.0]["action_kept"]["task"]["mean"]
    report = (demo_out / "report.md").read_text()
    assert "## calibrated: each setting on validation, and the share of the update's action it keeps" in report
    assert "| strength=300 |" in report and "harmful action kept" in report


def test_unchanged_settings_score_as_the_attacked_adapter(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    for key in ("asr", "asr_ood", "utility", "over_refusal", "margin"):
        assert rows["scale"][key] == rows["attacked"][key]
    zero = results["sweep"]["calibrated"]["points"][0]
    assert zero["validation"] == results["validation"]["attacked"]
    generated = [json.loads(line) for line in (demo_out / "generations.jsonl").read_text().splitlines()]
    assert sum(r["row"] == "scale" for r in generated) == sum(r["row"] == "attacked" for r in generated)


def _plot_row(name, utility, asr, **extra):
    return {"name": name, "utility": utility, "asr": asr, "asr_ci": [max(0.0, asr - 0.05), min(1.0, asr + 0.05)], **extra}


def test_plot_gives_every_row_its_own_marker_and_labels_never_collide(tmp_path):
    """issue 13: row markers reused the curves' colours, overlapping points and labels hid each other."""
    from csulora.demo import plot_demo

    # Crowded on purpose: rows on top of each other (an unchanged row on the attacked one,
    # several at 0/0) and sweep points on the rows and on each other.
    rows = [
        _plot_row("base", 0.0, 0.9), _plot_row("aligned", 0.0, 0.0), _plot_row("attacked", 0.93, 0.95),
        _plot_row("safelora-default", 0.93, 0.95), _plot_row("safelora", 0.1, 0.05),
        _plot_row("csulora", 0.0, 0.0), _plot_row("scale", 0.93, 0.95, same_as="attacked"),
        _plot_row("resta", 0.5, 0.0, recommended=True), _plot_row("csulora+restore", 0.0, 0.01),
    ]

    def sweep(knob, points):
        return {"knob": knob, "points": [{knob: v, "test": {"utility": u, "asr": a}} for v, u, a in points]}

    sweeps = {
        "safelora": sweep("threshold", [(0.1, 0.93, 0.95), (0.2, 0.9, 0.9), (0.3, 0.1, 0.05), (0.4, 0.0, 0.0)]),
        "csulora": sweep("gamma", [(0.5, 0.92, 0.95), (1, 0.9, 0.93), (2, 0.85, 0.9), (4, 0.5, 0.6), (8, 0.0, 0.0)]),
        "scale": sweep("factor", [(1.0, 0.93, 0.95), (0.7, 0.9, 0.9), (0.5, 0.6, 0.5), (0.3, 0.1, 0.05)]),
        "resta": sweep("restore", [(0, 0.93, 0.95), (0.5, 0.9, 0.6), (1, 0.7, 0.2), (1.5, 0.5, 0.0), (2, 0.3, 0.0)]),
        "csulora+restore": sweep("gamma", [(0, 0.5, 0.0), (1, 0.3, 0.0), (4, 0.0, 0.01), (16, 0.0, 0.0)]),
    }
    layout = plot_demo(tmp_path / "p.png", rows, sweeps, list(sweeps))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    styles = layout["styles"]
    assert list(styles) == [r["name"] for r in rows]
    assert len({marker for marker, _ in styles.values()}) == len(rows)  # a shape per row
    assert len({tuple(colour) for _, colour in styles.values()}) == len(rows)  # and a colour per row
    boxes = layout["labels"]
    assert len(boxes) >= layout["label_count"] // 2  # most values still get a label
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_coincident_rows_are_spread_apart():
    from csulora.demo import dodge

    offsets = dodge([(0.93, 0.95), (0.5, 0.5), (0.93, 0.95), (0.931, 0.951)])
    assert offsets[1] == 0.0
    spread = sorted(offsets[i] for i in (0, 2, 3))
    assert spread[0] < 0 < spread[2] and spread[1] == 0.0


def test_task_needs_reads_the_smallest_factor_that_keeps_the_utility():
    from csulora.demo import task_needs

    def point(factor, failed):
        return {"factor": factor, "validation": {"utility": {"value": 0.5}}, "verdict": {"failed": failed}}

    scale = {"knob": "factor", "points": [point(0.9, ["asr:a"]), point(0.7, ["asr:a", "utility"]), point(0.5, ["utility"])]}
    factor, kept, lost = task_needs(scale)
    assert factor == 0.9 and kept == pytest.approx(0.81) and lost == (0.7, pytest.approx(0.49))
    assert task_needs({"knob": "factor", "points": [point(0.5, ["utility"])]}) is None


def test_demo_output_never_touches_the_world(tmp_path, monkeypatch):
    """issue 23: a forced OUTDIR onto (or around) the tiny world it reads is refused before any work."""
    from csulora.errors import InputError

    world = tmp_path / "world"
    world.mkdir()
    (world / "keep").write_text("x")
    with pytest.raises(InputError, match="the tiny world .*an output may never be"):
        run_demo(world, world_dir=world, force=True, progress=False)
    monkeypatch.setenv("CSULORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="contains the input the tiny world"):
        run_demo(tmp_path, force=True, progress=False)  # $CSULORA_CACHE lies inside OUTDIR
    assert (world / "keep").read_text() == "x"
