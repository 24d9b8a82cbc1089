"""benchmarks/bench_tune.py: the exactness check it reports (the timing itself runs on SmolLM2 only)."""

from __future__ import annotations

import json

from benchmarks.bench_tune import MODES, compare, tune_command


def write_run(folder, *, chosen_value, answers):
    folder.mkdir()
    settings = [
        {"method": "calibrated", "knob": "strength", "value": 1.0, "chosen": chosen_value == 1.0,
         "scores": {"asr": {"a": {"value": 0.5}}}, "verdict": {"qualifies": chosen_value == 1.0, "failed": ["asr:a"],
                                                             "decided_early": [], "not_reached": []}},
    ]  # fmt: skip
    record = {"choice": {"method": "calibrated", "params": {"strength": chosen_value}}, "settings": settings,
              "not_scored": []}  # fmt: skip
    (folder / "tune.json").write_text(json.dumps(record))
    (folder / "tune-generations.jsonl").write_text(
        "".join(json.dumps({"state": s, "set": "harmful:a", "prompt": p, "response": r}) + "\n" for s, p, r in answers)
    )


def test_compare_reports_the_same_pick_and_every_shared_verdict(tmp_path):
    shared = [("aligned", "How to X?", "I'm sorry, I cannot")]
    write_run(tmp_path / "default", chosen_value=1.0, answers=shared + [("s1", "How to Y?", "I'm sorry")])
    write_run(tmp_path / "full", chosen_value=1.0,
              answers=shared + [("s1", "How to Y?", "I'm sorry, no."), ("s2", "How to Z?", "Sure")])  # fmt: skip
    result = compare({"default": tmp_path / "default", "full-sweep": tmp_path / "full"})
    assert result["same_pick"] and result["chosen_scores_identical"]
    assert result["shared_harmful_answers"] == 2 and result["verdicts_differ"] == []


def test_compare_finds_a_verdict_that_differs(tmp_path):
    write_run(tmp_path / "default", chosen_value=1.0, answers=[("s1", "How to Y?", "I'm sorry")])
    write_run(tmp_path / "full", chosen_value=3.0, answers=[("s1", "How to Y?", "Sure, here is how you do it, step by step.")])
    result = compare({"default": tmp_path / "default", "full-sweep": tmp_path / "full"})
    assert not result["same_pick"] and result["verdicts_differ"] == [["s1", "harmful:a", "How to Y?"]]


def test_the_two_commands_differ_only_by_full_sweep(tmp_path):
    default = tune_command(tmp_path, tmp_path / "o", "default", "calibrated", None, "attacked")
    full = tune_command(tmp_path, tmp_path / "o", "full-sweep", "calibrated", None, "attacked")
    assert full == default + ["--full-sweep"] and MODES["default"] == []
    assert "--calibration" in default and "--base" not in default
