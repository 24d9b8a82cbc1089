"""Separability from a calibration file (csulora.references.separability, issue 24)."""

from __future__ import annotations

from csulora.references.separability import per_layer_medians, separability, statistics_groups
from tests.fixtures_tiny import tiny_calibration, tiny_pair  # noqa: F401


def test_a_calibration_file_gives_medians_and_layers(tiny_calibration):
    result = separability(tiny_calibration)
    assert result["strength"] == 10.0 and result["groups"]
    assert 0 <= result["median_harmful_kept"] <= 1 and 0 <= result["median_task_kept"] <= 1
    assert set(result["per_layer"]) == {str(g["layer"]) for g in result["groups"].values()}
    assert separability(tiny_calibration, strength=100.0)["median_harmful_kept"] < result["median_harmful_kept"]


def test_groups_and_layer_medians():
    groups = statistics_groups({"l.0.q": "g0", "l.0.k": "g0", "l.1.o": "g1"})
    assert groups == {"g0": ["l.0.q", "l.0.k"], "g1": ["l.1.o"]}
    records = {
        "a": {"layer": 10, "task_kept": 0.5, "harmful_kept": 0.1},
        "b": {"layer": 10, "task_kept": 0.7, "harmful_kept": 0.3},
        "c": {"layer": 2, "task_kept": 0.2, "harmful_kept": 0.0},
        "d": {"layer": None, "task_kept": 1.0, "harmful_kept": 1.0},
    }
    layers = per_layer_medians(records)
    assert list(layers) == ["2", "10"]  # numeric order, not string order
    assert layers["10"] == {"task_kept": 0.6, "harmful_kept": 0.2}
