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
        SweepSpec("safelora", "safelora", "threshold", (0.5,), fixed={"select": "threshold"}, needs_models=True),
        SweepSpec("csulora", "csulora", "gamma", (1.0, 16.0), fixed={"schedule": "energy"}),
    ]
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, world_dir=world.root, sweeps=sweeps, progress=False)


def test_demo_writes_results_plot_report_generations(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["base", "aligned", "attacked", "safelora-default", "safelora", "csulora"]
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
