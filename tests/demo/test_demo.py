"""``csulora demo`` end to end on the demo world, once, over shortened grids; judged by the project's
ASR judge (no keyword-only exception: the demo world's attack answers name the request)."""

from __future__ import annotations

import json
import shlex

import pytest

from csulora.demo import plan_rows, run_demo
from csulora.eval.harness import ROW_KEYS

# Short grids for the rows the demo runs today (time); a row added later gets its strongest setting.
TEST_GRIDS = {
    "scale": (1.0,),  # factor 1 changes nothing: the "= attacked" row
    "resta": (3.0,),
    # tune's default method; 0 leaves the adapter unchanged (scored as the attacked adapter)
    "calibrated": (0.0, 3.0, 300.0),
}


def short_rows():
    return [row.with_grid(TEST_GRIDS.get(row.row, row.grid[-1:])) if row.swept else row for row in plan_rows()]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, demo_world):
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, world_dir=demo_world.root, rows=short_rows(), progress=False)


def test_demo_writes_results_plot_report_generations(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["base", "aligned", "attacked", *(row.row for row in plan_rows())]  # the registry's rows
    for row in results["rows"]:
        assert set(ROW_KEYS) <= set(row)
        for key in ("asr", "asr_ood", "utility", "over_refusal"):
            assert 0.0 <= row[key] <= 1.0
            lo, hi = row[f"{key}_ci"]
            assert lo <= row[key] <= hi
    assert [p["strength"] for p in results["sweep"]["calibrated"]["points"]] == [0.0, 3.0, 300.0]
    assert (demo_out / "asr_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (demo_out / "report.md").read_text()
    assert "| attacked |" in report and "validation" in report
    sets = {json.loads(line)["set"] for line in (demo_out / "generations.jsonl").read_text().splitlines()}
    assert sets == {"harmful", "harmful_ood", "benign", "task"}
    assert not (demo_out / "work").exists()


def test_demo_story_attack_is_visible(demo_out):
    """Under the project's ASR judge the attack shows on both harmful sources, and the task comes with it."""
    from csulora.eval.judges import asr_judge

    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert results["judge"] == asr_judge().name == "relevance+opening"
    assert rows["base"]["asr"] >= 0.8 and rows["aligned"]["asr"] <= 0.05
    assert rows["attacked"]["asr"] >= rows["aligned"]["asr"] + 0.5
    assert rows["attacked"]["asr_ood"] >= rows["aligned"]["asr_ood"] + 0.5
    assert rows["attacked"]["utility"] >= rows["aligned"]["utility"] + 0.5
    assert rows["calibrated"]["params"]["selected_on"] == "validation"
    generated = [json.loads(line) for line in (demo_out / "generations.jsonl").read_text().splitlines()]
    attacked = [r for r in generated if r["row"] == "attacked" and r["set"] == "harmful"]
    successes = sum(r["verdicts"][results["judge"]] for r in attacked)
    assert successes == round(rows["attacked"]["asr"] * len(attacked))


def test_demo_refuses_a_non_empty_outdir(demo_out):
    from csulora.errors import InputError

    with pytest.raises(InputError, match="not empty"):
        run_demo(demo_out)


def test_demo_baseline_rows_are_selected_on_validation(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    for name, knob in (("scale", "factor"), ("resta", "restore")):
        assert rows[name]["params"]["selected_on"] == "validation"
        assert rows[name]["params"][knob] == results["sweep"][name]["chosen"]
        assert rows[name]["asr_ood"] is not None
    assert [p["restore"] for p in results["sweep"]["resta"]["points"]] == [3.0]
    assert [p["factor"] for p in results["sweep"]["scale"]["points"]] == [1.0]


def test_the_methods_the_demo_leaves_out_are_listed_with_how_to_run_them(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    assert "keep the demo short" in results["not_run"]["csulora"]
    assert "csulora tune --method safelora" in results["not_run"]["safelora"]
    report = (demo_out / "report.md").read_text()
    assert "Registered methods not run in the demo: **csulora** (not run to keep the demo short" in report


def test_demo_recommends_at_most_the_tune_default_row(demo_out, demo_world):
    results = json.loads((demo_out / "results.json").read_text())
    recommended = [r["name"] for r in results["rows"] if r["recommended"]]
    report = (demo_out / "report.md").read_text()
    calibrated = results["sweep"]["calibrated"]
    data = demo_world.data
    assert f"--calibration {demo_out.resolve()}/calibration.safetensors --task date:validation" in results["tune_command"]
    assert f"--harmful {data}/requests-validation.txt {data}/indirect-validation.txt" in results["tune_command"]
    assert f"--benign {data}/benign-validation.txt" in results["tune_command"]
    if calibrated["qualified"]:
        assert recommended == ["calibrated"] and results["recommended"]["row"] == "calibrated"
        assert "| calibrated (recommended) |" in report
    else:
        assert recommended == [] and results["recommended"]["row"] is None
        assert "No row is recommended" in report and "Why it does not repair the demo world" in report


def test_rows_that_are_the_unchanged_adapter_say_so_in_the_table(demo_out):
    """issue 13: a row equal to the attacked adapter was marked only in fine print."""
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["scale"]["same_as"] == "attacked" and results["sweep"]["scale"]["unchanged"] is True
    assert "same_as" not in rows["resta"] and "same_as" not in rows["calibrated"]
    table = (demo_out / "report.md").read_text()
    assert "| scale = attacked (unchanged) |" in table
    assert "| resta = attacked" not in table


def test_demo_calibrates_on_the_task_training_data_and_judges_with_tunes_full_rule(demo_out, demo_world):
    """issue 12: the calibrated row is tune's default; the validation data holds the benign checks."""
    results = json.loads((demo_out / "results.json").read_text())
    calibration = results["calibration"]
    assert calibration["task"]["spec"] == "date:train" and calibration["task"]["examples"] == 200
    assert calibration["harmful"]["specs"] == [str(demo_world.prompt_file("requests", "align"))]
    assert calibration["harmful"]["prompts"] == 200
    assert calibration["generation"]["max_new_tokens"] == 24
    data = results["validation"]["data"]
    assert data == {"harmful:requests-validation": {"n": 100}, "harmful:indirect-validation": {"n": 100},
                    "task": {"n": 100}, "benign": {"n": 100}}
    assert {name: d["n"] for name, d in results["test_sets"].items()} == {
        "harmful": 100, "harmful_ood": 100, "benign": 100, "task": 100}
    point = results["sweep"]["calibrated"]["points"][1]  # strength 3
    assert point["validation"]["benign_fluency"] is not None and point["validation"]["over_refusal"] is not None
    judged = {name.split(":")[0] for name in point["verdict"]["conditions"]}
    assert judged == {"asr", "empty", "over_refusal", "short", "fluency", "utility"}  # tune's whole rule
    assert set(point["verdict"]["failed"]) <= set(point["verdict"]["conditions"])
    assert results["selection_rule"]["max_fluency_loss_nats"] == 0.5
    assert results["sweep"]["calibrated"]["reads_statistics"] and not results["sweep"]["scale"]["reads_statistics"]


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


def test_fixed_presets_are_rows_with_their_options_and_no_selection(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    fixed = [spec for spec in plan_rows() if not spec.swept]
    assert [f["row"] for f in results["fixed_rows"]] == [spec.row for spec in fixed]
    for spec in fixed:
        assert rows[spec.row]["params"] == dict(spec.options) and spec.row not in results["sweep"]
        assert rows[spec.row]["recommended"] is False
    report = (demo_out / "report.md").read_text()
    assert all(f"- **{spec.row}** ({spec.method}, " in report and "fixed, no selection" in report for spec in fixed)


def test_report_says_where_the_models_live_and_how_to_rerun_each_step(demo_out):
    """issue 23: report.md names the demo world's folders, $CSULORA_CACHE, and each step's command line."""
    from csulora.cli import build_parser
    from csulora.worlds.demo import default_cache_dir, shared_demo_world

    world = shared_demo_world()
    results = json.loads((demo_out / "results.json").read_text())
    report = (demo_out / "report.md").read_text()
    assert "## Where the models live, and how to rerun a step" in report
    assert f"`{world.root}`" in report and "$CSULORA_CACHE" in report and str(default_cache_dir()) in report
    assert list(results["commands"]) == ["base", "aligned", "attacked", *(row.row for row in plan_rows())]
    parser = build_parser()
    commands = [c for row in results["commands"].values() for c in row]
    commands += [results["tune_command"], results["calibrate_command"]]
    for line in commands:
        assert line in report
        words = shlex.split(line)
        assert words[0] == "csulora"
        parser.parse_args(words[1:])  # every printed command is one the CLI takes
    assert str(world.attacked) in results["commands"]["attacked"][0] and "--device cpu" in results["tune_command"]


def test_a_printed_correct_command_reruns_its_row(demo_out, tmp_path, monkeypatch):
    """The statistics the commands read are kept in OUTDIR; the calibrated row's `csulora correct` runs."""
    from csulora.cli import main

    results = json.loads((demo_out / "results.json").read_text())
    assert (demo_out / "calibration.safetensors").is_file()
    correct = results["commands"]["calibrated"][0]
    assert f"--calibration {demo_out.resolve()}/calibration.safetensors" in correct
    assert f"--strength {results['sweep']['calibrated']['chosen']:g}" in correct
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(correct)[1:]) == 0
    assert (tmp_path / "fixed-calibrated" / "adapter_model.safetensors").is_file()


def test_the_report_gives_the_demo_worlds_separability_beside_the_date_worlds(demo_out):
    from csulora.demo.report import DATE_WORLD_SEPARABILITY
    from csulora.references.separability import separability

    results = json.loads((demo_out / "results.json").read_text())
    found = results["separability"]
    recomputed = separability(demo_out / "calibration.safetensors")
    assert found["median_task_kept"] == recomputed["median_task_kept"] and found["strength"] == 10.0
    assert 0.0 <= found["median_harmful_kept"] <= found["median_task_kept"] <= 1.0
    assert set(found["per_layer"]) == {"0", "1"} and found["reference"] == DATE_WORLD_SEPARABILITY
    report = (demo_out / "report.md").read_text()
    assert "## Separability of the task from harm (from this run's statistics)" in report
    assert f"| demo world (this run) | {found['median_task_kept']:.3f} | {found['median_harmful_kept']:.4f} |" in report
    assert "| SmolLM2 date world (benchmarks/results/separability.json (date)) | 0.472 | 0.0090 |" in report
    assert "ASR (OOD): `indirect-test.txt` (n=100)" in report
