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
        SweepSpec("scale", "scale", (0.5,)),
        SweepSpec("resta", "resta", (3.0,), recommends=True),
        SweepSpec("csulora+restore", "csulora", (4.0,), fixed={"schedule": "energy", "restore": 1.0}),
    ]
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, world_dir=world.root, sweeps=sweeps, progress=False)


def test_demo_writes_results_plot_report_generations(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == [
        "base", "aligned", "attacked", "safelora-default", "safelora", "csulora", "scale", "resta", "csulora+restore"
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
    assert [p["factor"] for p in results["sweep"]["scale"]["points"]] == [0.5]


def test_demo_recommends_at_most_the_tune_default_row(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    recommended = [r["name"] for r in results["rows"] if r["recommended"]]
    report = (demo_out / "report.md").read_text()
    resta = results["sweep"]["resta"]
    if resta["qualified"]:
        assert recommended == ["resta"] and results["recommended"]["row"] == "resta"
        assert "| resta (recommended) |" in report
    else:
        assert recommended == [] and results["recommended"]["row"] is None
        assert "No row is recommended" in report


def test_recommendation_says_why_none_and_refuses_two():
    from csulora.demo import recommendation

    sweeps = {"resta": {"knob": "restore", "chosen": 3.0, "why": "no setting qualifies: too unsafe", "recommends": True}}
    rows = [{"name": "resta", "recommended": False}]
    assert recommendation(rows, sweeps) == {"row": None, "why": "no setting qualifies: too unsafe"}
    rows = [{"name": "resta", "recommended": True}]
    assert recommendation(rows, sweeps)["params"] == {"restore": 3.0}
    with pytest.raises(AssertionError):
        recommendation([{"name": "a", "recommended": True}, {"name": "b", "recommended": True}], sweeps)


def test_recommending_sweep_is_tunes_resta_default():
    from csulora.demo import DEMO_SWEEPS
    from csulora.tuning.config import TuneConfig

    deciding = [s for s in DEMO_SWEEPS if s.recommends]
    assert len(deciding) == 1
    resta = TuneConfig(method="resta")
    assert (deciding[0].method, deciding[0].knob) == (resta.method, resta.knob)
    assert deciding[0].weakest_first() == resta.grid
