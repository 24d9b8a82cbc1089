"""tune.json record and tune.png plot, from hand-made scores (no model)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig
from csulora.tuning.report import SCHEMA, plot_sweep, tune_record, write_tune_json
from csulora.tuning.scores import ScoredSetting, SettingScores
from csulora.tuning.selection import MethodSweep, select_across_methods, select_setting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(adv: float, airt: float, utility: float | None, benign: float | None = None) -> SettingScores:
    def r(v: float, n: int) -> Rate:
        return Rate(v, (max(0.0, v - 0.1), min(1.0, v + 0.1)), n)

    return SettingScores(
        asr={"advbench-validation": r(adv, 100), "airt-val": r(airt, 19)},
        utility=None if utility is None else r(utility, 100),
        task_loglik=None if utility is None else -0.5,
        over_refusal=None if benign is None else r(benign, 120),
    )


def _sweep(with_task: bool):
    u = (lambda v: v) if with_task else (lambda v: None)
    settings = [
        ScoredSetting(0.0, _scores(0.95, 1.0, u(0.9), 0.0)),
        ScoredSetting(1.0, _scores(0.04, 0.05, u(0.88), 0.1)),
        ScoredSetting(2.0, _scores(0.0, 0.0, u(0.7), 0.3)),
    ]
    return settings, _scores(0.0, 0.0, u(0.0), 0.3), _scores(0.95, 1.0, u(0.9), 0.0)


@pytest.mark.parametrize("with_task", [True, False])
def test_record_holds_every_setting_the_choice_and_is_strict_json(tmp_path, with_task):
    config = TuneConfig(method="resta")
    settings, aligned, adapter = _sweep(with_task)
    selection = select_setting(settings, aligned, config, adapter=adapter)
    record = tune_record(
        config=config,
        sweeps=[MethodSweep(config, tuple(settings))],
        aligned=aligned,
        adapter=adapter,
        selection=selection,
        inputs={"adapter": "a", "aligned": "b", "subspace": "c", "base": None},
        datasets={"harmful": {"advbench-validation": {"spec": "advbench:validation", "n": 100}}},
    )
    path = write_tune_json(tmp_path / "tune.json", record)
    loaded = json.loads(path.read_text())
    assert loaded["schema"] == SCHEMA
    assert loaded["config"]["knob"] == "restore" and loaded["config"]["grid"] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert loaded["config"]["max_fluency_loss_nats"] == 0.5
    assert [row["value"] for row in loaded["settings"]] == [0.0, 1.0, 2.0]
    assert {row["method"] for row in loaded["settings"]} == {"resta"}
    assert [row["chosen"] for row in loaded["settings"]] == [False, True, False]
    assert loaded["choice"]["chosen"] == 1.0 and loaded["choice"]["params"] == {"restore": 1.0}
    assert loaded["choice"]["method"] == "resta" and loaded["choice"]["knob"] == "restore"
    row = loaded["settings"][1]
    assert row["scores"]["asr"]["airt-val"] == {"value": 0.05, "ci": [0.0, pytest.approx(0.15)], "n": 19}
    assert row["scores"]["over_refusal"]["value"] == 0.1
    assert row["verdict"]["qualifies"] is True and row["verdict"]["reasons"]
    names = [c["name"] for c in row["verdict"]["conditions"]]
    assert names[:2] == ["asr:advbench-validation", "asr:airt-val"] and "over_refusal" in names
    assert ("utility" in names) is with_task
    assert "timing_s" not in loaded  # timings live in run.json: tune.json is the same on a rerun
    # over-refusal is judged (the aligned model has it); the strongest loses 22% of the utility
    assert loaded["settings"][2]["verdict"]["failed"] == (["utility"] if with_task else [])
    assert loaded["aligned"]["asr"]["advbench-validation"]["value"] == 0.0
    if with_task:
        assert row["scores"]["utility"]["value"] == 0.88
        assert row["verdict"]["utility_drop"] == pytest.approx(0.02 / 0.9)
    else:
        assert row["scores"]["utility"] is None
        assert loaded["choice"]["notes"]


def _all_methods(with_task: bool):
    settings, aligned, adapter = _sweep(with_task)
    sweeps = [MethodSweep(TuneConfig(method="resta"), tuple(settings)),
              MethodSweep(TuneConfig(method="scale"), (ScoredSetting(0.5, settings[1].scores),))]  # fmt: skip
    return sweeps, aligned, adapter


def test_record_of_every_method_names_each_rows_method():
    sweeps, aligned, adapter = _all_methods(True)
    config = TuneConfig(method="all")
    selection = select_across_methods(sweeps, aligned, config, adapter=adapter)
    record = tune_record(config=config, sweeps=sweeps, aligned=aligned, adapter=adapter, selection=selection,
                         inputs={}, datasets={})  # fmt: skip
    assert [(row["method"], row["value"]) for row in record["settings"]] == [
        ("resta", 0.0), ("resta", 1.0), ("resta", 2.0), ("scale", 0.5)
    ]
    assert set(record["methods"]) == {"resta", "scale"} and record["config"]["method"] == "all"
    # equal utility and ASR: the weaker setting (the first of scale's grid beats resta's second)
    assert record["choice"]["method"] == "scale" and record["choice"]["params"] == {"factor": 0.5}
    assert [row["chosen"] for row in record["settings"]] == [False, False, False, True]
    json.dumps(record, allow_nan=False)


@pytest.mark.parametrize("with_task", [True, False])
@pytest.mark.parametrize("qualified", [True, False])
@pytest.mark.parametrize("several", [False, True])
def test_plot_writes_a_png(tmp_path, with_task, qualified, several):
    config = TuneConfig(method="resta", max_asr_gap=0.05 if qualified else 0.0)
    settings, aligned, adapter = _sweep(with_task)
    sweeps = [MethodSweep(config, tuple(settings))]
    if several:
        sweeps, aligned, adapter = _all_methods(with_task)
        sweeps = [dataclasses.replace(s, config=dataclasses.replace(s.config, max_asr_gap=config.max_asr_gap))
                  for s in sweeps]  # fmt: skip
        selection = select_across_methods(sweeps, aligned, TuneConfig(method="all"), adapter=adapter)
    else:
        selection = select_setting(settings, aligned, config, adapter=adapter)
    assert selection.qualified == qualified or not with_task
    path = plot_sweep(
        tmp_path / "tune.png", config=config, sweeps=sweeps, aligned=aligned, adapter=adapter, selection=selection
    )
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
